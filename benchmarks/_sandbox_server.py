"""Run a `lexer_activity_async.sandbox.Sandbox` in its own process, for the benchmarks.

Started by `_common.SandboxProcess`; not a benchmark itself. It serves the sandbox's three
origins plus a fourth, private control origin that answers ``GET /stats?window=W`` with the
sandbox's counters as JSON (the sandbox has no stats endpoint of its own), so a benchmark
can check 429s and the per-token sliding-window maximum while the server runs on its own
core, and ``POST /warm`` (``{"keys": [...], "date_from": ISO, "date_to": ISO}``, token keys
as ``limits.token_key`` makes them) that generates every world day (and its digest)
requests over that range read (cases look ``LAG_DAYS`` back) for those tokens, before a
measurement, so it times the client and its plan rather than the simulator's first touch
of each day. It prints one
JSON line with the URLs, then serves until SIGTERM/SIGINT, when it closes the sandbox
(which deletes its export files).

    python benchmarks/_sandbox_server.py --config '{"max_requests": 100, "window": 5}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import time
from datetime import datetime
from typing import Any

from aiohttp import web

from lexer_activity_async.sandbox import Sandbox, SandboxConfig, _world


def _stats_payload(sandbox: Sandbox, window: float) -> dict[str, Any]:
    stats = sandbox.stats
    return {
        "requests": dict(stats.requests),
        "rate_limited": stats.rate_limited,
        "rate_limited_by_token": dict(stats.rate_limited_by_token),
        "max_in_window": {key: stats.max_in_window(key, window) for key in stats.arrivals},
        "window": window,
        "unauthorized": stats.unauthorized,
        "leaks": stats.leaks,
        "file_requests": stats.file_requests,
        "bytes_served": stats.bytes_served,
        "exports_started": stats.exports_started,
        "status_polls": dict(stats.status_polls),
        "errors_injected": stats.errors_injected,
        "days_generated": _world.day.cache_info().misses,
    }


async def _serve(config: SandboxConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Sandbox(config) as sandbox:

        async def stats(request: web.Request) -> web.Response:
            window = float(request.query.get("window", sandbox.config.window))
            # Computed on the loop (not in a thread) so the counters cannot change under it;
            # benchmarks ask only between measurements.
            return web.json_response(_stats_payload(sandbox, window))

        async def warm(request: web.Request) -> web.Response:
            body = await request.json()
            # On the loop, like /stats: benchmarks call it between measurements.
            begun, misses = time.process_time(), _world.day.cache_info().misses
            first = _world.epoch(datetime.fromisoformat(body["date_from"])) // _world.DAY
            last = _world.epoch(datetime.fromisoformat(body["date_to"])) // _world.DAY
            for key in body["keys"]:
                for ordinal in range(first - _world.LAG_DAYS - 1, last + 2):
                    _world.day(key, ordinal, sandbox.config.daily_volume)
                    _world.case_digest(key, ordinal, sandbox.config.daily_volume)  # its digest
            generated = _world.day.cache_info().misses - misses
            return web.json_response({"generated": generated, "cpu_s": time.process_time() - begun})

        app = web.Application()
        app.router.add_get("/stats", stats)
        app.router.add_post("/warm", warm)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.host, 0).start()
            port = runner.addresses[0][1]
            line = {
                "api_url": sandbox.api_url,
                "status_url": sandbox.status_url,
                "files_url": sandbox.files_url,
                "control_url": f"http://{config.host}:{port}",
                "pid": os.getpid(),
            }
            print(json.dumps(line), flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="{}", help="SandboxConfig fields as JSON")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument(
        "--day-cache",
        type=int,
        default=None,
        help="generated days the world keeps (default its DAY_CACHE_SIZE): enough for "
        "every token's range, so long ranges of many tokens measure the client, not how "
        "often the sandbox regenerates evicted days",
    )
    args = parser.parse_args()
    if args.day_cache is not None:
        _world.day = functools.lru_cache(maxsize=args.day_cache)(_world.day.__wrapped__)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    fields = json.loads(args.config)
    if fields.get("tokens") is not None:
        fields["tokens"] = frozenset(fields["tokens"])
    config = SandboxConfig(**fields)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
