"""One registry per plugin family (cache policies, prefetchers); unknown names and parameters list the valid ones.

A plugin is a class with a ``name`` and a frozen attrs ``Params`` class whose fields (with defaults and
``metadata={"help": ...}``) are its parameters. ``registry.params(name, values)`` validates both the name
and the parameters. A family's package imports its built-in plugin modules, so importing the package
fills its registry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import attrs

from tierflow.errors import TierflowError

T = TypeVar("T")


# Validators for plugin parameters (``attrs.field(validator=...)``); a failure becomes the one-line error of
# ``Registry.params``. A bool is not a number here, and no bound admits NaN or infinity.
def _number(attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{attribute.name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number, got {value}")


def positive(instance, attribute, value):
    _number(attribute, value)
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def non_negative(instance, attribute, value):
    _number(attribute, value)
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def fraction(instance, attribute, value):
    _number(attribute, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value}")


def _declared_kind(field: attrs.Attribute) -> str:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    return kind.replace(" ", "")


def check_value(field: attrs.Attribute, value: Any) -> Any:
    """A parameter value checked against the field's declared type (bool, int, float or str), before any
    converter sees it: a bool is not a number, an int must be integral, numbers are finite. An integral float
    given for an int becomes that int; ``int | None`` and the like take None too. Other declared types pass
    unchanged."""
    kind, name = _declared_kind(field), field.name
    if kind.endswith("|None"):
        if value is None:
            return None
        kind = kind.removesuffix("|None")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    elif kind == "float":
        _number(field, value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r} (quote it)")
    return value


def _message(error: Exception) -> str:
    """One line from a validator's error (attrs' own validators raise with a tuple of details)."""
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    return " ".join(text.split())


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
            valid = f"valid: {', '.join(fields)}" if fields else "it takes no parameters"
            raise TierflowError(f"{self.family} {name!r}: unknown parameter(s) {', '.join(unknown)}; {valid}")
        try:
            values = {key: check_value(fields[key], value) for key, value in values.items()}
            return params_cls(**values)
        except (TypeError, ValueError) as error:
            raise TierflowError(f"{self.family} {name!r}: {_message(error)}") from None

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
