"""The PostgreSQL checkpoint against a real PostgreSQL: the SQLite checkpoint's
semantics, the versioned schema, the spec identity, and clear errors for a database that
cannot be reached or used, with the password never shown."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import NOW, TOKEN_A, TOKEN_B
from postgres_server import PASSWORD

from lexer_activity_async.backfill import BackfillSpec, TokenSource, run_backfill
from lexer_activity_async.backfill.runner import CHECKPOINT_NAME
from lexer_activity_async.backfill.spec import run_identity
from lexer_activity_async.checkpoint import DONE, FAILED, PENDING, STARTING, CheckpointError
from lexer_activity_async.checkpoint_pg import PG_SCHEMA_VERSION, PostgresCheckpoint, redact
from lexer_activity_async.sandbox import Sandbox

pytestmark = pytest.mark.postgres

IDENTITY = {"tokens": "['a']", "reports": "('users',)"}


def _chain(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def test_units_are_recorded_as_in_the_sqlite_checkpoint(pg_url: str) -> None:
    with PostgresCheckpoint(pg_url, IDENTITY) as cp:
        cp.record_intent("a/exports/x/w1")
        assert cp.get("a/exports/x/w1") is not None
        assert cp.records()["a/exports/x/w1"].state == STARTING
        cp.record_job("a/exports/x/w1", "job-1")
        cp.mark_done_many([("a/reports/r/w1", 10), ("a/reports/r/w2", 20)], final=[True, False])
        cp.mark_failed("a/reports/r/w3", "HTTPError: boom", "job-3")
    with PostgresCheckpoint(pg_url, IDENTITY) as cp:  # durable across connections
        records = cp.records()
        assert cp.get("never") is None
    assert records["a/exports/x/w1"].state == PENDING
    assert records["a/exports/x/w1"].report_token == "job-1"
    assert (records["a/reports/r/w1"].state, records["a/reports/r/w1"].final) == (DONE, True)
    assert (records["a/reports/r/w2"].bytes, records["a/reports/r/w2"].final) == (20, False)
    assert records["a/reports/r/w2"].fetched_at is not None
    failed = records["a/reports/r/w3"]
    assert (failed.state, failed.error, failed.report_token) == (FAILED, "HTTPError: boom", "job-3")


def test_done_keeps_when_it_was_fetched_across_a_later_failure(pg_url: str) -> None:
    with PostgresCheckpoint(pg_url, IDENTITY) as cp:
        cp.mark_done("u", 5, final=False, fetched_at=1234.5)
        cp.mark_failed("u", "later")
        record = cp.get("u")
    assert record is not None
    assert (record.state, record.fetched_at, record.final) == (FAILED, 1234.5, False)


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    PostgresCheckpoint(pg_url, IDENTITY).close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE lexer_schema SET version = %s", (PG_SCHEMA_VERSION + 1,))
    with pytest.raises(CheckpointError, match=r"newer lexer-activity-async \(schema 2"):
        PostgresCheckpoint(pg_url, IDENTITY)


def test_tables_of_something_else_are_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("CREATE TABLE lexer_units (x integer)")
    with pytest.raises(CheckpointError, match="not a backfill checkpoint"):
        PostgresCheckpoint(pg_url, IDENTITY)


def test_another_spec_is_refused_naming_the_keys_and_nothing_is_written(pg_url: str) -> None:
    with PostgresCheckpoint(pg_url, IDENTITY) as cp:
        cp.mark_done("u", 1)
    other = {**IDENTITY, "reports": "('teams',)", "date_from": "x"}
    with pytest.raises(CheckpointError, match=r"keys that differ: date_from, reports") as raised:
        PostgresCheckpoint(pg_url, other)
    assert PASSWORD not in _chain(raised.value)
    with psycopg.connect(pg_url, autocommit=True) as db:
        row = db.execute("SELECT identity FROM lexer_spec").fetchone()
    assert row is not None
    assert row[0] == IDENTITY


def test_an_unreachable_database_is_a_clear_error_without_the_password(
    postgres_cluster: str,
) -> None:
    url = f"postgresql://lexer:{PASSWORD}@127.0.0.1:1/postgres?connect_timeout=2"
    with pytest.raises(CheckpointError, match="cannot connect to the checkpoint") as raised:
        PostgresCheckpoint(url, IDENTITY)
    assert PASSWORD not in _chain(raised.value)
    assert raised.value.path == "postgresql://lexer:***@127.0.0.1:1/postgres?connect_timeout=2"


def test_wrong_credentials_are_a_clear_error_without_the_password(postgres_cluster: str) -> None:
    wrong = postgres_cluster.replace(PASSWORD, "not-the-password-271")
    with pytest.raises(CheckpointError, match="password authentication failed") as raised:
        PostgresCheckpoint(wrong, IDENTITY)
    assert "not-the-password-271" not in _chain(raised.value)
    assert redact(wrong) == raised.value.path


def test_read_only_creates_nothing(pg_url: str) -> None:
    with PostgresCheckpoint(pg_url, IDENTITY, read_only=True) as cp:
        assert not cp.exists
        assert cp.records() == {}
    with psycopg.connect(pg_url, autocommit=True) as db:
        row = db.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchone()
    assert row == (0,)


def _spec(tmp_path: Path, sandbox: Sandbox, pg_url: str, **fields: Any) -> BackfillSpec:
    from datetime import datetime, timezone

    return BackfillSpec(
        tokens=(TokenSource("a", env="PGT_A"), TokenSource("b", env="PGT_B")),
        date_from=datetime(2026, 1, 1, tzinfo=timezone.utc),
        date_to=datetime(2026, 4, 1, tzinfo=timezone.utc),
        output=tmp_path / "out",
        reports=("case_summary", "user_summary"),
        api_url=sandbox.api_url,
        status_url=sandbox.status_url,
        checkpoint_url=pg_url,
        limit_store="memory",
        **fields,
    )


async def test_a_backfill_checkpoints_in_postgres_and_a_rerun_skips_what_is_done(
    tmp_path: Path, sandbox: Sandbox, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGT_A", TOKEN_A)
    monkeypatch.setenv("PGT_B", TOKEN_B)
    spec = _spec(tmp_path, sandbox, pg_url)
    first = await run_backfill(spec, now=lambda: NOW)
    assert sum(first.done.values()) == 2 * 3 * 2
    assert not (spec.output / CHECKPOINT_NAME).exists()  # no SQLite file beside the output
    with PostgresCheckpoint(pg_url, run_identity(spec)) as cp:
        assert {r.state for r in cp.records().values()} == {DONE}
        assert len(cp.records()) == 12
    second = await run_backfill(spec, now=lambda: NOW)
    assert sum(second.done.values()) == 0
    assert sum(second.skipped.values()) == 12


async def test_a_backfill_with_another_spec_is_refused_before_any_request(
    tmp_path: Path, sandbox: Sandbox, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGT_A", TOKEN_A)
    monkeypatch.setenv("PGT_B", TOKEN_B)
    await run_backfill(_spec(tmp_path, sandbox, pg_url), now=lambda: NOW)
    sent = sum(sandbox.stats.requests.values())
    other = _spec(tmp_path, sandbox, pg_url, window_months=3)
    with pytest.raises(CheckpointError, match="keys that differ: window_months"):
        await run_backfill(other, now=lambda: NOW)
    assert sum(sandbox.stats.requests.values()) == sent
