"""Where the shipped scenarios and trace data live.

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
    """The folder of shipped trace data (``traces/``: routing statistics the generator is calibrated on; a
    scenario's relative ``workload.trace`` is also looked for here)."""
    return _data_dir("traces_bundled", "traces")


# Modules that only present or store results, never change a figure: editing them keeps saved results valid.
_PRESENTATION = ("cli.py", "commands.py", "report.py", "paper_figures.py", "atomic.py", "workers.py")


@functools.cache
def code_fingerprint() -> str:
    """A hash of the tierflow files that make its figures: the package's code, catalogs and default weights, and
    the shipped scenarios (found the same way in a checkout and an installed copy, so both give one hash).
    Saved results made by other files are out of date. Modules that only present or store results are left
    out (``_PRESENTATION``)."""
    digest = hashlib.sha256()
    package = [p for p in _PACKAGE_DIR.rglob("*") if p.is_file() and p.suffix in (".py", ".npz", ".json")
               and p.relative_to(_PACKAGE_DIR).parts[0] not in ("scenarios", "traces_bundled")
               and not p.name.endswith(_PRESENTATION)]
    files = [(str(p.relative_to(_PACKAGE_DIR)), p) for p in package]
    files += [(f"scenarios/{p.name}", p) for p in scenarios_dir().glob("*.toml")]
    for name, path in sorted(files):
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def file_digest(path) -> str:
    """sha256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
