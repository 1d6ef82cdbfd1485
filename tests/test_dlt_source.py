"""The dlt source: a real dlt pipeline into DuckDB against the sandbox, loaded twice."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pytest
from conftest import NOW, TOKEN_A, TOKEN_B

from lexer_activity_async import exceptions as exc
from lexer_activity_async import tables
from lexer_activity_async.dlt import dlt_columns, lexer_source
from lexer_activity_async.exports import PollPolicy
from lexer_activity_async.reports import ReportType
from lexer_activity_async.sandbox import Sandbox

REPORTS = ("summary", "states_volume", "user_summary", "nps_volume")
EXPORTS = ("case_details", "nps_submissions", "mention_sla_export")
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
FIRST_RUN = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)  # in June's window
SECOND_RUN = datetime(2026, 6, 10, 12, tzinfo=timezone.utc)
LOOKBACK = timedelta(days=3)


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """dlt would otherwise report usage over the network."""
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")


def _load(sb: Sandbox, tmp: Path, name: str, at: datetime) -> tuple[int, int]:
    """Run the pipeline ``name`` (its state and database under ``tmp``) at ``at``; the
    requests the sandbox saw during the run but export status polls (their number depends
    on timing), and the export jobs started."""

    def counted() -> tuple[int, int]:
        polls = sum(sb.stats.status_polls.values())
        return sum(sb.stats.requests.values()) - polls, sb.stats.exports_started

    before = counted()
    pipeline = dlt.pipeline(
        pipeline_name=name,
        destination=dlt.destinations.duckdb(str(tmp / f"{name}.duckdb")),
        dataset_name="lexer",
        pipelines_dir=str(tmp / "pipelines"),
    )
    source = lexer_source(
        {"team-a": TOKEN_A, "team-b": TOKEN_B},
        date_from=START,
        reports=REPORTS,
        exports=EXPORTS,
        poll=PollPolicy(first_delay=0.02, cap=0.05),
        nps_form=55,
        lookback=LOOKBACK,
        api_url=sb.api_url,
        status_url=sb.status_url,
        # Three loads of 2 tokens: more than the API's 100 per 5 minutes of one token.
        max_requests=sb.config.max_requests,
        now=lambda: at,
    )
    pipeline.run(source)
    after = counted()
    return after[0] - before[0], after[1] - before[1]


def _schema(kind: str) -> tables.TableSchema:
    if kind in EXPORTS:
        return tables.export_schema_for(kind)
    return tables.schema_for(ReportType(kind))


def _table(tmp: Path, name: str, kind: str) -> list[tuple[Any, ...]]:
    schema = _schema(kind)
    columns = ", ".join(schema.names)
    with duckdb.connect(str(tmp / f"{name}.duckdb"), read_only=True) as db:
        rows = db.execute(f"SELECT {columns} FROM lexer.{schema.table} ORDER BY ALL").fetchall()
    return rows


def test_two_loads_leave_no_duplicates_and_the_second_spends_only_the_lookback(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox]
) -> None:
    sb = sandbox_in_thread(now=lambda: NOW)
    requests, jobs = _load(sb, tmp_path, "incremental", FIRST_RUN)
    # 2 tokens x 6 windows (January to the June window holding now) x (4 reports + 3
    # exports), an export's request being its start (its status polls not counted).
    assert requests == 2 * 6 * (len(REPORTS) + len(EXPORTS))
    assert jobs == 2 * 6 * len(EXPORTS)
    requests, jobs = _load(sb, tmp_path, "incremental", SECOND_RUN)
    # The last run ended 1 June 12:00; 3 days before is in May: May's and June's windows.
    assert requests == 2 * 2 * (len(REPORTS) + len(EXPORTS))
    assert jobs == 2 * 2 * len(EXPORTS)
    assert sb.stats.rate_limited == 0

    # One load at the second moment: the same rows, so reloading replaced whole windows.
    _load(sb, tmp_path, "one-shot", SECOND_RUN)
    for kind in REPORTS + EXPORTS:
        rows = _table(tmp_path, "incremental", kind)
        schema = _schema(kind)
        key = [schema.names.index(column) for column in schema.primary_key]
        assert len({tuple(row[i] for i in key) for row in rows}) == len(rows), kind
        assert rows == _table(tmp_path, "one-shot", kind), kind
        assert rows, kind
    labels = {row[0] for row in _table(tmp_path, "incremental", "summary")}
    assert labels == {"team-a", "team-b"}
    # June's export rows were refetched up to the second run: more of them than the first
    # run's, none twice (the window was replaced, not appended to).
    june = datetime(2026, 6, 1, tzinfo=timezone.utc)
    cases = [r for r in _table(tmp_path, "incremental", "mention_sla_export") if r[1] == june]
    assert cases
    assert max(r[4] for r in cases) > FIRST_RUN  # received_at after the first run's end


def test_export_tables_are_typed_in_duckdb(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox]
) -> None:
    sb = sandbox_in_thread(now=lambda: NOW)
    _load(sb, tmp_path, "typed", FIRST_RUN)
    with duckdb.connect(str(tmp_path / "typed.duckdb"), read_only=True) as db:
        types = dict(
            db.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'lexer' AND table_name = 'case_details'"
            ).fetchall()
        )
    assert types["case_id"] == "BIGINT"
    assert types["created_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["first_reply_time"] == "DOUBLE"
    assert types["notes"] == "VARCHAR"


def test_columns_are_typed_from_the_table_schemas() -> None:
    schema = tables.schema_for(ReportType.STATES_VOLUME)
    hints = dlt_columns(schema)
    assert list(hints) == list(schema.names)
    assert hints["window_start"]["data_type"] == "timestamp"
    assert hints["window_start"]["timezone"] is True
    assert hints["value"]["data_type"] == "bigint"
    assert hints["label"]["data_type"] == "text"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reports": ["bogus"]}, "unknown report 'bogus'"),
        ({"reports": []}, "at least one report"),
        ({"exports": ["bogus"]}, "unknown export 'bogus'"),
        ({"exports": ["case_details", "case_details"]}, "repeat"),
        ({"reports": [], "exports": ["nps_submissions"]}, "form"),
        ({"reports": ["nps_volume"]}, "form"),
        ({"date_from": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"window_months": 13}, "window_months"),
        ({"lookback": timedelta(days=-1)}, "lookback"),
        ({"tokens": {}}, "at least one"),
        ({"tokens": {"a": " "}}, "token of 'a' is empty"),
        ({"api_url": "ftp://example"}, "api_url"),
    ],
)
def test_bad_options_are_refused_before_any_request(options: dict[str, Any], message: str) -> None:
    base = {"tokens": {"a": TOKEN_A}, "date_from": START, "reports": ["summary"]}
    arguments: dict[str, Any] = {**base, **options}
    tokens = arguments.pop("tokens")
    with pytest.raises((exc.ValidationError, exc.ConfigurationError), match=message):
        lexer_source(tokens, **arguments)
    assert TOKEN_A not in message


def test_without_the_extra_the_import_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "dlt", None)  # as if dlt were not installed
    monkeypatch.delitem(sys.modules, "lexer_activity_async.dlt")
    with pytest.raises(ImportError, match=r"pip install 'lexer-activity-async\[dlt\]'"):
        importlib.import_module("lexer_activity_async.dlt")


def test_export_resources_stay_within_the_token_budget(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox]
) -> None:
    """Export jobs, their polls and the reports of one token share its limiter: with a
    budget of 6 per 0.5 s the sandbox never sees more, and never answers 429."""
    budget, window = 6, 0.5
    sb = sandbox_in_thread(now=lambda: NOW, max_requests=budget, window=window)
    pipeline = dlt.pipeline(
        pipeline_name="budget",
        destination=dlt.destinations.duckdb(str(tmp_path / "budget.duckdb")),
        dataset_name="lexer",
        pipelines_dir=str(tmp_path / "pipelines"),
    )
    source = lexer_source(
        {"team-a": TOKEN_A},
        date_from=START,
        date_to=datetime(2026, 4, 1, tzinfo=timezone.utc),
        reports=["summary"],
        exports=["case_details"],
        poll=PollPolicy(first_delay=0.02, cap=0.05),
        api_url=sb.api_url,
        status_url=sb.status_url,
        max_requests=budget,
        window=window,
        limit_store=tmp_path / "limits.sqlite3",
    )
    pipeline.run(source)
    key = Sandbox.key(TOKEN_A)
    assert sb.stats.exports_started == 3
    assert sum(sb.stats.requests.values()) > budget  # the budget was binding
    assert sb.stats.rate_limited == 0
    assert sb.stats.max_in_window(key, window) <= budget
    with duckdb.connect(str(tmp_path / "budget.duckdb"), read_only=True) as db:
        [(windows,)] = db.execute(
            "SELECT count(DISTINCT window_start) FROM lexer.case_details"
        ).fetchall()
    assert windows == 3


def test_exports_without_the_tables_extra_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.delitem(sys.modules, "lexer_activity_async.csv_parquet", raising=False)
    with pytest.raises(exc.ConfigurationError, match=r"lexer-activity-async\[tables\]"):
        lexer_source({"a": TOKEN_A}, date_from=START, exports=["case_details"])
    lexer_source({"a": TOKEN_A}, date_from=START, reports=["summary"])  # reports need none
