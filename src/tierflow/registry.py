"""One registry per plugin family (cache policies, prefetchers); unknown names and parameters list the valid ones.

A plugin is a class with a ``name`` and a frozen attrs ``Params`` class whose fields (with defaults and
``metadata={"help": ...}``) are its parameters. ``registry.params(name, values)`` validates both the name
and the parameters. A family's package imports its built-in plugin modules, so importing the package
fills its registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import attrs

from tierflow.errors import TierflowError

T = TypeVar("T")


# Validators for plugin parameters (``attrs.field(validator=...)``); a failure becomes the one-line error of
# ``Registry.params``.
def positive(instance, attribute, value):
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def non_negative(instance, attribute, value):
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def fraction(instance, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value}")


@attrs.frozen
class NoParams:
    """A plugin without parameters."""


class Registry(Generic[T]):
    """Named plugin classes of one family."""

    def __init__(self, family: str):
        self.family = family
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: register ``cls`` under ``cls.name``."""
        name = cls.name
        if name in self._classes:
            raise ValueError(f"{self.family} {name!r} registered twice")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise TierflowError(f"unknown {self.family} {name!r}; valid: {', '.join(self.names())}") from None

    def params(self, name: str, values: Mapping[str, Any] | None = None):
        """The plugin's validated ``Params`` instance built from ``values``."""
        cls = self.get(name)
        params_cls = getattr(cls, "Params", NoParams)
        values = dict(values or {})
        fields = attrs.fields_dict(params_cls)
        unknown = sorted(set(values) - set(fields))
        if unknown:
            valid = ", ".join(fields) or "none"
            raise TierflowError(f"{self.family} {name!r}: unknown parameter(s) {', '.join(unknown)}; valid: {valid}")
        try:
            return params_cls(**values)
        except (TypeError, ValueError) as error:
            raise TierflowError(f"{self.family} {name!r}: {error}") from None

    def describe(self) -> list[dict]:
        """Every plugin with its parameters, defaults and help, for ``tierflow plugins``."""
        rows = []
        for name in self.names():
            cls = self._classes[name]
            params_cls = getattr(cls, "Params", NoParams)
            rows.append({
                "name": name,
                "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
                "params": [
                    {"name": f.name, "default": f.default, "help": f.metadata.get("help", "")}
                    for f in attrs.fields(params_cls)
                ],
            })
        return rows
