"""The catalog: MoE model shapes and hardware profiles, every number with its source."""

from tierflow.catalog.hardware import HardwareProfile, get_profile, profile_names
from tierflow.catalog.models import ModelSpec, get_model, model_names

__all__ = ["HardwareProfile", "ModelSpec", "get_model", "get_profile", "model_names", "profile_names"]
