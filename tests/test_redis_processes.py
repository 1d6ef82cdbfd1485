"""Redis through the whole stack: four processes sharing one token's limit against the
strict sandbox (zero 429s, together at least 75 % of N/W), and ``redis_url`` as a client
option, a spec field and ``--redis-url``, failing clearly when Redis is unreachable."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
                sys.executable,
                str(WORKER),
                "--api-url",
                sb.api_url,
                "--status-url",
                sb.status_url,
                "--redis-url",
                redis_url,
                "--count",
                str(count),
                "--max-requests",
                str(N),
                "--window",
                str(W),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
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
    # 75 %, not 100 %: on a loaded 2-core machine each process wakes late (87 % seen at load
    # 10); a limiter that wakes its waiters a window late gets at most 67 % here.
    assert rate >= 0.75 * N / W, f"{rate:.2f} req/s is under 75 % of {N / W:.2f}"


# -- redis_url through the client, the backfill and the CLI ------------------------------

UNREACHABLE = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1


async def test_client_with_unreachable_redis_fails_clearly_without_fallback(
    sandbox: Sandbox,
) -> None:
    from lexer_activity_async import LexerClient, LimiterBackendError

    client = LexerClient(
        TOKEN, api_url=sandbox.api_url, status_url=sandbox.status_url, redis_url=UNREACHABLE
    )
    with pytest.raises(LimiterBackendError, match="cannot reach") as caught:
        await client.open()
    assert "hunter2" not in str(caught.value)
    await client.aclose()
    assert sandbox.stats.requests == {}  # nothing was sent through a fall-back limiter


@pytest.mark.redis
async def test_backfill_spec_redis_url_keeps_the_limit_in_redis(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.asyncio

    from lexer_activity_async.backfill import BackfillSpec, TokenSource, run_backfill

    monkeypatch.setenv("REDIS_TEST_TOKEN", TOKEN)
    async with Sandbox(tokens=frozenset({TOKEN}), max_requests=N, window=W) as sb:
        spec = BackfillSpec(
            tokens=(TokenSource("team", env="REDIS_TEST_TOKEN"),),
            date_from=datetime(2024, 1, 1, tzinfo=timezone.utc),
            date_to=datetime(2024, 3, 1, tzinfo=timezone.utc),
            output=tmp_path / "out",
            reports=("summary", "case_summary"),
            api_url=sb.api_url,
            status_url=sb.status_url,
            max_requests=N,
            window=W,
            redis_url=redis_url,
        )
        summary = await run_backfill(spec)
    assert summary.ok
    assert sum(summary.done.values()) == 4
    assert sb.stats.rate_limited == 0
    probe = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [k.decode() async for k in probe.scan_iter(match="lexer:limit:*")]
    finally:
        await probe.aclose()
    assert any(token_key(TOKEN) in key for key in keys)
    assert not any(TOKEN in key for key in keys)


def test_cli_redis_url_unreachable_is_a_clear_error(
    sandbox_in_thread: Any, write_spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from lexer_activity_async.cli import main

    sb = sandbox_in_thread(tokens=frozenset({TOKEN}))
    monkeypatch.setenv("REDIS_TEST_TOKEN", TOKEN)
    spec = write_spec(
        tmp_path / "spec.toml",
        {
            "date_from": "2024-01-01",
            "date_to": "2024-02-01",
            "output": str(tmp_path / "out"),
            "reports": ["summary"],
            "api_url": sb.api_url,
            "status_url": sb.status_url,
            "tokens": [{"label": "team", "env": "REDIS_TEST_TOKEN"}],
        },
    )
    result = CliRunner().invoke(main, ["backfill", str(spec), "--redis-url", UNREACHABLE])
    assert result.exit_code == 1
    assert "cannot reach the rate-limiter Redis" in result.output
    assert "hunter2" not in result.output
    assert TOKEN not in result.output
    assert not (tmp_path / "out" / "team").exists()
