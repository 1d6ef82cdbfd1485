"""The fast path from parsed JSON to typed results: one compiled function per result type.

`models.converter` (cattrs, detailed validation) stays the reference: it explains what is
wrong with a payload. These functions apply the same rules (ints not bools, integral
floats as ints, ids from ints or digit strings, aware timestamps, arrays only where
arrays are expected, extra keys ignored) in one pass with no hook dispatch, and raise a
bare ``TypeError``/``KeyError``/``ValueError`` on the first problem; the caller then
asks the converter for the detailed message. Series reports are built point by point
from their wire shape, each distinct period start parsed once per response.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from datetime import datetime, tzinfo
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin

import attrs

from . import models as m
from .reports import parse_datetime

__all__ = ["compile_structurer", "local_time", "series_decoder", "Structurer"]

Structurer = Callable[[object], Any]
"""Parsed JSON → a typed value, or a plain exception on the first mismatch."""


def _int(value: object) -> int:
    # Reached only when ``type(value) is not int``: bools and non-integral floats fail.
    if type(value) is float and value.is_integer():
        return int(value)
    raise TypeError(f"expected an integer, got {value!r}")


def _float(value: object) -> float:
    if type(value) is int:
        return float(value)
    raise TypeError(f"expected a number, got {value!r}")


def _str(value: object) -> str:
    raise TypeError(f"expected str, got {value!r}")


def _bool(value: object) -> bool:
    raise TypeError(f"expected bool, got {value!r}")


def _id(value: object) -> m.Id:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return m.Id(int(value))
    raise TypeError(f"expected an integer id, got {value!r}")


def _datetime(value: object) -> datetime:
    if isinstance(value, str):
        return _timestamp(value)
    raise TypeError(f"expected an ISO 8601 timestamp, got {value!r}")


@functools.lru_cache(maxsize=8192)
def _timestamp(text: str) -> datetime:
    """`parse_datetime`, cached (datetimes are immutable): nps_volume's days repeat in
    every response, and every token of a backfill asks for the same ones."""
    return parse_datetime(text)


_EXACT: dict[object, tuple[type, Structurer]] = {
    int: (int, _int),
    float: (float, _float),
    str: (str, _str),
    bool: (bool, _bool),
    m.Id: (int, _id),
}
"""Types checked inline by ``type(v) is T``; the function handles every other value."""


def _optional(inner: Structurer) -> Structurer:
    def structure(value: object) -> object:
        return None if value is None else inner(value)

    return structure


def _array(inner: Structurer, as_tuple: bool) -> Structurer:
    def structure(value: object) -> object:
        if type(value) is not list:
            raise TypeError(f"expected an array, got {type(value).__name__}")
        items = [inner(item) for item in value]
        return tuple(items) if as_tuple else items

    return structure


def _mapping(inner: Structurer) -> Structurer:
    def structure(value: object) -> object:
        if type(value) is not dict:
            raise TypeError(f"expected an object, got {type(value).__name__}")
        return {key: inner(item) for key, item in value.items()}

    return structure


def _exact_array(kind: type, fallback: Structurer, as_tuple: bool) -> Structurer:
    """`_array` of a type checked by ``type(v) is kind``: the check is one C loop over the
    items (``issuperset`` stops at the first other type), the items copied as they are."""
    accept = frozenset({kind})

    def structure(value: object) -> object:
        if type(value) is not list:
            raise TypeError(f"expected an array, got {type(value).__name__}")
        if accept.issuperset(map(type, value)):
            return tuple(value) if as_tuple else list(value)
        items = [item if type(item) is kind else fallback(item) for item in value]
        return tuple(items) if as_tuple else items

    return structure


def _exact_mapping(kind: type, fallback: Structurer) -> Structurer:
    """`_mapping` of a type checked by ``type(v) is kind``, checked as `_exact_array`."""
    accept = frozenset({kind})

    def structure(value: object) -> object:
        if type(value) is not dict:
            raise TypeError(f"expected an object, got {type(value).__name__}")
        if accept.issuperset(map(type, value.values())):
            return dict(value)
        return {key: item if type(item) is kind else fallback(item) for key, item in value.items()}

    return structure


def _exact(kind: type, fallback: Structurer) -> Structurer:
    def structure(value: object) -> object:
        return value if type(value) is kind else fallback(value)

    return structure


def compile_structurer(type_: Any) -> Structurer:
    """The fast structure function for ``type_``: an attrs result class, a list or tuple
    of one, or a field type used in `models`."""
    if type_ in _EXACT:
        return _exact(*_EXACT[type_])
    if type_ is datetime:
        return _datetime
    origin, args = get_origin(type_), get_args(type_)
    if origin in (Union, UnionType) and len(args) == 2 and NoneType in args:
        return _optional(compile_structurer(next(a for a in args if a is not NoneType)))
    if origin is list and len(args) == 1:
        return _sequence(args[0], as_tuple=False)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence(args[0], as_tuple=True)
    if origin is dict and args[0] is str:
        if args[1] in _EXACT:
            return _exact_mapping(*_EXACT[args[1]])
        return _mapping(compile_structurer(args[1]))
    if isinstance(type_, type) and attrs.has(type_):
        return _record(type_)
    raise TypeError(f"no fast structure function for {type_!r}")


def _sequence(item: Any, as_tuple: bool) -> Structurer:
    """A JSON array of ``item`` as a list (or a tuple)."""
    if item in _EXACT:
        return _exact_array(*_EXACT[item], as_tuple=as_tuple)
    if isinstance(item, type) and attrs.has(item):
        return _records(item, as_tuple)
    return _array(compile_structurer(item), as_tuple=as_tuple)


def _record(cls: type) -> Structurer:
    """Generated code, one statement per field: ``type(v) is int`` inline for scalars,
    a call for the rest, then the instance made from its slot setters (`_setters`) or,
    for a class that validates its fields, by calling it positionally."""
    scope: dict[str, object] = {"cls": cls, "TypeError": TypeError, "new": object.__new__}
    lines = ["def structure(d):", *_record_body(cls, scope, "    ", "return ")]
    return _compiled(lines, scope, cls)


def _records(cls: type, as_tuple: bool) -> Structurer:
    """`_array` of `_record`, the record's statements inlined in the loop (no call per
    item)."""
    scope: dict[str, object] = {"cls": cls, "TypeError": TypeError, "new": object.__new__}
    lines = [
        "def structure(items):",
        "    if type(items) is not list:",
        "        raise TypeError('expected an array, got ' + type(items).__name__)",
        "    out = []",
        "    append = out.append",
        "    for d in items:",
        *_record_body(cls, scope, "        ", "append("),
        "    return tuple(out)" if as_tuple else "    return out",
    ]
    return _compiled(lines, scope, cls)


def _record_body(cls: type, scope: dict[str, object], indent: str, finish: str) -> list[str]:
    """The statements that structure ``d`` into ``cls``; the instance made goes to
    ``finish`` (``"return "``, or a call such as ``"append("``)."""
    close = ")" if finish.endswith("(") else ""
    hints = typing.get_type_hints(cls)
    lines = [
        "if type(d) is not dict:",
        f"    raise TypeError('{cls.__name__}: expected an object, got ' + type(d).__name__)",
    ]
    names = []
    for i, field in enumerate(attrs.fields(cls)):
        hint = hints[field.name]
        name = f"v{i}"
        names.append(name)
        lines.append(f"{name} = d[{field.name!r}]")
        if hint in _EXACT:
            kind, fallback = _EXACT[hint]
            scope[f"t{i}"], scope[f"f{i}"] = kind, fallback
            lines.append(f"if type({name}) is not t{i}: {name} = f{i}({name})")
        else:
            scope[f"f{i}"] = compile_structurer(hint)
            lines.append(f"{name} = f{i}({name})")
    try:
        setters = _setters(cls)
    except TypeError:
        lines.append(f"{finish}cls({', '.join(names)}){close}")
    else:
        lines.append("made = new(cls)")
        for i, (name, setter) in enumerate(zip(names, setters, strict=True)):
            scope[f"s{i}"] = setter
            lines.append(f"s{i}(made, {name})")
        lines.append(f"{finish}made{close}")
    return [indent + line for line in lines]


def _compiled(lines: list[str], scope: dict[str, object], cls: type) -> Structurer:
    exec(compile("\n".join(lines), f"<fast structure {cls.__name__}>", "exec"), scope)
    structure = scope["structure"]
    assert callable(structure)
    return structure


# -- series reports, from their wire shape -----------------------------------------------


def local_time(text: object, tz: tzinfo) -> datetime:
    """A period start, ``"YYYY-MM-DD HH:MM"`` with no offset, read in ``tz``. (An offset,
    should the server ever send one, is kept.) fromisoformat is ~60x faster than strptime
    and accepts the reference's forms on Python 3.10+."""
    if not isinstance(text, str):
        raise TypeError(f"expected a 'YYYY-MM-DD HH:MM' string, got {text!r}")
    return _period_start(text, tz)


@functools.lru_cache(maxsize=8192)
def _period_start(text: str, tz: tzinfo) -> datetime:
    """Cached across responses: every token of a backfill asks for the same periods."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"unrecognised period start {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=tz)


def _setters(cls: type) -> tuple[Callable[[object, object], None], ...]:
    """The slot setters of a frozen, slotted attrs class with neither validators nor
    converters, in field order: a point is built as ``object.__new__(cls)`` plus one
    setter call per field, 40 % cheaper than the generated ``__init__`` (which does the
    same through ``object.__setattr__``)."""
    fields = attrs.fields(cls)
    if any(f.validator is not None or f.converter is not None for f in fields) or hasattr(
        cls, "__attrs_post_init__"
    ):
        raise TypeError(f"{cls.__name__} validates its fields: build it with its __init__")
    slots = vars(cls)
    if any(not hasattr(slots.get(f.name), "__set__") for f in fields):
        raise TypeError(f"{cls.__name__} is not slotted: build it with its __init__")
    return tuple(slots[f.name].__set__ for f in fields)


_PERIODS: dict[tzinfo, dict[str, datetime]] = {}
"""Parsed period starts by zone, then by text: each response of a series repeats the
periods of the last (every state's series the same ones), every token of a backfill
asks for the same. One dict lookup a point, where a cached call costs several."""

_PERIODS_MAX = 8192


def _periods(tz: tzinfo) -> dict[str, datetime]:
    """The period starts parsed so far in ``tz`` (`_PERIODS`)."""
    found = _PERIODS.get(tz)
    if found is None:
        if len(_PERIODS) >= 64:
            _PERIODS.clear()
        found = _PERIODS[tz] = {}
    return found


def _new_period(periods: dict[str, datetime], text: object, tz: tzinfo) -> datetime:
    """``text`` parsed (`local_time`) and kept in ``periods``."""
    moment = local_time(text, tz)
    if len(periods) >= _PERIODS_MAX:
        periods.clear()
    periods[text] = moment  # type: ignore[index]  # local_time refused all but a str
    return moment


_STATE, _STATE_VALUE, _STATE_DATE = _setters(m.StatePoint)
_VALUE, _VALUE_DATE = _setters(m.ValuePoint)

# The loops below index without checking types first: subscripting a list, a string, a
# number or None with a key raises TypeError, and an unhashable period text raises
# TypeError at the cache lookup, so a wrong shape still fails on the first bad point.


def _value_points(series: object, tz: tzinfo) -> tuple[m.ValuePoint, ...]:
    if type(series) is not list:
        raise TypeError(f"expected a list of points, got {type(series).__name__}")
    cls, new, set_value, set_date = m.ValuePoint, object.__new__, _VALUE, _VALUE_DATE
    periods = _periods(tz)
    out = []
    for point in series:
        text = point["date_range"]["date_from"]
        moment = periods.get(text)
        if moment is None:
            moment = _new_period(periods, text, tz)
        value = point["value"]
        if type(value) is not float:
            value = float(value) if type(value) is int else _float(value)
        made = new(cls)
        set_value(made, value)
        set_date(made, moment)
        out.append(made)
    return tuple(out)


def _object(payload: object, key: str) -> object:
    if type(payload) is not dict:
        raise TypeError(f"expected an object with {key!r}, got {type(payload).__name__}")
    return payload[key]


def _states_volume(payload: object, tz: tzinfo) -> m.StatesVolume:
    if type(payload) is not dict:
        raise TypeError("expected an object keyed by workflow state")
    cls, new = m.StatePoint, object.__new__
    periods = _periods(tz)
    set_state, set_value, set_date = _STATE, _STATE_VALUE, _STATE_DATE
    states: dict[str, tuple[m.StatePoint, ...]] = {}
    for key, series in payload.items():
        if type(series) is not list:
            raise TypeError(f"expected a list of points, got {type(series).__name__}")
        out = []
        for point in series:
            text = point["date_range"]["date_from"]
            moment = periods.get(text)
            if moment is None:
                moment = _new_period(periods, text, tz)
            state, value = point["state"], point["value"]
            if type(state) is not str:
                state = _str(state)
            if type(value) is not int:
                value = _int(value)
            made = new(cls)
            set_state(made, state)
            set_value(made, value)
            set_date(made, moment)
            out.append(made)
        states[key] = tuple(out)
    return m.StatesVolume(states)


def _response_volume(payload: object, tz: tzinfo) -> m.ResponseVolume:
    return m.ResponseVolume(_value_points(_object(payload, "avg_response_time"), tz))


def _case_volume(payload: object, tz: tzinfo) -> m.CaseVolume:
    return m.CaseVolume(_value_points(_object(payload, "open"), tz))


SeriesDecoder = Callable[[object, tzinfo], Any]

_SERIES: dict[type, SeriesDecoder] = {
    m.StatesVolume: _states_volume,
    m.ResponseVolume: _response_volume,
    m.CaseVolume: _case_volume,
}


def series_decoder(result: object) -> SeriesDecoder | None:
    """The one-pass decoder of a series result type whose wire shape differs from its
    model (points under ``date_range``), or None for the others."""
    return _SERIES.get(result) if isinstance(result, type) else None
