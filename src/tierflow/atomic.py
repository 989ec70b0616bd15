"""Atomic outputs: write beside the destination under a temporary name, then rename over it.

A reader never sees a half-written file, and an interrupted run leaves the previous file (or none) behind.
Published files get the ordinary permissions (0666 less the umask), not the 0600 of a temporary file. Missing
folders on the way are created; a destination that cannot be written (a read-only folder, a path through a
file) is an :class:`OutputError`, before anything is written: commands that compute for long call
:func:`check_writable` before they start.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tierflow.errors import TierflowError

_UMASK = os.umask(0)
os.umask(_UMASK)


class OutputError(TierflowError):
    """An output that cannot be written where the user asked."""

    def __init__(self, path, error: OSError):
        problem = error.strerror or str(error)
        if isinstance(error, (FileExistsError, NotADirectoryError)):  # a folder on the way is a file
            on_the_way = next((p for p in Path(path).parents if p.exists()), None)
            if on_the_way is not None and not on_the_way.is_dir():
                problem = f"{on_the_way} is a file, not a folder"
        super().__init__(f"cannot write {path}: {problem}")


def output_dir(path) -> Path:
    """``path`` as a folder for outputs, created if needed."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(path, error) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(path, PermissionError(13, "Permission denied"))
    return path


def new_temporary(path: Path) -> Path:
    """An empty temporary file in ``path``'s folder (created if needed)."""
    if path.is_dir():
        raise OutputError(path, IsADirectoryError(21, "Is a directory"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputError(path, error) from None
    os.close(fd)
    return Path(tmp)


def check_writable(path) -> None:
    """Fail now, not after a long computation, if ``path`` could not be written."""
    discard(new_temporary(Path(path)))


def publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` ordinary permissions, flush it to the disk and rename it over ``path`` (then flush the
    folder): after a crash of the machine the file is the old one or the whole new one, never a short one."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        _sync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except OSError as error:
        discard(tmp)
        raise OutputError(path, error) from None
    try:
        _sync(Path(path).parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        pass  # a folder that cannot be opened or synced (not every system allows it): the rename stands


def _sync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
