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


def destination(path) -> Path:
    """Where writing ``path`` lands: a symbolic link's target (written through, not replaced). A device, FIFO or
    socket is refused: renaming over it would replace it (``--out /dev/null`` run as root would remove
    /dev/null)."""
    path = Path(path)
    try:  # asking about a name too long for the system raises
        if path.is_symlink():
            path = Path(os.path.realpath(path))
            if path.is_symlink():  # realpath stops inside a loop of links
                raise OutputError(path, OSError(0, "a loop of symbolic links"))
        if path.exists() and not path.is_file() and not path.is_dir():
            raise OutputError(path, OSError(0, "not a regular file (outputs are written to a new file and "
                                               "renamed over the old one)"))
    except OSError as error:
        raise OutputError(path, error) from None
    return path


# A file name may hold 255 bytes on common file systems; a temporary adds ".XXXXXXXX.tmp" (13) to its output's.
_NAME_BYTES = 255 - len(".XXXXXXXX.tmp")


def _temporary_prefix(name: str) -> str:
    """``NAME.``, with ``NAME`` cut to fit the temporary's name within the file system's limit."""
    encoded = name.encode()
    if len(encoded) > _NAME_BYTES:
        name = encoded[:_NAME_BYTES].decode(errors="ignore")
    return name + "."


def new_temporary(path: Path) -> Path:
    """An empty temporary file in the folder of ``path``'s :func:`destination` (created if needed)."""
    path = destination(path)
    try:
        if path.is_dir():  # may raise itself: a name too long for the system
            raise IsADirectoryError(21, "Is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputError(path, error) from None
    os.close(fd)
    return Path(tmp)


def check_writable(path) -> None:
    """Fail now, not after a long computation, if ``path`` could not be written."""
    discard(new_temporary(Path(path)))


def check_not_an_input(out, inputs) -> None:
    """Refuse an output that would overwrite one of the files a command reads (``inputs``: paths, or
    ``(path, what it is)`` pairs; those that do not exist are skipped)."""
    target = destination(out).resolve()
    for entry in inputs:
        path, what = entry if isinstance(entry, tuple) else (entry, "an input file")
        if path is not None and Path(path).exists() and Path(path).resolve() == target:
            raise TierflowError(f"--out {out} is {what}: it would be overwritten; choose another name")


def publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` ordinary permissions, flush it to the disk and rename it over ``path`` (then flush the
    folder): after a crash of the machine the file is the old one or the whole new one, never a short one. A
    symbolic link is written through (see :func:`destination`)."""
    path = destination(path)
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


class H5Output:
    """An HDF5 file written to ``tmp`` through a Python file object, so that a failed write (a full disk) is a
    plain ``OSError``: the first one is kept and raised by :meth:`check` and :meth:`close`, and later writes are
    dropped (the file is discarded anyway). Written by HDF5 itself, a failed file is flushed again and again,
    each time with a traceback, and once more at exit, where it crashes the interpreter."""

    def __init__(self, tmp):
        import h5py

        # What the error names: the output (new_temporary names a temporary NAME.XXXXXXXX.tmp beside it).
        self._destination = str(Path(tmp).with_name(Path(tmp).name.rsplit(".", 2)[0]))
        # Unbuffered: a failed write fails in write() itself, not later in a seek() that flushes a buffer.
        self._raw = open(tmp, "w+b", buffering=0)  # noqa: SIM115 - closed in close()
        self.error: OSError | None = None
        try:
            self.file = h5py.File(self, "w")
        except BaseException:
            self._raw.close()
            raise

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            try:
                self._guarded(self._raw.close)
            finally:
                self.check()

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except OSError:
            pass
        if self.error is not None and exc is not self.error:
            raise self.error from None  # the cause of the error being handled (HDF5 misses the dropped bytes)

    def _guarded(self, operation, *args, default=None):
        if self.error is None:
            try:
                return operation(*args)
            except OSError as error:
                error.filename = error.filename or self._destination
                self.error = error
        return default

    # The file-object protocol h5py uses.
    def write(self, data) -> int:
        self._guarded(self._write_all, memoryview(data).cast("B"))
        return len(data)

    def _write_all(self, view) -> None:
        while view:
            view = view[self._raw.write(view):]

    def truncate(self, size=None):
        return self._guarded(self._raw.truncate, size, default=size)

    def flush(self) -> None:
        self._guarded(self._raw.flush)

    def read(self, size=-1):
        return self._raw.read(size)

    def readinto(self, buffer):
        """As a read of HDF5's own file driver: bytes past the end (written by nobody, or dropped after a failed
        write) read as zeros; h5py takes the whole buffer as read whatever the count."""
        view = memoryview(buffer).cast("B")
        count = self._raw.readinto(view) or 0
        view[count:] = bytes(len(view) - count)
        return len(view)

    def seek(self, offset, whence=0):
        return self._raw.seek(offset, whence)

    def tell(self):
        return self._raw.tell()
