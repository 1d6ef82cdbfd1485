"""Backfill workers: 1, 2 and 4 worker processes sharing one run through PostgreSQL (the
checkpoint and work queue) and Redis (each token's rate limit), and the queue's cost per
unit (issue 18, item 5).

The sandbox runs in its own process (`_common.SandboxProcess`) enforcing N requests per
W seconds per token. A PostgreSQL cluster and a redis-server are started on free loopback
ports (the tests' helpers). The plan is reports only, many tokens, at a scaled window:
``--tokens`` (40) x ``--months`` (12) windows x 4 report types, N = 10 per W = 2 s, so
each token's 48 requests take five bursts: floor = 4 W = 8 s for every token (they run in
parallel), whatever the number of workers. Claims are 20 units (four times the per-token
concurrency of 5), so a worker hands tokens beyond its fair share back after 20 units.

For each worker count (runs alternate between counts; fresh tokens and a fresh schema each
run): wall from starting the workers to the last one's exit (process start included),
wall / floor, the units each worker did per second of wall, and the spread of units over
the workers (min / max); 429s must be 0.

Claim overhead: one process claims and finishes every unit of a 2,000-unit plan in the
workers' batches (``claim`` + one ``finish`` per unit), timed per unit, beside the
checkpoint's own write per unit in PostgreSQL and in SQLite (the baseline).

    python benchmarks/bench_workers.py [--quick] [--runs N] [--tokens K] [--workers 1 2 4]
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import _common as c

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the servers

N, W = 10, 2.0
REPORTS = ["summary", "user_volume", "case_volume", "states_volume"]
REPO = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "lexer_activity_async", "backfill"]


@contextmanager
def _schema(cluster: str) -> Iterator[str]:
    """A fresh schema of ``cluster``: the URL whose connections use it."""
    import psycopg

    name = f"b_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{cluster}?options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(cluster, autocommit=True) as db:
            db.execute(f"DROP SCHEMA {name} CASCADE")


def _spec(
    folder: Path, sb: c.SandboxProcess, tokens: int, months: int, urls: dict[str, str]
) -> Path:
    lines = [
        'date_from = "2023-01-01"',
        f'date_to = "{2023 + months // 12}-{months % 12 + 1:02d}-01"',
        f"reports = {json.dumps(REPORTS)}",
        f'api_url = "{sb.api_url}"',
        f'status_url = "{sb.status_url}"',
        f'redis_url = "{urls["redis"]}"',
        f'checkpoint_url = "{urls["postgres"]}"',
        f'output = "{folder / "out"}"',
        f"rate_limit = {{ max_requests = {N}, window = {W} }}",
        "concurrency = { per_token = 5, total = 100 }",
    ]
    lines += [f'[[tokens]]\nlabel = "t{i}"\nenv = "BENCH_T{i}"' for i in range(tokens)]
    path = folder / "spec.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_workers(
    sb: c.SandboxProcess, cluster: str, redis: str, tokens: int, months: int, workers: int
) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEXER_", "BENCH_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update({f"BENCH_T{i}": f"bench-{secrets.token_hex(12)}" for i in range(tokens)})
    before = sb.stats(W)["rate_limited"]
    with tempfile.TemporaryDirectory() as tmp, _schema(cluster) as url:
        folder = Path(tmp)
        spec = _spec(folder, sb, tokens, months, {"redis": redis, "postgres": url})
        # Output to files, not pipes: a worker blocked on a full pipe stops renewing its
        # leases, and its units are taken over.
        logs = [(folder / f"w{i}.out", folder / f"w{i}.err") for i in range(workers)]
        started = time.perf_counter()
        procs = []
        for out_path, err_path in logs:
            with out_path.open("wb") as out, err_path.open("wb") as err:
                procs.append(
                    subprocess.Popen(
                        [*COMMAND, str(spec), "--worker", "--json", "--lease", "10"],
                        stdout=out,
                        stderr=err,
                        env=env,
                    )
                )
        for proc in procs:
            proc.wait(timeout=600)
        wall = time.perf_counter() - started
        outputs = [(o.read_text(), e.read_text()) for o, e in logs]
        for proc, (out_text, err_text) in zip(procs, outputs, strict=True):
            if proc.returncode != 0:
                raise RuntimeError(f"a worker failed: {err_text} {out_text.splitlines()[-1:]}")
    done = [json.loads(out.splitlines()[-1])["units_done"] for out, _ in outputs]
    return {
        "wall": wall,
        "units": done,
        "rate_limited": sb.stats(W)["rate_limited"] - before,
    }


def _claim_overhead(cluster: str, units: int, batch: int) -> dict[str, float]:
    """Seconds per unit: claim + finish through the queue; a checkpoint write in
    PostgreSQL; the same write in SQLite."""
    from lexer_activity_async.backfill import BackfillSpec, TokenSource, plan
    from lexer_activity_async.backfill.spec import run_identity
    from lexer_activity_async.backfill.workqueue import WorkQueue
    from lexer_activity_async.checkpoint import Checkpoint
    from lexer_activity_async.checkpoint_pg import PostgresCheckpoint

    tokens = units // 100
    spec = BackfillSpec(
        tokens=tuple(TokenSource(f"t{i}", env="X") for i in range(tokens)),
        date_from=datetime(2016, 1, 1, tzinfo=timezone.utc),
        date_to=datetime(2024, 5, 1, tzinfo=timezone.utc),
        reports=("summary",),
        output=Path("unused"),
    )
    the_plan = plan(spec, now=datetime(2024, 6, 1, tzinfo=timezone.utc))
    todo = the_plan.units[:units]
    with _schema(cluster) as url, PostgresCheckpoint(url, run_identity(spec)) as db:
        queue = WorkQueue(db, "bench", lease=60)
        run = queue.plan_run(None, the_plan.now, todo)
        with c.timed() as queue_time:
            while (claim := queue.claim(run, batch)) is not None:
                for unit_id in claim.unit_ids:
                    queue.finish(run, [unit_id])
        with c.timed() as pg_time:
            for unit in todo:
                db.mark_done(unit.id, 100)
    with (
        tempfile.TemporaryDirectory() as tmp,
        Checkpoint(Path(tmp) / "cp.sqlite") as lite,
        c.timed() as sqlite_time,
    ):
        for unit in todo:
            lite.mark_done(unit.id, 100)
    return {
        "queue": queue_time.wall / len(todo),
        "postgres_write": pg_time.wall / len(todo),
        "sqlite_write": sqlite_time.wall / len(todo),
    }


def main() -> None:
    parser = c.base_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    tokens = 8 if args.quick else args.tokens
    from postgres_server import postgres_server
    from redis_server import redis_server

    from lexer_activity_async.backfill import rate_limit_floor

    requests = args.months * len(REPORTS)
    floor = rate_limit_floor(requests, N, W)
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in args.workers}
    _, server_cpu = c.cpu_plan(args.no_pin)
    with (
        postgres_server() as cluster,
        redis_server() as redis,
        c.SandboxProcess(max_requests=N, window=W, cpu=server_cpu) as sb,
    ):
        for _ in range(runs):
            for workers in args.workers:  # alternate, so drift on the machine hits all
                results[workers].append(
                    _run_workers(sb, cluster, redis, tokens, args.months, workers)
                )
        overhead = [_claim_overhead(cluster, 400 if args.quick else 2000, 40) for _ in range(runs)]

    rows = []
    summary: dict[str, Any] = {}
    units = tokens * requests
    for workers, measured in results.items():
        wall = c.median(r["wall"] for r in measured)
        per_worker = c.median(units / workers / r["wall"] for r in measured)
        balance = c.median(min(r["units"]) / max(r["units"]) for r in measured)
        limited = sum(r["rate_limited"] for r in measured)
        assert all(sum(r["units"]) == units for r in measured), (units, measured)
        rows.append(
            [workers, c.fmt(wall), c.fmt(wall / floor), c.fmt(per_worker), c.fmt(balance), limited]
        )
        summary[str(workers)] = {
            "wall_s": wall,
            "wall_over_floor": wall / floor,
            "units_per_s_per_worker": per_worker,
            "min_over_max_units": balance,
            "rate_limited": limited,
            "runs": measured,
        }
    c.print_table(
        f"{tokens} tokens x {requests} report units, N={N}/W={W:g}s, floor {floor:g}s "
        f"(median of {runs})",
        ["workers", "wall s", "wall/floor", "units/s/worker", "min/max units", "429s"],
        rows,
    )
    queue = c.median(o["queue"] for o in overhead)
    pg = c.median(o["postgres_write"] for o in overhead)
    lite = c.median(o["sqlite_write"] for o in overhead)
    c.print_table(
        "Cost per unit (median µs)",
        ["what", "µs/unit", "x SQLite write"],
        [
            ["claim + finish (queue)", c.fmt(queue * 1e6), c.fmt(queue / lite)],
            ["checkpoint write, PostgreSQL", c.fmt(pg * 1e6), c.fmt(pg / lite)],
            ["checkpoint write, SQLite", c.fmt(lite * 1e6), "1"],
        ],
    )
    c.write_results(
        "workers",
        {
            "tokens": tokens,
            "units": units,
            "floor_s": floor,
            "workers": summary,
            "per_unit_s": {"queue": queue, "postgres_write": pg, "sqlite_write": lite},
        },
    )


if __name__ == "__main__":
    main()
