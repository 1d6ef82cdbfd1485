"""Four processes share one token's limit through a real Redis against the strict sandbox
(issue: zero 429s, and together at least 95 % of N/W)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from lexer_activity_async.limits import token_key
from lexer_activity_async.sandbox import Sandbox

N = 50
W = 4.0
WAVES = 4  # the sandbox sees WAVES * N requests: a burst, then WAVES - 1 windows
PROCESSES = 4
TOKEN = "shared-token-for-four-processes"
WORKER = Path(__file__).with_name("redis_worker.py")


@pytest.mark.redis
async def test_four_processes_share_one_token_limit(redis_url: str) -> None:
    total = WAVES * N
    counts = [total // PROCESSES + (i < total % PROCESSES) for i in range(PROCESSES)]
    async with Sandbox(tokens=frozenset({TOKEN}), max_requests=N, window=W) as sb:
        env = {**os.environ, "LEXER_API_TOKEN": TOKEN}
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, str(WORKER),
                "--api-url", sb.api_url, "--status-url", sb.status_url,
                "--redis-url", redis_url, "--count", str(count),
                "--max-requests", str(N), "--window", str(W),
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            for count in counts
        ]
        outputs = [await proc.communicate() for proc in procs]
        for proc, (_, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err.decode()
            assert TOKEN.encode() not in err
        reports = [json.loads(out) for out, _ in outputs]
        key = token_key(TOKEN)
        arrivals = sorted(sb.stats.arrivals[key])

    assert sb.stats.rate_limited == 0
    assert sum(r["rate_limited"] for r in reports) == 0
    assert len(arrivals) == total
    assert sb.stats.max_in_window(key, W) <= N
    # Steady-state rate: after the first burst of N, the other (WAVES-1)*N requests can
    # arrive no faster than N per W; measure how close the four processes came together.
    span = arrivals[-1] - arrivals[0]
    rate = (total - N) / span
    print(f"4 processes: {rate:.2f} req/s = {rate / (N / W):.1%} of N/W, 0 429s")
    assert rate >= 0.95 * N / W, f"{rate:.2f} req/s is under 95 % of {N / W:.2f}"
