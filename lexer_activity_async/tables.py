"""Tidy rows per report kind: a versioned column schema per kind and a pure function
turning a typed result into rows (one per label, window and period or entity).

Schemas are plain column specs (no pyarrow needed); timestamps are aware UTC datetimes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime, timezone

import attrs

from . import models as m
from .exceptions import ValidationError
from .kinds import ReportResult
from .reports import ReportType

__all__ = ["ColumnType", "Column", "TableSchema", "SCHEMAS", "Row", "schema_for", "to_rows"]

Row = dict[str, object]


class ColumnType(str, enum.Enum):
    """A column's logical type; ``timestamp`` is always timezone-aware UTC."""

    STRING = "string"
    INT64 = "int64"
    FLOAT64 = "float64"
    TIMESTAMP = "timestamp"


@attrs.frozen
class Column:
    name: str
    type: ColumnType
    description: str
    nullable: bool = False


@attrs.frozen
class TableSchema:
    """One report kind's table: its columns in order and its primary key."""

    kind: ReportType
    version: int
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]

    @property
    def table(self) -> str:
        return self.kind.value

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


S, N, F, T = ColumnType.STRING, ColumnType.INT64, ColumnType.FLOAT64, ColumnType.TIMESTAMP
_BASE = (
    Column("label", S, "the token's label in the backfill"),
    Column("window_start", T, "the requested window's start (inclusive), UTC"),
    Column("window_end", T, "the requested window's end (exclusive), UTC"),
)
_BASE_KEY = ("label", "window_start", "window_end")
_FORM = (Column("form_id", N, "the NPS survey (form) the report is for"),)


def _fields(
    cls: type, kinds: Mapping[str, ColumnType], skip: tuple[str, ...] = ()
) -> tuple[Column, ...]:
    out = []
    for field in attrs.fields(cls):
        if field.name in skip:
            continue
        kind = kinds.get(field.name, F if field.type in ("float", float) else N)
        out.append(Column(field.name, kind, f"`{field.name}` as the API reports it"))
    return tuple(out)


def _schema(
    kind: ReportType, columns: tuple[Column, ...], key: tuple[str, ...] = ()
) -> TableSchema:
    return TableSchema(kind, 1, _BASE + columns, _BASE_KEY + key)


_PERIOD = Column("period_start", T, "the period's (day's or hour's) start, UTC")
_NAMES = {"first_name": S, "last_name": S, "user_id": N, "classification": S, "state": S}

SCHEMAS: Mapping[ReportType, TableSchema] = {
    s.kind: s
    for s in (
        _schema(ReportType.SUMMARY, _fields(m.Summary, {})),
        _schema(
            ReportType.STATES_VOLUME,
            (Column("state", S, "workflow state"), _PERIOD, Column("value", N, "messages")),
            ("state", "period_start"),
        ),
        _schema(
            ReportType.WORKFLOW_STATES,
            (Column("state", S, "workflow state"), Column("volume", N, "messages")),
            ("state",),
        ),
        _schema(
            ReportType.CLASSIFICATIONS,
            _fields(m.Classification, _NAMES),
            ("classification_id", "state"),
        ),
        _schema(
            ReportType.RESPONSE_VOLUME,
            (_PERIOD, Column("avg_response_time", F, "average response time, as sent")),
            ("period_start",),
        ),
        _schema(ReportType.USER_SUMMARY, _fields(m.UserSummary, _NAMES), ("user_id",)),
        _schema(
            ReportType.USER_VOLUME,
            (
                *_fields(m.UserVolume, _NAMES, skip=("states",)),
                Column("state", S, "workflow state (or all_states, all_closed_states)"),
                Column("volume", N, "the agent's messages in that state"),
            ),
            ("user_id", "state"),
        ),
        _schema(ReportType.CASE_SUMMARY, _fields(m.CaseSummary, {"total_cases": N})),
        _schema(
            ReportType.CASE_VOLUME, (_PERIOD, Column("open", F, "open cases")), ("period_start",)
        ),
        _schema(
            ReportType.CASE_CLASSIFICATIONS,
            _fields(m.CaseClassification, _NAMES),
            ("classification_id",),
        ),
        _schema(ReportType.NPS_SUMMARY, _FORM + _fields(m.NpsSummary, {}), ("form_id",)),
        _schema(
            ReportType.NPS_VOLUME,
            (
                *_FORM,
                Column("period_start", T, "the local day's start, UTC"),
                *_fields(m.NpsSummary, {}),
            ),
            ("form_id", "period_start"),
        ),
    )
}
"""Every report kind's table schema, by report type."""


def schema_for(kind: ReportType) -> TableSchema:
    """The table schema of ``kind``."""
    return SCHEMAS[kind]


def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(f"{name} must be timezone-aware, got {value.isoformat()}")
    return value.astimezone(timezone.utc)


def _flat(obj: attrs.AttrsInstance, skip: tuple[str, ...] = ()) -> Row:
    return {f.name: getattr(obj, f.name) for f in attrs.fields(type(obj)) if f.name not in skip}


def to_rows(
    kind: ReportType,
    result: ReportResult,
    *,
    label: str,
    window_start: datetime,
    window_end: datetime,
    form: int | None = None,
) -> list[Row]:
    """Rows of ``result`` (the typed answer for ``kind`` over one window), keyed by the
    schema's columns in order. NPS kinds need ``form``."""
    base: Row = {
        "label": label,
        "window_start": _utc(window_start, "window_start"),
        "window_end": _utc(window_end, "window_end"),
    }
    if kind.needs_form:
        if form is None:
            raise ValidationError(f"{kind.value} rows need the form id")
        base["form_id"] = form
    body: list[Row]
    r: object = result
    if isinstance(r, m.StatesVolume):
        body = [
            {"state": p.state, "period_start": _utc(p.date_from, "date_from"), "value": p.value}
            for points in r.states.values()
            for p in points
        ]
    elif isinstance(r, m.ResponseVolume):
        body = [
            {"period_start": _utc(p.date_from, "date_from"), "avg_response_time": p.value}
            for p in r.avg_response_time
        ]
    elif isinstance(r, m.CaseVolume):
        body = [{"period_start": _utc(p.date_from, "date_from"), "open": p.value} for p in r.open]
    elif isinstance(r, list):
        body = []
        for item in r:
            if isinstance(item, m.UserVolume):
                head = _flat(item, ("states",))
                body.extend({**head, "state": s, "volume": v} for s, v in item.states.items())
            elif isinstance(item, m.NpsDay):
                body.append({"period_start": _utc(item.date, "date"), **_flat(item.data)})
            else:
                body.append(_flat(item))
    else:
        body = [_flat(r)]  # type: ignore[arg-type]  # an attrs result
    names = schema_for(kind).names
    rows = [{**base, **b} for b in body]
    for row in rows:
        if tuple(row) != names:
            raise ValidationError(f"a {type(result).__name__} is not a {kind.value} result")
    return rows
