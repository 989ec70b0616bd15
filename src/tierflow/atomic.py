"""Atomic outputs: write beside the destination under a temporary name, then rename over it.

A reader never sees a half-written file, and an interrupted run leaves the previous file (or none) behind.
Published files get the ordinary permissions (0666 less the umask), not the 0600 of a temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def new_temporary(path: Path) -> Path:
    """An empty temporary file in ``path``'s folder (created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` ordinary permissions and rename it over ``path``."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def discard(tmp: Path) -> None:
    tmp.unlink(missing_ok=True)


@contextmanager
def replaced_atomically(path) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces ``path``, on an error it is removed."""
    path = Path(path)
    tmp = new_temporary(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` and publish the result as ``path``."""
    with replaced_atomically(path) as tmp:
        write(str(tmp))
