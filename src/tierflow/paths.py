"""Click parameter types for the commands' output paths."""

from __future__ import annotations

import os
from pathlib import Path

import click


class FolderPath(click.Path):
    """An output folder; an empty path is refused (``Path("")`` would silently be the working folder)."""

    def __init__(self):
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path; name a folder", param, ctx)
        return super().convert(value, param, ctx)


class OutputFile(click.Path):
    """An output file. A path that ends with a separator names a folder, and is refused: as a ``Path`` it would
    lose the separator and be written as a file of the folder's name."""

    def __init__(self):
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.endswith((os.sep, "/")):
            self.fail(f"{value!r} names a folder; give the file's path", param, ctx)
        return super().convert(value, param, ctx)
