"""Scheduled backfills over a simulated calendar: runs on several "days" (an injected
clock shared by the runner, its clients and the sandbox) make provisional windows final
once they settle, refetch the lookback, and send nothing for what is final. Also: a
future ``date_to`` clipped, relative ``date_from``, ``refresh``, files gone missing,
the checkpoint's schema migration, and the bad input of those keys."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import NOW, TOKEN_A, TOKEN_B
from test_backfill import ENV_A, ENV_B, make_spec, token_env  # noqa: F401

from lexer_activity_async import LimiterRegistry
from lexer_activity_async.backfill import (
    CHECKPOINT_NAME,
    BackfillSpec,
    BackfillSummary,
    ExportSpec,
    SpecError,
    TokenSource,
    backfill_status,
    plan,
    run_backfill,
)
from lexer_activity_async.checkpoint import SCHEMA_VERSION, Checkpoint, CheckpointError
from lexer_activity_async.exceptions import ValidationError
from lexer_activity_async.reports import ExportKind
from lexer_activity_async.sandbox import Sandbox

UTC = timezone.utc
APR = datetime(2026, 4, 1, tzinfo=UTC)
JUN = datetime(2026, 6, 1, tzinfo=UTC)
JUL = datetime(2026, 7, 1, tzinfo=UTC)


class Clock:
    """The wall clock of one simulated calendar: set it to a day, run, set it again."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
async def calendar_sandbox(sandbox_factory: Callable[..., Any], clock: Clock) -> Sandbox:
    """A sandbox whose "now" (its future-date rule) is the calendar's."""
    sb: Sandbox = await sandbox_factory(now=clock)
    return sb


def rolling_spec(sb: Sandbox, output: Path, **overrides: Any) -> BackfillSpec:
    """One token, one report and one export, monthly from April 2026 up to "now"."""
    fields: dict[str, Any] = {
        "tokens": (TokenSource("a", env=ENV_A),),
        "date_from": APR,
        "date_to": None,
        "reports": ("summary",),
        "exports": (ExportSpec(ExportKind.CASE_DETAILS),),
    }
    fields.update(overrides)
    return make_spec(sb, output, **fields)


def finals(output: Path) -> dict[str, bool]:
    """Each done unit's window start (``YYYY-MM``) and kind -> whether it is final."""
    with sqlite3.connect(output / CHECKPOINT_NAME) as db:
        rows = db.execute("SELECT unit_id, final FROM units WHERE state = 'done'").fetchall()
    return {f"{uid.split('/')[2]}/{uid.split('/')[3][:7]}": bool(final) for uid, final in rows}


def fetched(output: Path) -> dict[str, float]:
    """Each done unit (as in `finals`) -> when it was fetched (epoch seconds)."""
    with sqlite3.connect(output / CHECKPOINT_NAME) as db:
        rows = db.execute("SELECT unit_id, fetched_at FROM units WHERE state = 'done'")
        found = rows.fetchall()
    return {f"{uid.split('/')[2]}/{uid.split('/')[3][:7]}": at for uid, at in found}


def counts(summary: BackfillSummary) -> tuple[int, int, int]:
    """(done, of which provisional, skipped) for token "a"; no failure allowed."""
    assert summary.ok, summary.failed
    return summary.done["a"], summary.provisional["a"], summary.skipped["a"]


@pytest.mark.usefixtures("token_env")
async def test_a_calendar_of_nightly_runs_settles_windows_and_refetches_only_those(
    calendar_sandbox: Sandbox, clock: Clock, tmp_path: Path, registry: LimiterRegistry
) -> None:
    sb, out = calendar_sandbox, tmp_path / "out"
    spec = rolling_spec(sb, out)

    async def run_on(day: datetime) -> tuple[int, int, int]:
        clock.now = day
        return counts(await run_backfill(spec, registry=registry, now=clock))

    # Day 1 (15 June): April and May have settled; June, holding now, is provisional.
    assert await run_on(datetime(2026, 6, 15, 12, tzinfo=UTC)) == (6, 2, 0)
    assert finals(out) == {
        "summary/2026-04": True,
        "case_details/2026-04": True,
        "summary/2026-05": True,
        "case_details/2026-05": True,
        "summary/2026-06": False,
        "case_details/2026-06": False,
    }
    june = (
        out
        / "a/reports/summary"
        / next(
            p.name for p in (out / "a/reports/summary").iterdir() if p.name.startswith("2026-06")
        )
    )
    inode = june.stat().st_ino
    # Day 2: only June again (its file replaced by a rename, no part file left).
    assert await run_on(datetime(2026, 6, 16, 12, tzinfo=UTC)) == (2, 2, 4)
    assert june.stat().st_ino != inode
    assert not list(out.rglob("*.part"))
    # 1 July: a new window (July) opens; June ended hours ago, still provisional.
    assert await run_on(datetime(2026, 7, 1, 6, tzinfo=UTC)) == (4, 4, 4)
    # 3 July: June has settled (ended 1 July + 2 days): fetched a last time, as final.
    assert await run_on(datetime(2026, 7, 3, 6, tzinfo=UTC)) == (4, 2, 4)
    assert finals(out)["summary/2026-06"]
    assert finals(out)["case_details/2026-06"]
    # 4 July: June is final and is not fetched again; only July.
    before = fetched(out)
    assert await run_on(datetime(2026, 7, 4, 6, tzinfo=UTC)) == (2, 2, 6)
    after = fetched(out)
    assert not finals(out)["summary/2026-07"]
    assert {k for k in after if after[k] != before[k]} == {
        "summary/2026-07",
        "case_details/2026-07",
    }
    assert after["summary/2026-07"] == datetime(2026, 7, 4, 6, tzinfo=UTC).timestamp()


@pytest.mark.usefixtures("token_env")
async def test_lookback_refetches_windows_that_ended_within_it_and_no_others(
    calendar_sandbox: Sandbox, clock: Clock, tmp_path: Path, registry: LimiterRegistry
) -> None:
    out = tmp_path / "out"
    spec = rolling_spec(
        calendar_sandbox, out, exports=(), settle=timedelta(days=1), lookback=timedelta(days=3)
    )

    async def run_on(day: datetime) -> tuple[int, int, int]:
        clock.now = day
        return counts(await run_backfill(spec, registry=registry, now=clock))

    assert await run_on(datetime(2026, 7, 2, 12, tzinfo=UTC)) == (4, 1, 0)
    assert finals(out)["summary/2026-06"]  # settled (1 day) but within the lookback
    # Later that day: June (ended 1 July, within 3 days) and July (provisional) again.
    assert await run_on(datetime(2026, 7, 2, 13, tzinfo=UTC)) == (2, 1, 2)
    # 5 July: June ended more than 3 days ago: July only.
    assert await run_on(datetime(2026, 7, 5, 12, tzinfo=UTC)) == (1, 1, 3)


@pytest.mark.usefixtures("token_env")
async def test_a_finished_range_sends_nothing_unless_refreshed(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    out = tmp_path / "out"
    spec = make_spec(sandbox, out, exports=())  # Jan and Feb 2024, long settled
    first = await run_backfill(spec, registry=registry, now=lambda: NOW)
    assert first.done == {"a": 4, "b": 4}
    assert first.provisional == {"a": 0, "b": 0}
    again = await run_backfill(spec, registry=registry, now=lambda: NOW)
    assert again.requests == 0
    assert again.skipped == {"a": 4, "b": 4}
    # --refresh 2024-01-15..2024-01-20 overlaps January's window only.
    window = (datetime(2024, 1, 15, tzinfo=UTC), datetime(2024, 1, 20, tzinfo=UTC))
    refreshed = await run_backfill(spec, registry=registry, now=lambda: NOW, refresh=window)
    with pytest.raises(ValidationError, match="refresh needs"):
        await run_backfill(spec, registry=registry, refresh=(window[1], window[0]))
    assert refreshed.done == {"a": 2, "b": 2}
    assert refreshed.requests == 4


@pytest.mark.usefixtures("token_env")
async def test_a_finished_unit_whose_file_was_deleted_or_truncated_is_refetched(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    out = tmp_path / "out"
    spec = make_spec(sandbox, out, tokens=(TokenSource("a", env=ENV_A),))
    await run_backfill(spec, registry=registry, now=lambda: NOW)
    [report, *_] = sorted((out / "a/reports/summary").iterdir())
    [export, *_] = sorted((out / "a/exports/case_details").iterdir())
    whole = report.read_bytes()
    report.write_bytes(whole[: len(whole) // 2])
    export.unlink()
    summary = await run_backfill(spec, registry=registry, now=lambda: NOW)
    assert summary.ok
    assert summary.done == {"a": 2}
    assert report.read_bytes() == whole
    assert export.stat().st_size > 0


@pytest.mark.usefixtures("token_env")
async def test_a_future_date_to_is_clipped_to_now_with_a_notice_never_a_failure(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    spec = make_spec(
        sandbox,
        tmp_path / "out",
        tokens=(TokenSource("a", env=ENV_A),),
        exports=(),
        reports=("summary",),
        date_from=datetime(2026, 4, 1, tzinfo=UTC),
        date_to=datetime(2026, 12, 31, tzinfo=UTC),
    )
    the_plan = plan(spec, now=NOW)
    assert [w[0].month for w in the_plan.windows] == [4, 5, 6]
    [june] = [u for u in the_plan.units if u.date_from.month == 6]
    assert june.date_to == JUL
    assert june.fetch_to == NOW
    assert the_plan.is_provisional(june)
    assert (
        "date_to 2026-12-31T00:00:00+00:00 is in the future: clipped to now"
        in (the_plan.notices[0])
    )
    summary = await run_backfill(spec, registry=registry, now=lambda: NOW)
    assert summary.ok
    assert summary.done == {"a": 3}
    assert summary.provisional == {"a": 1}
    assert "clipped to now" in caplog.text


def test_relative_date_from_and_now_are_resolved_on_the_window_grid(tmp_path: Path) -> None:
    base = {"tokens": [{"label": "a", "env": "X"}], "reports": ["summary"]}
    spec = BackfillSpec.from_dict(
        {**base, "date_from": "-90d", "date_to": "now", "settle": "36h", "lookback": "3d"},
        base_dir=tmp_path,
    )
    assert spec.date_from == -timedelta(days=90)
    assert spec.date_to is None
    assert spec.settle == timedelta(hours=36)
    assert spec.lookback == timedelta(days=3)
    # 15 June - 90 days is 17 March: rounded down to March, so windows stay put all month.
    the_plan = plan(spec, now=NOW)
    assert the_plan.windows[0][0] == datetime(2026, 3, 1, tzinfo=UTC)
    assert the_plan.windows[-1] == (JUN, JUL)
    assert plan(spec, now=NOW + timedelta(days=10)).windows == the_plan.windows
    quarterly = attrs.evolve(spec, window_months=3)
    assert plan(quarterly, now=NOW).windows[0][0] == datetime(2026, 1, 1, tzinfo=UTC)


BAD_SCHEDULES: list[tuple[dict[str, Any], str]] = [
    ({"date_from": "-90x"}, "date_from: '-90x' is not a relative date like \"-90d\""),
    ({"date_from": "-"}, "date_from: '-' is not a relative date"),
    ({"date_to": "tomorrow"}, "date_to: 'tomorrow' is not an ISO 8601"),
    ({"settle": "2 days"}, "settle: '2 days' is not a duration like \"2d\""),
    ({"lookback": -5}, "lookback must be a duration of 0 or more seconds"),
    ({"settle": "30d"}, "`settle` (30 days) is longer than the range (10 days)"),
    ({"lookback": "11d"}, "`lookback` (11 days) is longer than the range (10 days)"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SCHEDULES, ids=[m for _, m in BAD_SCHEDULES])
def test_bad_schedule_keys_are_named(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    data = {
        "tokens": [{"label": "a", "env": "X"}],
        "reports": ["summary"],
        "date_from": "2024-01-01",
        "date_to": "2024-01-11",
        **change,
    }
    with pytest.raises(SpecError) as info:
        BackfillSpec.from_dict(data, base_dir=tmp_path)
    assert message in str(info.value)


def test_a_relative_date_from_after_a_past_date_to_is_refused_when_planned(
    tmp_path: Path,
) -> None:
    spec = BackfillSpec(
        tokens=(TokenSource("a", env="X"),),
        date_from=-timedelta(days=90),
        date_to=datetime(2024, 1, 1, tzinfo=UTC),
        output=tmp_path,
        reports=("summary",),
    )
    with pytest.raises(SpecError, match="date_from must be before date_to"):
        plan(spec, now=NOW)


@pytest.mark.usefixtures("token_env")
async def test_a_relative_range_shorter_than_its_lookback_fails_before_any_request(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    # 15 June 12:00 - 2 h, rounded down to 1 June: a range of 14.5 days.
    spec = make_spec(
        sandbox,
        tmp_path / "out",
        date_from=-timedelta(hours=2),
        date_to=None,
        lookback=timedelta(days=20),
    )
    with pytest.raises(SpecError, match=r"`lookback` \(20 days\) is longer than the range"):
        await run_backfill(spec, registry=registry, now=lambda: NOW)
    assert not sandbox.stats.arrivals
    assert not (tmp_path / "out").exists()


def test_a_version_1_checkpoint_is_migrated_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    with sqlite3.connect(path) as db:  # the schema before fetched_at and final
        db.execute(
            "CREATE TABLE units (unit_id TEXT PRIMARY KEY, state TEXT NOT NULL, "
            "report_token TEXT, error TEXT, bytes INTEGER, updated_at REAL NOT NULL)"
        )
        db.execute("INSERT INTO units VALUES ('a/reports/summary/x', 'done', NULL, NULL, 5, 7.0)")
    db.close()
    with Checkpoint(path) as checkpoint:
        record = checkpoint.get("a/reports/summary/x")
        assert record is not None
        assert (record.state, record.bytes, record.fetched_at, record.final) == (
            "done",
            5,
            7.0,
            None,
        )
        checkpoint.mark_done("a/reports/summary/y", 9, final=False, fetched_at=8.0)
        assert checkpoint.records()["a/reports/summary/y"].final is False
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(CheckpointError, match="written by a newer lexer-activity-async"):
        Checkpoint(path)


@pytest.mark.usefixtures("token_env")
async def test_units_of_an_old_checkpoint_are_judged_by_when_they_were_fetched(
    calendar_sandbox: Sandbox, clock: Clock, tmp_path: Path, registry: LimiterRegistry
) -> None:
    """The bug this fixes: a window holding "today" was recorded done. Migrated, such a
    unit (fetched before its window settled) is refetched; a settled one is not."""
    out = tmp_path / "out"
    spec = make_spec(
        calendar_sandbox,
        out,
        tokens=(TokenSource("a", env=ENV_A),),
        exports=(),
        reports=("summary",),
        date_from=datetime(2026, 5, 1, tzinfo=UTC),
        date_to=None,
    )
    await run_backfill(spec, registry=registry, now=clock)
    with sqlite3.connect(out / CHECKPOINT_NAME) as db:  # as a version 1 run left it
        db.execute("UPDATE units SET final = NULL, fetched_at = ?", (NOW.timestamp(),))
    db.close()
    clock.now = NOW + timedelta(days=30)  # 15 July: June has settled, but was fetched before
    summary = await run_backfill(spec, registry=registry, now=clock)
    assert summary.ok
    assert summary.done == {"a": 2}
    assert summary.skipped == {"a": 1}


def test_status_counts_final_provisional_failed_and_pending(tmp_path: Path) -> None:
    spec = BackfillSpec(
        tokens=(TokenSource("a", env="X"), TokenSource("b", env="Y")),
        date_from=datetime(2024, 1, 1, tzinfo=UTC),
        date_to=datetime(2024, 5, 1, tzinfo=UTC),
        output=tmp_path / "out",
        reports=("summary",),
    )
    assert [s.pending for s in backfill_status(spec, now=NOW)] == [4, 4]
    assert not spec.output.exists()  # status creates nothing
    jan, feb, mar, _ = plan(spec, now=NOW).units_of("a")
    with Checkpoint(spec.output / CHECKPOINT_NAME) as checkpoint:
        for unit, final in ((jan, True), (feb, False)):
            unit.path(spec.output).parent.mkdir(parents=True, exist_ok=True)
            unit.path(spec.output).write_text("{}\n")
            checkpoint.mark_done(unit.id, 3, final=final)
        checkpoint.mark_failed(mar.id, "LexerError: boom")
    a, b = backfill_status(spec, now=NOW)
    assert (a.final, a.provisional, a.failed, a.pending) == (1, 1, 1, 1)
    assert a.next_final == datetime(2024, 3, 3, tzinfo=UTC)  # February's end + 2 days
    assert (b.final, b.provisional, b.failed, b.pending, b.next_final) == (0, 0, 0, 4, None)
    jan.path(spec.output).unlink()  # gone from disk: pending again
    assert backfill_status(spec, now=NOW)[0].pending == 2


# -- the CLI: status, --refresh, --dry-run (the real clock; ranges long settled) ----------


def test_cli_status_then_refresh_and_a_deleted_file(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    from test_cli import ENV_A as CLI_A
    from test_cli import ENV_B as CLI_B
    from test_cli import base_spec, invoke, table_rows

    env = {CLI_A: TOKEN_A, CLI_B: TOKEN_B}
    sb = sandbox_in_thread()
    spec = write_spec(tmp_path / "spec.toml", base_spec(sb, output="out"))
    before = invoke("status", str(spec))
    assert before.exit_code == 0, before.output
    assert table_rows(before.stdout)["a"][:4] == ["0", "0", "0", "6"]
    assert not (tmp_path / "out").exists()
    assert invoke("backfill", str(spec), env=env).exit_code == 0
    result = invoke("status", str(spec))
    assert table_rows(result.stdout)["a"] == ["6", "0", "0", "0", "-"]
    [january, *_] = sorted((tmp_path / "out/a/reports/summary").iterdir())
    january.unlink()
    lines = [json.loads(line) for line in invoke("status", str(spec), "--json").stdout.splitlines()]
    assert lines[0] == {
        "label": "a",
        "final": 5,
        "provisional": 0,
        "failed": 0,
        "pending": 1,
        "next_final": None,
    }
    # February refreshed for both tokens (3 units each) and January's lost file refetched.
    rerun = invoke("backfill", str(spec), "--refresh", "2024-02-10..2024-02-11", env=env)
    assert rerun.exit_code == 0, rerun.output
    assert "units_done=7" in rerun.stdout
    assert january.exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2024-01-01", "is not FROM..TO"),
        ("2024-03-01..2024-01-01", "FROM must be before TO"),
        ("2024-01-01..soon", "'soon' is not an ISO 8601 date"),
    ],
)
def test_cli_refresh_must_be_a_range(
    tmp_path: Path, write_spec: Callable[..., Path], value: str, message: str
) -> None:
    from test_cli import base_spec, invoke

    spec = write_spec(tmp_path / "spec.toml", base_spec(api_url="http://127.0.0.1:9/v1"))
    result = invoke("backfill", str(spec), "--refresh", value)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "lexer-output").exists()


def test_cli_dry_run_reads_every_token_source_and_notes_a_clipped_date_to(
    tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    from test_cli import ENV_A as CLI_A
    from test_cli import base_spec, invoke

    data = base_spec(api_url="http://127.0.0.1:9/v1", date_to="2999-01-01")
    data["tokens"].append({"label": "c", "file": "missing.token"})
    spec = write_spec(tmp_path / "spec.toml", data)
    result = invoke("backfill", str(spec), "--dry-run", env={CLI_A: TOKEN_A})
    assert result.exit_code == 1
    assert "Note: date_to 2999-01-01T00:00:00+00:00 is in the future: clipped to now" in (
        result.stderr
    )
    assert "Error: token 'b': environment variable LEXER_TEST_CLI_B is unset" in result.stderr
    assert "Error: token 'c': cannot read" in result.stderr
    assert "token 'a'" not in result.stderr
    assert TOKEN_A not in result.output
    assert not (tmp_path / "lexer-output").exists()
