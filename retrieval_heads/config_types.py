"""Config values checked against their dataclass field types, with the coercions YAML makes necessary.

PyYAML follows YAML 1.1, whose float pattern needs a dot: ``learning_rate: 1e-5`` loads as the *string*
``"1e-5"`` (``1.0e-5`` is a float), and a value written in quotes is a string too. Refusing those would
punish the most natural spelling of a learning rate, so a string that is unambiguously a decimal number is
converted for a numeric field; anything else of the wrong type is refused in one line naming the field, the
type it needs and the file. Overrides that arrive as strings (a comma-separated ``--lora-target-modules``)
follow the same rules.

    float   an int, or a decimal-number string ("1e-5", "0.5", "3"); finite only (NaN/inf are no setting)
    int     a decimal-integer string ("16"), or a number with no fraction (16.0, "1e3"); never a bool
    bool    the strings true/false/yes/no/1/0 in any case; never a number (is 2 true?)
    str     a string or a path; numbers, dates and lists are refused (quote them in YAML)
    list    a list, or one comma-separated string ("q_proj,v_proj"); then each item by its type
    dict    a mapping; a nested dataclass field takes a mapping of that dataclass's fields

This module imports nothing from ``pipeline`` or ``trainer``, so every stage's config can use it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from retrieval_heads.errors import RetmaskError

_INT = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # no nan/inf/underscores/hex: decimal only
_BOOL = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_NAMES = {int: ("an integer", "16"), float: ("a number", "1e-5"), bool: ("true or false", "true"),
          str: ("a string", '"text"')}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


class _Mismatch(Exception):
    """A value that does not fit its annotation (turned into a RetmaskError naming the field)."""


def check_field_types(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data`` checked against ``cls``'s field annotations, with unambiguous strings converted.

    Returns a new dict (nested dataclass fields stay mappings, converted the same way); unknown keys and
    values of the wrong type raise ``RetmaskError`` naming the field, the expected type and ``where``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise RetmaskError(f"{where}: expected a mapping of {cls.__name__} fields, got {_shown(data)}")
    return _fields(cls, data, where, "")


def field_value(value: Any, hint: Any, where: str, name: str) -> Any:
    """One value as its annotation ``hint`` requires (converted as above), or a RetmaskError naming ``name``."""
    return _value(value, hint, where, name)


def _fields(cls: type, data: Mapping[str, Any], where: str, prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise RetmaskError(
            f"{where}: unknown {cls.__name__} field {prefix}{unknown[0]}; valid fields: {', '.join(sorted(names))}"
        )
    return {key: _value(value, hints[key], where, f"{prefix}{key}") for key, value in data.items()}


def _value(value: Any, hint: Any, where: str, name: str) -> Any:
    try:
        return _convert(value, hint, where, name)
    except _Mismatch:
        description, example = _describe(hint)
        raise RetmaskError(
            f"{where}: {name} must be {description} (e.g. {example}), got {_shown(value)}{_why(value)}"
        ) from None


def _convert(value: Any, hint: Any, where: str, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if value is None and len(arms) < len(args):
            return None
        if len(arms) == 1:  # Optional[X]: X's own error names the innermost field
            return _convert(value, arms[0], where, name)
        for arm in arms:
            try:
                return _value(value, arm, where, name)
            except RetmaskError:
                continue
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return _fields(hint, value, where, f"{name}.")
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL:
            return _BOOL[value.strip().lower()]
        raise _Mismatch
    if hint is int:
        return _integer(value)
    if hint is float:
        return _float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise _Mismatch
    if hint in (list, tuple) or origin in (list, tuple):
        item = args[0] if args else Any
        if isinstance(value, str):  # a CLI override: comma-separated items
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        items = [_value(v, item, where, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or hint) is tuple else items
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        if len(args) == 2:
            return {_value(k, args[0], where, f"{name} key"): _value(v, args[1], where, f"{name}.{k}")
                    for k, v in value.items()}
        return dict(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _Mismatch
    return value  # an annotation this checker has no rule for: left to the config's own checks


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value.strip())
    number = _float(value)  # 16.0 or "1e3": a whole number, however written
    if not number.is_integer():
        raise _Mismatch
    return int(number)


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value.strip())  # "1e999" overflows to inf, refused below
    else:
        raise _Mismatch
    if not math.isfinite(number):
        raise _Mismatch
    return number


def _describe(hint: Any) -> tuple[str, str]:
    """(what a value of ``hint`` is, an example of one) for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(p[0] for p in parts) + (" or null" if type(None) in args else "")
        return text, parts[0][1]
    if origin is typing.Literal:
        return f"one of {', '.join(map(repr, args))}", repr(args[0])
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields", "{field: value}"
    if hint in (list, tuple) or origin in (list, tuple):
        item = args[0] if args else Any
        return f"a list of {_PLURALS.get(item, 'values')}", f"[{_describe(item)[1]}]" if item is not Any else "[a, b]"
    if hint is dict or origin is dict:
        return "a mapping", "{key: value}"
    if hint in _NAMES:
        return _NAMES[hint]
    return getattr(hint, "__name__", str(hint)), "?"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _why(value: Any) -> str:
    if isinstance(value, (dt.date, dt.time)):
        return " (YAML reads an unquoted date or time as one: quote it)"
    if isinstance(value, float) and not math.isfinite(value):
        return " (not a finite number)"
    if value is None:
        return " (null)"
    return ""
