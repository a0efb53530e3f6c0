"""Typed reads of JSON request fields: each returns the value (or the default for a missing or
null field) or raises a 400 ApiError naming the field and the type it needs.

JSON has no integer type of its own; like OpenAI, an integer field takes `3` but not `3.0` or
`true`, a number field takes `3` and `0.5` but not `"0.5"` or NaN.
"""
from __future__ import annotations

import math
from typing import Any

from router.openai_api.errors import invalid

_MISSING = object()


def _value(body: dict, name: str):
    value = body.get(name, _MISSING)
    return _MISSING if value is None else value


def get_bool(body: dict, name: str, default: bool) -> bool:
    value = _value(body, name)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"must be true or false, got {_show(value)}")
    return value


def get_int(body: dict, name: str, default: int | None, *, minimum: int | None = None,
            maximum: int | None = None) -> int | None:
    value = _value(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"must be an integer, got {_show(value)}")
    _check_range(name, value, minimum, maximum)
    return value


def get_number(body: dict, name: str, default: float | None, *, minimum: float | None = None,
               maximum: float | None = None) -> float | None:
    value = _value(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"must be a finite number, got {_show(value)}")
    _check_range(name, value, minimum, maximum)
    return float(value)


def get_str(body: dict, name: str, default: str | None) -> str | None:
    value = _value(body, name)
    if value is _MISSING:
        return default
    if not isinstance(value, str):
        raise invalid(name, f"must be a string, got {_show(value)}")
    return value


def get_dict(body: dict, name: str) -> dict | None:
    value = _value(body, name)
    if value is _MISSING:
        return None
    if not isinstance(value, dict):
        raise invalid(name, f"must be an object, got {_show(value)}")
    return value


def get_str_list(body: dict, name: str) -> list[str]:
    """A string or a list of strings (OpenAI's `stop`); [] when missing."""
    value = _value(body, name)
    if value is _MISSING:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(name, f"must be a string or a list of strings, got {_show(value)}")
    return list(value)


def get_int_list(body: dict, name: str, minimum: int = 0, maximum: int = 2 ** 31 - 1) -> list[int]:
    """A list of integers each in [minimum, maximum] (default: token ids, the proto's int32 range)."""
    value = _value(body, name)
    if value is _MISSING:
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise invalid(name, f"must be a list of integers, got {_show(value)}")
    bad = next((v for v in value if not minimum <= v <= maximum), None)
    if bad is not None:
        raise invalid(name, f"every element must be in [{minimum}, {maximum}], got {bad}")
    return list(value)


def _check_range(name: str, value, minimum, maximum) -> None:
    if minimum is not None and value < minimum:
        raise invalid(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise invalid(name, f"must be <= {maximum}, got {value}")


def _show(value: Any) -> str:
    """A short description of a wrong value: its JSON type and a prefix of it."""
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text[:40] + '...' if len(text) > 40 else text}"
