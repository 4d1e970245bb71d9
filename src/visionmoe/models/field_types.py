"""Check a config dataclass's field values against their declared types.

The command line parses ``--set`` values by each field's annotation; the Python API takes values
as given, so a string for a boolean (``batch_priority="no"``, truthy) or ``float("nan")`` for a
number would otherwise slip through. :func:`check_field_types` rejects them with one message
naming the field, the value and the type allowed: ``bool`` fields take only ``True``/``False``,
``int`` fields integers (not bools), ``float`` fields finite real numbers, ``str`` fields strings,
``X | None`` also ``None`` and ``tuple[int, ...]`` a tuple of such values. Range checks (counts
positive, weights >= 0) stay in each config's ``__post_init__``.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from dataclasses import fields
from typing import Any


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a tuple of {_describe(args[0])}"
    return {
        bool: "True/False",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        type(None): "None",
    }.get(annotation, getattr(annotation, "__name__", str(annotation)))


def value_matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is an acceptable value of the declared type ``annotation``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(value_matches(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(value_matches(v, args[0]) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        )
    if annotation is str:
        return isinstance(value, str)
    return True  # nested configs and other types check themselves


def check_field_types(config: Any, prefix: str = "") -> None:
    """Raise ``ValueError`` naming the first field of ``config`` whose value has the wrong type.

    ``prefix`` goes before field names in the message (e.g. ``"train."``).
    """
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        annotation = hints[f.name]
        value = getattr(config, f.name)
        if not value_matches(value, annotation):
            raise ValueError(f"{prefix}{f.name} must be {_describe(annotation)}, got {value!r}")
