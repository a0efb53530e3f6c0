"""Hypothesis strategies for any protobuf message, from its descriptor (benchmarks/fuzz.py).

Every field may be left unset or take an ordinary or an extreme value: integers at the edges of
their type (0, -1, min, max), floats including NaN, ±inf, -0.0 and subnormals, strings with
control characters and astral code points, long strings, unknown enum numbers, long repeated
numeric fields (10,000 elements) and nested messages (depth-limited).
"""
from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

_INT_RANGES = {
    F.TYPE_INT32: (-2 ** 31, 2 ** 31 - 1), F.TYPE_SINT32: (-2 ** 31, 2 ** 31 - 1),
    F.TYPE_SFIXED32: (-2 ** 31, 2 ** 31 - 1), F.TYPE_UINT32: (0, 2 ** 32 - 1), F.TYPE_FIXED32: (0, 2 ** 32 - 1),
    F.TYPE_INT64: (-2 ** 63, 2 ** 63 - 1), F.TYPE_SINT64: (-2 ** 63, 2 ** 63 - 1),
    F.TYPE_SFIXED64: (-2 ** 63, 2 ** 63 - 1), F.TYPE_UINT64: (0, 2 ** 64 - 1), F.TYPE_FIXED64: (0, 2 ** 64 - 1),
}
MAX_DEPTH = 3
LONG = 10_000


def _int(lo: int, hi: int):
    edges = sorted({lo, hi, 0, 1, max(lo, -1), min(hi, 2 ** 31 - 1), min(hi, 65536), min(hi, 2 ** 32 - 1)})
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi),
                     st.integers(max(lo, -8), min(hi, 64)))


def _scalar(field):
    t = field.type
    if t in _INT_RANGES:
        return _int(*_INT_RANGES[t])
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_DOUBLE:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from([0.0, -0.0, 1e-320, 1e308, -1.0, 0.5, 2.0]))
    if t == F.TYPE_FLOAT:
        return st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                         st.sampled_from([0.0, -0.0, 1e-40, 3e38, -1.0, 0.5]))
    if t == F.TYPE_STRING:
        return st.one_of(st.text(max_size=24), st.sampled_from(["", " ", "\x00", "a" * 70_000, "🙂" * 300,
                                                                "../../etc/passwd", "%s%n", "\u202e"]))
    if t == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\x00" * 70_000))
    if t == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, 999, 2 ** 31 - 1]))
    raise TypeError(f"field {field.full_name}: unsupported type {t}")


def _value(field, depth: int):
    if field.type == F.TYPE_MESSAGE:
        return message_dicts(field.message_type, depth + 1)
    return _scalar(field)


def _repeated(field, depth: int):
    item = _value(field, depth)
    lists = st.lists(item, max_size=6)
    if field.type not in (F.TYPE_MESSAGE, F.TYPE_STRING, F.TYPE_BYTES):   # prompts of 10,000 edge tokens
        lists = st.one_of(lists, _scalar(field).map(lambda v: [v] * LONG))
    return lists


def message_dicts(descriptor, depth: int = 0):
    """A strategy of {field name: value} for `descriptor` (values: scalars, lists, nested dicts)."""
    if depth >= MAX_DEPTH:
        return st.just({})
    optional = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            optional[field.name] = st.dictionaries(_scalar(key), _value(value, depth), max_size=4)
        elif field.is_repeated:
            optional[field.name] = _repeated(field, depth)
        else:
            optional[field.name] = _value(field, depth)
    return st.fixed_dictionaries({}, optional=optional)


def fill(message, values: dict):
    """Set `values` (from message_dicts) on the protobuf `message`; returns it."""
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(message, name)
            for k, v in value.items():
                if isinstance(v, dict):
                    fill(target[k], v)
                else:
                    target[k] = v
        elif field.is_repeated:
            target = getattr(message, name)
            for v in value:
                if isinstance(v, dict):
                    fill(target.add(), v)
                else:
                    target.append(v)
        elif isinstance(value, dict):
            getattr(message, name).SetInParent()
            fill(getattr(message, name), value)
        else:
            setattr(message, name, value)
    return message


def messages(message_class):
    """A strategy of `message_class` instances (see the module docstring)."""
    return message_dicts(message_class.DESCRIPTOR).map(lambda d: fill(message_class(), d))
