"""The rows module: every kind's reference example payload turns into rows matching its schema."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lexer_activity_async import models as m
from lexer_activity_async.exceptions import ValidationError
from lexer_activity_async.reports import ReportType
from lexer_activity_async.tables import SCHEMAS, ColumnType, to_rows
from lexer_activity_async.wire import decode_report

EXAMPLES = json.loads(Path(__file__).with_name("reference_examples.json").read_text())
TZ = timezone(timedelta(hours=11))
START = datetime(2018, 4, 1, tzinfo=TZ)
END = datetime(2018, 5, 1, tzinfo=TZ)
_PY = {ColumnType.STRING: str, ColumnType.INT64: int, ColumnType.FLOAT64: float}


def _payloads() -> dict[str, object]:
    out: dict[str, object] = {}
    for example in EXAMPLES["examples"]:
        for step in example["steps"]:
            if '"type": "' in step["curl"] and step.get("documented") is not None:
                name = step["curl"].split('"type": "')[1].split('"')[0]
                if example["section"] == "Workflow States":
                    name = ReportType.WORKFLOW_STATES.value
                out.setdefault(name, step["documented"])
    return out


PAYLOADS = _payloads()


@pytest.mark.parametrize("kind", list(SCHEMAS), ids=lambda k: k.value)
def test_reference_example_rows_match_schema(kind: ReportType) -> None:
    payload = PAYLOADS[kind.value]
    result = decode_report(kind, 200, json.dumps(payload).encode(), tz=TZ)
    rows = to_rows(kind, result, label="acme", window_start=START, window_end=END, form=123)
    schema = SCHEMAS[kind]
    assert rows
    keys = set()
    for row in rows:
        assert tuple(row) == schema.names
        assert row["label"] == "acme"
        start = row["window_start"]
        assert isinstance(start, datetime)
        assert start == START
        assert start.tzinfo is timezone.utc
        for column in schema.columns:
            value = row[column.name]
            if column.type is ColumnType.TIMESTAMP:
                assert isinstance(value, datetime)
                assert value.tzinfo is timezone.utc
            else:
                assert isinstance(value, _PY[column.type]), (column.name, value)
        keys.add(tuple(row[k] for k in schema.primary_key))
    assert len(keys) == len(rows)  # the primary key identifies each row


def test_states_volume_periods_in_utc() -> None:
    payload = PAYLOADS["states_volume"]
    result = decode_report(ReportType.STATES_VOLUME, 200, json.dumps(payload).encode(), tz=TZ)
    rows = to_rows(ReportType.STATES_VOLUME, result, label="a", window_start=START, window_end=END)
    first = rows[0]
    assert first["state"] == "closed"
    assert first["value"] == 174
    assert first["period_start"] == datetime(2018, 4, 26, 13, tzinfo=timezone.utc)


def test_user_volume_is_long_per_state() -> None:
    result = [m.UserVolume(m.Id(1), "J", "P", {"new": 2, "closed": 3})]
    rows = to_rows(ReportType.USER_VOLUME, result, label="a", window_start=START, window_end=END)
    assert [(r["state"], r["volume"]) for r in rows] == [("new", 2), ("closed", 3)]


def test_bad_input() -> None:
    summary = decode_report(
        ReportType.SUMMARY, 200, json.dumps(PAYLOADS["summary"]).encode(), tz=TZ
    )
    with pytest.raises(ValidationError, match="timezone-aware"):
        to_rows(
            ReportType.SUMMARY,
            summary,
            label="a",
            window_start=START.replace(tzinfo=None),
            window_end=END,
        )
    with pytest.raises(ValidationError, match="not a case_summary"):
        to_rows(ReportType.CASE_SUMMARY, summary, label="a", window_start=START, window_end=END)
    with pytest.raises(ValidationError, match="form id"):
        to_rows(ReportType.NPS_SUMMARY, summary, label="a", window_start=START, window_end=END)
