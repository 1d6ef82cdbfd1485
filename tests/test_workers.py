"""Backfill workers across processes, with a real PostgreSQL (the checkpoint and work
queue) and Redis (the rate limits) against the strict sandbox: three workers finish a
plan with every unit done once; a worker SIGKILLed mid-run has its units reclaimed, and
the output equals an uninterrupted single-process run byte for byte, with zero 429s and
no export job started twice. Leases are short (``--lease``) so reclaims come quickly;
the tests wait on conditions (the database, the processes), never on sleeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from postgres_server import PASSWORD

from lexer_activity_async.backfill import BackfillSpec, plan
from lexer_activity_async.backfill.runner import CHECKPOINT_NAME
from lexer_activity_async.checkpoint import DONE, STARTING
from lexer_activity_async.cli import main
from lexer_activity_async.limits_sqlite import STORE_ENV
from lexer_activity_async.sandbox import Sandbox

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

REPO = Path(__file__).resolve().parents[1]
TOKENS = {f"w{i}": f"worker-test-token-{i}-0123456789abcdef" for i in range(6)}
N, W = 6, 1.0  # the strict sandbox's limit: each token's ~18 requests span three windows
LEASE = "2"
UNITS = 6 * 3 * 3  # tokens x windows x (two reports and one export)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEXER_") or k == STORE_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update({f"LEXER_TEST_{label.upper()}": token for label, token in TOKENS.items()})
    return env


def _spec_data(sb: Sandbox, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "date_from": "2024-01-01",
        "date_to": "2024-04-01",
        "reports": ["summary", "user_volume"],
        "exports": [{"kind": "case_details"}],
        "tokens": [{"label": label, "env": f"LEXER_TEST_{label.upper()}"} for label in TOKENS],
        "poll": {"first_delay": 0.05, "cap": 0.2},
        "concurrency": {"per_token": 2, "total": 4},
        "rate_limit": {"max_requests": N, "window": W},
        "api_url": sb.api_url,
        "status_url": sb.status_url,
    }
    data.update(extra)
    return data


def _strict(sandbox_in_thread: Callable[..., Sandbox]) -> Sandbox:
    return sandbox_in_thread(
        tokens=frozenset(TOKENS.values()), max_requests=N, window=W, export_pending_seconds=0.3
    )


def _start(spec: Path, out: Path, name: str, *extra: str) -> subprocess.Popen[bytes]:
    args = ["backfill", str(spec), "--json", "-o", str(out), *extra]
    with (
        (out.parent / f"{name}.out").open("wb") as stdout,
        (out.parent / f"{name}.err").open("wb") as stderr,
    ):
        return subprocess.Popen(
            [sys.executable, "-m", "lexer_activity_async", *args],
            stdout=stdout,
            stderr=stderr,
            env=_env(),
        )


def _worker(spec: Path, out: Path, name: str) -> subprocess.Popen[bytes]:
    return _start(spec, out, name, "--worker", "--lease", LEASE)


def _lines(out: Path, name: str) -> list[dict[str, Any]]:
    text = (out.parent / f"{name}.out").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _done_units(lines: list[dict[str, Any]]) -> list[str]:
    return [r["unit"] for r in lines if r.get("event") == "UnitFinished" and r["state"] == DONE]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(CHECKPOINT_NAME)
    }


def _wait(procs: list[subprocess.Popen[bytes]], out: Path, names: list[str]) -> None:
    for proc, name in zip(procs, names, strict=True):
        status = proc.wait(timeout=90)
        assert status == 0, (out.parent / f"{name}.err").read_text()


def _one(db: psycopg.Connection[Any], sql: str, *args: Any) -> Any:
    row = db.execute(sql, args).fetchone()
    assert row is not None
    return row[0]


def test_three_workers_finish_the_plan_with_every_unit_done_once(
    tmp_path: Path,
    sandbox_in_thread: Callable[..., Sandbox],
    write_spec: Callable[..., Path],
    pg_url: str,
    redis_url: str,
) -> None:
    sb = _strict(sandbox_in_thread)
    spec = write_spec(
        tmp_path / "spec.toml", _spec_data(sb, checkpoint_url=pg_url, redis_url=redis_url)
    )
    out = tmp_path / "out"
    names = ["first", "second", "third"]
    procs = [_worker(spec, out, name) for name in names]
    _wait(procs, out, names)

    done = [unit for name in names for unit in _done_units(_lines(out, name))]
    expected = {u.id for u in plan(BackfillSpec.from_toml(spec)).units}
    assert len(expected) == UNITS
    assert sorted(done) == sorted(expected)  # each unit done once, by one worker
    summaries = [_lines(out, name)[-1] for name in names]
    assert sum(s["units_done"] for s in summaries) == UNITS
    assert sb.stats.rate_limited == 0
    assert sum(s["rate_limited"] for s in summaries) == 0
    assert sb.stats.exports_started == 6 * 3
    assert len(_files(out)) == UNITS
    assert not list(out.rglob("*.part"))
    with psycopg.connect(pg_url, autocommit=True) as db:
        assert _one(db, "SELECT count(*) FROM lexer_runs") == 1  # planned once
        assert _one(db, "SELECT count(*) FROM lexer_queue WHERE status <> 'finished'") == 0
        assert _one(db, "SELECT count(*) FROM lexer_units WHERE state = 'done'") == UNITS
        assert _one(db, "SELECT count(*) FROM lexer_workers WHERE stopped_at IS NULL") == 0
    for name in names:
        for path in (out.parent / f"{name}.out", out.parent / f"{name}.err"):
            data = path.read_bytes()
            assert not any(token.encode() in data for token in TOKENS.values())


def _victim_id(db: psycopg.Connection[Any], pid: int) -> str | None:
    if _one(db, "SELECT to_regclass('lexer_workers')") is None:
        return None  # no worker has created the schema yet
    row = db.execute("SELECT worker_id FROM lexer_workers WHERE pid = %s", (pid,)).fetchone()
    return None if row is None else str(row[0])


def _wait_for_leases(db: psycopg.Connection[Any], worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker ended before it claimed anything"
        worker_id = _victim_id(db, worker.pid)
        if worker_id is not None and _one(
            db, "SELECT count(*) FROM lexer_queue WHERE claimed_by = %s", worker_id
        ):
            return
    raise AssertionError("the worker claimed nothing")


def _kill_mid_run(db: psycopg.Connection[Any], victim: subprocess.Popen[bytes]) -> str:
    """SIGKILL ``victim`` once it has finished a unit and holds leases, at a moment when
    none of its export units is between recording its intent and its job's token (the
    one gap where a job could be started unrecorded). It is frozen first (SIGSTOP), and
    its database session seen idle, so the checkpoint cannot change under the check."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert victim.poll() is None, "the worker to kill ended first"
        worker_id = _victim_id(db, victim.pid)
        if worker_id is None:
            continue
        finished = _one(db, "SELECT count(*) FROM lexer_queue WHERE finished_by = %s", worker_id)
        leased = _one(
            db,
            "SELECT count(*) FROM lexer_queue WHERE claimed_by = %s AND status = 'leased'",
            worker_id,
        )
        if not finished or not leased:
            continue
        victim.send_signal(signal.SIGSTOP)
        while _one(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND state = 'active'",
            worker_id[:63],
        ):
            pass  # a statement sent before the stop is still running (an open transaction
            # is fine: the kill rolls it back, and nothing it wrote was ever visible)
        starting = _one(
            db,
            "SELECT count(*) FROM lexer_queue q JOIN lexer_units u USING (unit_id) "
            "WHERE q.claimed_by = %s AND q.status = 'leased' AND u.state = %s",
            worker_id,
            STARTING,
        )
        if starting == 0:
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            return worker_id
        victim.send_signal(signal.SIGCONT)
    raise AssertionError("no moment to kill the worker came")


def test_a_worker_killed_mid_run_has_its_units_reclaimed_and_the_output_is_unchanged(
    tmp_path: Path,
    sandbox_in_thread: Callable[..., Sandbox],
    write_spec: Callable[..., Path],
    pg_url: str,
    redis_url: str,
) -> None:
    # The reference: one process, the SQLite checkpoint, its own sandbox (same worlds),
    # run beside the workers.
    reference_sb = _strict(sandbox_in_thread)
    reference_spec = write_spec(tmp_path / "reference.toml", _spec_data(reference_sb))
    reference = tmp_path / "reference" / "out"
    reference.parent.mkdir()
    single = _start(reference_spec, reference, "single")

    sb = _strict(sandbox_in_thread)
    spec = write_spec(
        tmp_path / "spec.toml", _spec_data(sb, checkpoint_url=pg_url, redis_url=redis_url)
    )
    out = tmp_path / "out"
    # The victim starts alone and claims every token; the others join once it holds
    # them, and get tokens as it hands them back between batches (and after its death).
    victim = _worker(spec, out, "victim")
    with psycopg.connect(pg_url, autocommit=True) as db:
        _wait_for_leases(db, victim)
        others = [_worker(spec, out, name) for name in ("second", "third")]
        victim_id = _kill_mid_run(db, victim)
        lost = db.execute(
            "SELECT unit_id FROM lexer_queue WHERE claimed_by = %s AND status = 'leased'",
            (victim_id,),
        ).fetchall()
        assert lost  # it died holding units
        _wait(others, out, ["second", "third"])
        reclaimed = _one(
            db,
            "SELECT count(*) FROM lexer_queue WHERE unit_id = ANY(%s) AND status = 'finished' "
            "AND finished_by <> %s",
            [unit_id for (unit_id,) in lost],
            victim_id,
        )
        assert reclaimed == len(lost)
        assert _one(db, "SELECT count(*) FROM lexer_units WHERE state = 'done'") == UNITS
    _wait([single], reference, ["single"])
    expected = _files(reference)
    assert len(expected) == UNITS

    assert _files(out) == expected  # byte for byte
    assert sb.stats.rate_limited == 0
    assert sb.stats.exports_started == 6 * 3  # none started twice
    summaries = [_lines(out, name)[-1] for name in ("second", "third")]
    assert sum(s["rate_limited"] for s in summaries) == 0


# -- bad input: refused before anything is sent --------------------------------------


def _invoke(*args: str) -> Any:
    env = {f"LEXER_TEST_{label.upper()}": token for label, token in TOKENS.items()}
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200", **env})


def test_a_worker_needs_a_postgres_checkpoint_and_redis(
    tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    spec = write_spec(tmp_path / "spec.toml", _spec_data_offline(redis_url="redis://127.0.0.1:1/0"))
    result = _invoke("backfill", str(spec), "--worker")
    assert result.exit_code == 2
    assert "--worker needs a shared checkpoint" in result.output
    no_redis = write_spec(
        tmp_path / "no-redis.toml",
        _spec_data_offline(checkpoint_url="postgresql://127.0.0.1:1/x"),
    )
    result = _invoke("backfill", str(no_redis), "--worker")
    assert result.exit_code == 2
    assert "--worker needs redis_url" in result.output
    result = _invoke("backfill", str(no_redis), "--lease", "5")
    assert result.exit_code == 2
    assert "--lease and --new-run go with --worker" in result.output


def _spec_data_offline(**extra: Any) -> dict[str, Any]:
    return {
        "date_from": "2024-01-01",
        "date_to": "2024-02-01",
        "reports": ["summary"],
        "tokens": [{"label": "w0", "env": "LEXER_TEST_W0"}],
        "api_url": "http://127.0.0.1:9/v1",
        **extra,
    }


def test_an_unreachable_database_fails_the_worker_in_one_line_without_the_password(
    tmp_path: Path, write_spec: Callable[..., Path], redis_url: str
) -> None:
    url = f"postgresql://lexer:{PASSWORD}@127.0.0.1:1/lexer?connect_timeout=2"
    spec = write_spec(tmp_path / "spec.toml", _spec_data_offline(redis_url=redis_url))
    for worker in (("--worker",), ()):  # a worker, and a single process on PostgreSQL
        result = _invoke("backfill", str(spec), *worker, "--checkpoint-url", url)
        assert result.exit_code == 1
        assert "cannot connect to the checkpoint database" in result.output
        assert "lexer:***@127.0.0.1:1" in result.output
        assert PASSWORD not in result.output
        assert "Traceback" not in result.output
        # One line, before any progress display starts.
        assert [line for line in result.output.splitlines() if line.strip()] == [
            line for line in result.output.splitlines() if line.startswith("Error:")
        ]


# -- status from the database ----------------------------------------------------------


def _status(spec: Path, *extra: str) -> list[dict[str, Any]]:
    result = _invoke("status", str(spec), "--json", *extra)
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_status_reads_the_database_read_only_per_token_and_overall(
    tmp_path: Path, write_spec: Callable[..., Path], pg_url: str
) -> None:
    from datetime import datetime, timezone

    from lexer_activity_async.backfill.spec import run_identity
    from lexer_activity_async.backfill.workqueue import WorkQueue
    from lexer_activity_async.checkpoint_pg import PostgresCheckpoint

    data = _spec_data_offline(
        tokens=[{"label": label, "env": f"LEXER_TEST_{label.upper()}"} for label in ("w0", "w1")],
        date_to="2024-03-01",
    )
    spec_path = write_spec(tmp_path / "spec.toml", data)
    # Empty database: every unit pending, nobody alive, and nothing created by asking.
    lines = _status(spec_path, "--checkpoint-url", pg_url)
    assert [(r["label"], r["pending"], r["leased"]) for r in lines[:2]] == [
        ("w0", 2, 0),
        ("w1", 2, 0),
    ]
    assert lines[2] == {
        "overall": {"final": 0, "provisional": 0, "failed": 0, "leased": 0, "pending": 4},
        "workers_alive": 0,
        "run": None,
    }
    with psycopg.connect(pg_url, autocommit=True) as db:
        assert _one(db, "SELECT to_regclass('lexer_units')") is None

    spec = BackfillSpec.from_toml(spec_path, checkpoint_url=pg_url)
    the_plan = plan(spec, now=datetime(2024, 6, 1, tzinfo=timezone.utc))
    w0, w1 = the_plan.units_of("w0"), the_plan.units_of("w1")
    with PostgresCheckpoint(pg_url, run_identity(spec)) as cp:
        queue = WorkQueue(cp, "host-a:1:abc", lease=60)
        run = queue.plan_run(None, the_plan.now, the_plan.units)
        queue.register("host-a", 1)
        claim = queue.claim(run, 1)
        assert claim is not None
        assert (claim.label, claim.unit_ids, claim.whole) == ("w0", (w0[0].id,), True)
        cp.mark_done(w1[0].id, 10)
        cp.mark_failed(w1[1].id, "HTTPError: boom")
    lines = _status(spec_path, "--checkpoint-url", pg_url)
    by_label = {r["label"]: r for r in lines[:2]}
    assert (by_label["w0"]["leased"], by_label["w0"]["pending"]) == (1, 1)
    assert (by_label["w1"]["final"], by_label["w1"]["failed"]) == (1, 1)
    assert lines[2]["overall"] == {
        "final": 1,
        "provisional": 0,
        "failed": 1,
        "leased": 1,
        "pending": 1,
    }
    assert (lines[2]["workers_alive"], lines[2]["run"]) == (1, 1)
    table = _invoke("status", str(spec_path), "--checkpoint-url", pg_url)
    assert table.exit_code == 0, table.output
    assert "leased" in table.stdout
    assert "workers alive: 1" in table.stdout
    assert PASSWORD not in table.output


def test_claims_take_free_tokens_whole_then_help_and_expired_leases_are_reclaimed(
    tmp_path: Path, write_spec: Callable[..., Path], pg_url: str
) -> None:
    from datetime import datetime, timezone

    from lexer_activity_async.backfill.spec import run_identity
    from lexer_activity_async.backfill.workqueue import WorkQueue
    from lexer_activity_async.checkpoint_pg import PostgresCheckpoint

    data = _spec_data_offline(
        tokens=[{"label": label, "env": f"LEXER_TEST_{label.upper()}"} for label in ("w0", "w1")],
        date_to="2024-04-01",
    )
    spec = BackfillSpec.from_toml(write_spec(tmp_path / "spec.toml", data), checkpoint_url=pg_url)
    the_plan = plan(spec, now=datetime(2024, 6, 1, tzinfo=timezone.utc))
    with PostgresCheckpoint(pg_url, run_identity(spec)) as cp:
        a = WorkQueue(cp, "a", lease=60)
        b = WorkQueue(cp, "b", lease=60)
        run = a.plan_run(None, the_plan.now, the_plan.units)
        assert b.plan_run(None, the_plan.now, the_plan.units) == run  # planned once
        first = a.claim(run, 2)
        second = b.claim(run, 2)
        assert first is not None
        assert second is not None
        assert (first.label, first.whole, second.label, second.whole) == ("w0", True, "w1", True)
        # Every token is held: b may help with w0's queued unit, not as a whole.
        assert b.claim(run, 2) is None
        helping = b.claim(run, 2, share=True)
        assert helping is not None
        assert (helping.label, helping.whole, len(helping.unit_ids)) == ("w0", False, 1)
        assert a.claim(run, 2, label="w0") is None  # nothing of w0 left to claim
        assert b.unfinished(run) == 6
        # a's leases run out (as if it died): its units go to the next claim.
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute(
                "UPDATE lexer_queue SET lease_until = now() - interval '1 second' "
                "WHERE claimed_by = 'a'"
            )
            db.execute(
                "UPDATE lexer_tokens SET lease_until = now() - interval '1 second' "
                "WHERE claimed_by = 'a'"
            )
        again = b.claim(run, 5)
        assert again is not None
        assert (again.label, again.unit_ids, again.whole) == ("w0", first.unit_ids, True)
        # a, alive after all, fails a unit b took over: not recorded over b's work.
        from lexer_activity_async.backfill.worker import LeaseGuard

        LeaseGuard(cp, a, run).mark_failed(first.unit_ids[0], "OutputError: gone")
        assert cp.get(first.unit_ids[0]) is None
        LeaseGuard(cp, b, run).mark_failed(first.unit_ids[0], "HTTPError: boom")
        failed = cp.get(first.unit_ids[0])
        assert failed is not None
        assert failed.error == "HTTPError: boom"
        b.finish(run, [*second.unit_ids, *helping.unit_ids, *again.unit_ids])
        a.finish(run, first.unit_ids)  # a lost them: its late finish changes nothing
        assert b.unfinished(run) == 1
        rest = b.claim(run, 5, label="w1")
        assert rest is not None
        b.finish(run, rest.unit_ids)
        assert b.unfinished(run) == 0
        b.stop()


def test_a_worker_with_another_spec_than_the_database_is_refused_naming_the_keys(
    tmp_path: Path, write_spec: Callable[..., Path], pg_url: str, redis_url: str
) -> None:
    from lexer_activity_async.backfill.spec import run_identity
    from lexer_activity_async.checkpoint_pg import PostgresCheckpoint

    first = write_spec(tmp_path / "first.toml", _spec_data_offline(redis_url=redis_url))
    PostgresCheckpoint(pg_url, run_identity(BackfillSpec.from_toml(first))).close()
    other = write_spec(
        tmp_path / "other.toml",
        _spec_data_offline(redis_url=redis_url, reports=["summary", "user_volume"]),
    )
    result = _invoke("backfill", str(other), "--worker", "--checkpoint-url", pg_url)
    assert result.exit_code == 1
    assert "another spec (keys that differ: reports)" in result.output
    assert PASSWORD not in result.output
    with psycopg.connect(pg_url, autocommit=True) as db:
        assert _one(db, "SELECT count(*) FROM lexer_runs") == 0  # nothing planned
