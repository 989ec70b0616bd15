"""Where the shipped scenarios and small traces live.

The top-level ``scenarios/`` and ``traces/`` folders are installed inside the package as ``tierflow/scenarios``
and ``tierflow/traces_bundled`` (see pyproject.toml). In a source checkout (an editable install) those
folders are not inside the package, so the checkout's own copies are used.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT_ROOT = _PACKAGE_DIR.parents[1]


def _data_dir(installed_name: str, checkout_folder: str) -> Path:
    installed = _PACKAGE_DIR / installed_name
    return installed if installed.is_dir() else _CHECKOUT_ROOT / checkout_folder


def scenarios_dir() -> Path:
    """The folder holding the shipped ``*.toml`` scenarios."""
    return _data_dir("scenarios", "scenarios")


def traces_dir() -> Path:
    """The folder holding the shipped small traces."""
    return _data_dir("traces_bundled", "traces")
