"""Case-insensitive lookup in a catalog table; an unknown name lists the valid ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from tierflow.errors import TierflowError

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, what: str, plural: str) -> T:
    """``table[name]`` ignoring case and surrounding spaces; :class:`TierflowError` listing the keys if absent."""
    entry = table.get(name.strip().lower())
    if entry is None:
        raise TierflowError(f"unknown {what} {name!r}; valid {plural}: {', '.join(sorted(table))}")
    return entry
