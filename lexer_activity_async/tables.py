"""Tidy rows per report kind and typed columns per export kind: a versioned column
schema per table and a pure function turning a typed report result into rows (one per
label, window and period or entity).

Schemas are plain column specs (no pyarrow needed); timestamps are aware UTC datetimes.
Column descriptions follow the API reference's field definitions (corrected where the
reference contradicts itself; see the README's "Known API ambiguities").
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime, timezone

import attrs

from . import models as m
from .exceptions import ValidationError
from .kinds import ReportResult
from .reports import ExportKind, ReportType

__all__ = [
    "ColumnType",
    "Column",
    "TableSchema",
    "SCHEMAS",
    "EXPORT_SCHEMAS",
    "Row",
    "schema_for",
    "export_schema_for",
    "to_rows",
]

Row = dict[str, object]


class ColumnType(str, enum.Enum):
    """A column's logical type; ``timestamp`` is always timezone-aware UTC."""

    STRING = "string"
    INT64 = "int64"
    FLOAT64 = "float64"
    BOOL = "bool"
    TIMESTAMP = "timestamp"


@attrs.frozen
class Column:
    name: str
    type: ColumnType
    description: str
    nullable: bool = False


@attrs.frozen
class TableSchema:
    """One report or export kind's table: its columns in order, its primary key and its
    version (raised whenever a column is added, removed, renamed or retyped)."""

    kind: ReportType | ExportKind
    version: int
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]

    @property
    def table(self) -> str:
        name: str = self.kind.value
        return name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def data_columns(self) -> tuple[Column, ...]:
        """The columns after label and window bounds: for an export, the CSV's own."""
        return self.columns[len(_BASE) :]


S, N, F, B, T = (
    ColumnType.STRING,
    ColumnType.INT64,
    ColumnType.FLOAT64,
    ColumnType.BOOL,
    ColumnType.TIMESTAMP,
)
_BASE = (
    Column("label", S, "the token's label (in the backfill spec or the dlt source)"),
    Column("window_start", T, "the requested window's start (inclusive), UTC"),
    Column("window_end", T, "the requested window's end (exclusive), UTC"),
)
_BASE_KEY = ("label", "window_start", "window_end")
_FORM = (Column("form_id", N, "the NPS survey (form id from /v1/forms) the report is for"),)

# Field definitions of the API reference, by field name. Where one name means different
# things in different reports, `_fields` takes an override.
_WAIT, _AGENT = "customer wait time (message received to response)", "agent response time"
_DESCRIPTIONS: Mapping[str, str] = {
    "total_volume": "total messages handled",
    "total_responded_to": "messages responded to",
    "broke_sla": "messages that exceeded the customer SLA time",
    "broke_action_sla": "messages that exceeded the agent handle SLA time",
    "avg_response_time": f"average {_WAIT}, seconds",
    "min_response_time": f"minimum {_WAIT}, seconds",
    "median_response_time": f"median {_WAIT}, seconds",
    "max_response_time": f"maximum {_WAIT}, seconds",
    "avg_action_response_time": f"average {_AGENT} (assigned to response), seconds",
    "min_action_response_time": f"minimum {_AGENT} (assigned to response), seconds",
    "median_action_response_time": f"median {_AGENT} (assigned to response), seconds",
    "max_action_response_time": f"maximum {_AGENT} (assigned to response), seconds",
    "avg_response_time_min": f"average {_WAIT}, minutes",
    "median_response_time_min": f"median {_WAIT}, minutes",
    "avg_action_response_time_min": f"average {_AGENT}, minutes",
    "median_action_response_time_min": f"median {_AGENT}, minutes",
    "classification_id": "the classification's unique id",
    "classification": "the classification's name",
    "state": "workflow state (or all_states: every state)",
    "user_id": "the agent's unique user id",
    "first_name": "the agent's first name",
    "last_name": "the agent's last name",
    "mentions_assigned": "messages assigned to the agent",
    "responded_to": "messages the agent responded to",
    "responded_to_in_private": "messages the agent responded to in private messages",
    "fraction_responded_to": "responded_to / mentions_assigned",
    "fraction_responded_to_in_private": (
        "responded_to_in_private / responded_to (as the API computes it; the reference "
        "says / mentions_assigned)"
    ),
    "fraction_broke_sla": "broke_sla / responded_to",
    "fraction_broke_action_sla": "broke_action_sla / responded_to",
    "total_cases": "cases closed in the window",
    "first_reply_time": "average case first reply time, seconds",
    "resolution_time": "average case resolution time, seconds",
    "median_first_reply_time": "median case first reply time, seconds",
    "median_resolution_time": "median case resolution time, seconds",
    "agent_interactions": "average agent replies per case",
    "agents_involved": "average agents responding per case",
    "total_sent": "surveys sent",
    "total_received": "responses received",
    "total_promoters": "responses scoring 9-10 (promoters)",
    "total_passives": "responses scoring 7-8 (passives)",
    "total_detractors": "responses scoring 0-6 (detractors)",
    "nps_score": (
        "Net Promoter Score: % promoters - % detractors (the reference calls it the average score)"
    ),
}


def _fields(
    cls: type,
    kinds: Mapping[str, ColumnType],
    skip: tuple[str, ...] = (),
    described: Mapping[str, str] | None = None,
) -> tuple[Column, ...]:
    """A column per attrs field of ``cls``: typed by ``kinds`` (else by the field's
    annotation), described by ``described`` or `_DESCRIPTIONS` (every field must be)."""
    out = []
    for field in attrs.fields(cls):
        if field.name in skip:
            continue
        kind = kinds.get(field.name, F if field.type in ("float", float) else N)
        text = (described or {}).get(field.name) or _DESCRIPTIONS[field.name]
        out.append(Column(field.name, kind, text))
    return tuple(out)


def _schema(
    kind: ReportType, columns: tuple[Column, ...], key: tuple[str, ...] = ()
) -> TableSchema:
    return TableSchema(kind, 1, _BASE + columns, _BASE_KEY + key)


_PERIOD = Column(
    "period_start", T, "the period's start, UTC: a day, or an hour for windows under 4 days"
)
_NAMES = {"first_name": S, "last_name": S, "user_id": N, "classification": S, "state": S}
_CASE_CLASS = {"volume": "cases with this classification (each case counted once)"}

SCHEMAS: Mapping[ReportType, TableSchema] = {
    s.kind: s  # type: ignore[misc]  # every kind here is a ReportType
    for s in (
        _schema(ReportType.SUMMARY, _fields(m.Summary, {})),
        _schema(
            ReportType.STATES_VOLUME,
            (
                Column("state", S, "workflow state"),
                _PERIOD,
                Column("value", N, "messages in this state in the period"),
            ),
            ("state", "period_start"),
        ),
        _schema(
            ReportType.WORKFLOW_STATES,
            (
                Column("state", S, "workflow state"),
                Column("volume", N, "messages in this state"),
            ),
            ("state",),
        ),
        _schema(
            ReportType.CLASSIFICATIONS,
            _fields(
                m.Classification,
                _NAMES,
                described={"volume": "messages with this classification in this state"},
            ),
            ("classification_id", "state"),
        ),
        _schema(
            ReportType.RESPONSE_VOLUME,
            (
                _PERIOD,
                Column(
                    "avg_response_time",
                    F,
                    "average response time of the period's messages, as sent (documented "
                    "as minutes, but the values look like seconds)",
                ),
            ),
            ("period_start",),
        ),
        _schema(ReportType.USER_SUMMARY, _fields(m.UserSummary, _NAMES), ("user_id",)),
        _schema(
            ReportType.USER_VOLUME,
            (
                *_fields(m.UserVolume, _NAMES, skip=("states",)),
                Column(
                    "state",
                    S,
                    "the messages' current workflow state (or all_states, all_closed_states)",
                ),
                Column("volume", N, "the agent's messages currently in that state"),
            ),
            ("user_id", "state"),
        ),
        _schema(ReportType.CASE_SUMMARY, _fields(m.CaseSummary, {"total_cases": N})),
        _schema(
            ReportType.CASE_VOLUME,
            (
                Column("period_start", T, "the day's start, UTC"),
                Column("open", F, "cases active (open) on the day"),
            ),
            ("period_start",),
        ),
        _schema(
            ReportType.CASE_CLASSIFICATIONS,
            _fields(m.CaseClassification, _NAMES, described=_CASE_CLASS),
            ("classification_id",),
        ),
        _schema(ReportType.NPS_SUMMARY, _FORM + _fields(m.NpsSummary, {}), ("form_id",)),
        _schema(
            ReportType.NPS_VOLUME,
            (
                *_FORM,
                Column("period_start", T, "the local day's start (of the request's offset), UTC"),
                *_fields(m.NpsSummary, {}),
            ),
            ("form_id", "period_start"),
        ),
    )
}
"""Every report kind's table schema, by report type."""


def _export(kind: ExportKind, columns: tuple[Column, ...]) -> TableSchema:
    """An export's table: label and window bounds, then the CSV's columns in file order;
    keyed by the window and the CSV's first column (the row's id)."""
    return TableSchema(kind, 1, _BASE + columns, (*_BASE_KEY, columns[0].name))


def _text(name: str, description: str) -> Column:
    return Column(name, S, description, nullable=True)


_AGENT_NAME = "the agent's full name"
EXPORT_SCHEMAS: Mapping[ExportKind, TableSchema] = {
    s.kind: s  # type: ignore[misc]  # every kind here is an ExportKind
    for s in (
        _export(
            ExportKind.CASE_DETAILS,
            (
                Column("case_id", N, "the case's unique id"),
                Column("created_at", T, "when the case opened (the first customer message), UTC"),
                Column("closed_at", T, "when the case closed, UTC", nullable=True),
                Column("first_reply_time", F, "created to first agent reply, seconds", True),
                Column("resolution_time", F, "created to last agent reply, seconds", True),
                _text("agent", f"{_AGENT_NAME}: the first to reply"),
                Column("agent_interactions", N, "agent replies in the case", nullable=True),
                _text("classification", "the case's classification names, joined by '; '"),
                _text("channel", "the channel the case came in on"),
                _text("customer", "the customer's handle"),
                _text("notes", "agents' notes (free text)"),
            ),
        ),
        _export(
            ExportKind.NPS_SUBMISSIONS,
            (
                Column("submission_id", N, "the submission's unique id"),
                Column("submitted_at", T, "when the survey was answered, UTC"),
                Column("form_id", N, "the NPS survey (form id)"),
                Column("score", N, "the score given, 0-10"),
                _text("category", "promoter (9-10), passive (7-8) or detractor (0-6)"),
                _text("customer", "the customer's handle"),
                _text("comment", "the customer's comment (free text)"),
            ),
        ),
        _export(
            ExportKind.MENTION_SLA_EXPORT,
            (
                Column("mention_id", N, "the message's unique id"),
                Column("received_at", T, "when the message arrived, UTC"),
                Column("responded_at", T, "when it was responded to, UTC (null: not yet)", True),
                _text("agent", f"{_AGENT_NAME} it is assigned to (null: unassigned)"),
                Column("customer_wait_time", F, f"{_WAIT}, seconds (null: unanswered)", True),
                Column("agent_response_time", F, f"{_AGENT}, seconds (null: unanswered)", True),
                _text("state", "the message's workflow state at export time"),
                _text("classification", "the message's classification names, joined by '; '"),
                _text("channel", "the channel the message came in on"),
                _text("notes", "agents' notes (free text)"),
            ),
        ),
    )
}
"""Every export kind's table schema (typed columns of its CSV), by export kind. The
reference publishes no export columns: these are the files the sandbox writes."""


def schema_for(kind: ReportType) -> TableSchema:
    """The table schema of ``kind``."""
    return SCHEMAS[kind]


def export_schema_for(kind: ExportKind | str) -> TableSchema:
    """The table schema of export ``kind``."""
    return EXPORT_SCHEMAS[ExportKind(kind)]


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
