"""Where the shipped scenarios and small traces live.

The top-level ``scenarios/`` and ``traces/`` folders are installed inside the package (see pyproject.toml).
In a source checkout with an editable install, the import machinery does not see those mapped folders, so
we fall back to the checkout's own copies.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

_CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def _data_dir(package: str, checkout_folder: str) -> Path:
    try:
        return Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError:
        return _CHECKOUT_ROOT / checkout_folder


def scenarios_dir() -> Path:
    """The folder holding the shipped ``*.toml`` scenarios."""
    return _data_dir("tierflow.scenarios", "scenarios")


def traces_dir() -> Path:
    """The folder holding the shipped small traces."""
    return _data_dir("tierflow.traces_bundled", "traces")
