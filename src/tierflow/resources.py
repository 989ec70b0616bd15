"""Where the shipped scenarios and small traces live.

The top-level ``scenarios/`` and ``traces/`` folders are installed inside the package as ``tierflow/scenarios``
and ``tierflow/traces_bundled`` (see pyproject.toml). In a source checkout (an editable install) those
folders are not inside the package, so the checkout's own copies are used.
"""

from __future__ import annotations

import functools
import hashlib
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


@functools.cache
def code_fingerprint() -> str:
    """A hash of tierflow's installed files (code, scenarios, catalogs, default weights): saved results made by
    other files are out of date."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".toml", ".npz", ".json"):
            digest.update(str(path.relative_to(_PACKAGE_DIR)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def file_digest(path) -> str:
    """sha256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
