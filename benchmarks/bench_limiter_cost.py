"""Limiter cost per request: one acquire + release, `SlidingWindowLimiter` (in-process),
`SqliteLimiter` (the local limit store) and `RedisLimiter`.

``max_requests`` is far above the number of operations, so nothing ever waits: this
measures the limiter's own overhead per request. For Redis that is two EVALSHA round trips
on the loopback (acquire, release); a bare PING round trip is shown as the floor. For the
store it is two ``BEGIN IMMEDIATE`` transactions on a WAL file in a fresh temporary folder
(``--store-dir`` to measure another disk). A throwaway redis-server is started (pinned to
CPU 1, this process to CPU 0) unless ``--redis-url`` or ``$REDIS_URL`` names one. Each run
is a fresh limiter (fresh key); the table shows the median over runs, the spread, and the
ratios to in-process.

    python benchmarks/bench_limiter_cost.py [--quick] [--runs N] [--ops N] [--no-pin]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common as c

from lexer_activity_async.limits import Limiter, SlidingWindowLimiter
from lexer_activity_async.limits_sqlite import LimitStore, SqliteLimiter

if TYPE_CHECKING:
    from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # for redis_server

NEVER_WAIT = 10**9
WINDOW = 300.0
MEMORY_OPS_FACTOR = 10  # the in-process limiter is ~100x cheaper: more ops per run


async def per_op_us(step: Callable[[], Awaitable[object]], ops: int) -> float:
    """Mean microseconds per ``step`` over ``ops`` sequential calls, after a warm-up."""
    for _ in range(min(ops, 50)):
        await step()
    start = time.perf_counter()
    for _ in range(ops):
        await step()
    return (time.perf_counter() - start) / ops * 1e6


def cycle(limiter: Limiter) -> Callable[[], Awaitable[None]]:
    async def step() -> None:
        await limiter.release(await limiter.acquire())

    return step


@contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    from redis_server import redis_server

    with redis_server() as url:
        yield url


async def pin_server(client: Redis, cpu: int | None) -> int | None:
    """Pin a local redis-server to ``cpu`` (its pid from INFO); None if not possible."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    info = await client.info("server")
    try:
        os.sched_setaffinity(int(info["process_id"]), {cpu})
    except OSError:  # not ours (remote or another user's)
        return None
    return cpu


async def main_async(args: Any) -> dict[str, Any]:
    import redis.asyncio

    from lexer_activity_async.limits_redis import RedisLimiter

    client_cpu, server_cpu = c.cpu_plan(args.no_pin)
    c.pin_self(client_cpu)
    runs = args.runs or (3 if args.quick else 7)
    ops = 200 if args.quick else args.ops
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    folder = tempfile.TemporaryDirectory(dir=args.store_dir, prefix="bench-limits-")
    with redis_url(args.redis_url) as url, folder as store_dir:
        client: Redis = redis.asyncio.Redis.from_url(url)
        store = LimitStore(Path(store_dir) / "limits.sqlite3")
        try:
            server_cpu = await pin_server(client, server_cpu)
            memory, sqlite, remote, ping = [], [], [], []
            for _ in range(runs):  # interleaved, so drift affects all alike
                local = SlidingWindowLimiter(NEVER_WAIT, WINDOW)
                memory.append(await per_op_us(cycle(local), ops * MEMORY_OPS_FACTOR))
                on_disk = SqliteLimiter(store, uuid.uuid4().hex, NEVER_WAIT, WINDOW)
                sqlite.append(await per_op_us(cycle(on_disk), ops))
                shared = RedisLimiter(client, uuid.uuid4().hex, NEVER_WAIT, WINDOW, prefix=prefix)
                remote.append(await per_op_us(cycle(shared), ops))
                ping.append(await per_op_us(client.ping, ops))
        finally:
            store.close()
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
    return {
        "config": {
            "runs": runs,
            "ops_per_run": {"in_process": ops * MEMORY_OPS_FACTOR, "sqlite": ops, "redis": ops},
            "store_dir": args.store_dir or tempfile.gettempdir(),
            "window": WINDOW,
            "client_cpu": client_cpu,
            "server_cpu": server_cpu,
            "quick": args.quick,
        },
        "us_per_acquire_release": {"in_process": memory, "sqlite": sqlite, "redis": remote},
        "us_per_ping": ping,
        "median_us": {
            "in_process": c.median(memory),
            "sqlite": c.median(sqlite),
            "redis": c.median(remote),
            "redis_ping": c.median(ping),
        },
        "ratio_sqlite_to_in_process": c.ratio(c.median(sqlite), c.median(memory)),
        "ratio_redis_to_in_process": c.ratio(c.median(remote), c.median(memory)),
        "ratio_redis_to_sqlite": c.ratio(c.median(remote), c.median(sqlite)),
        "redis_in_ping_round_trips": c.ratio(c.median(remote), c.median(ping)),
    }


def report(results: dict[str, Any]) -> None:
    cfg, med = results["config"], results["median_us"]
    samples = results["us_per_acquire_release"]
    rows = []
    for name, key, values in (
        ("in-process", "in_process", samples["in_process"]),
        ("sqlite store", "sqlite", samples["sqlite"]),
        ("redis", "redis", samples["redis"]),
        ("(redis PING)", "redis_ping", results["us_per_ping"]),
    ):
        lo, hi = c.spread(values)
        ops = cfg["ops_per_run"].get(key, cfg["ops_per_run"]["redis"])
        rows.append([name, ops, med[key], f"{c.fmt(lo, 1)}-{c.fmt(hi, 1)}"])
    c.print_table(
        f"Limiter cost per acquire+release, never waiting (median of {cfg['runs']} runs)",
        ["backend", "ops/run", "median us", "range us"],
        rows,
    )
    print(
        f"\nratio sqlite store / in-process: {results['ratio_sqlite_to_in_process']:.0f}x; "
        f"redis / in-process: {results['ratio_redis_to_in_process']:.0f}x; "
        f"redis / sqlite store: {results['ratio_redis_to_sqlite']:.1f}x; "
        f"redis acquire+release = {results['redis_in_ping_round_trips']:.1f} PING round trips"
    )


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ops", type=int, default=2000, help="Redis ops per run")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--store-dir", help="Folder for the limit-store file (default: $TMPDIR)")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    report(results)
    c.write_results("bench_limiter_cost", results)


if __name__ == "__main__":
    main()
