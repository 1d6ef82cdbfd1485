"""The local limit store across processes, against the strict sandbox: a CLI backfill
SIGKILLed and rerun at once, ten times, draws no 429; two processes sharing a token through
one store file draw none and together reach at least 75 % of N/W. Throughput is computed
from the sandbox's arrival times, never from how long the test took."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lexer_activity_async.limits import token_key
from lexer_activity_async.sandbox import Sandbox

WORKER = Path(__file__).with_name("redis_worker.py")
REPORTS = [  # aggregates: one request per window (series windows would be joined)
    "summary",
    "states",
    "classifications",
    "user_summary",
    "user_volume",
    "case_summary",
    "case_classifications",
]


def _wait_for_run(
    proc: subprocess.Popen[bytes], arrivals: Any, target: int, timeout: float = 60.0
) -> None:
    """Poll the sandbox's arrival count (a counter in another thread) until it reaches
    ``target`` or the run ends; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while arrivals() < target and proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"the run sent fewer than {target} requests in {timeout}s")
        time.sleep(0.002)


def test_backfill_killed_and_rerun_ten_times_draws_no_429(
    sandbox_in_thread: Any, write_spec: Any, tmp_path: Path
) -> None:
    """Each run is SIGKILLed once it has sent ``PER_RUN`` requests (more than N minus what
    the previous run sent in the window, so a limiter that started empty would exceed N);
    the next starts at once. Slots of the requests in flight at the kill stay held for
    their lease, the others a window after their release: the server never sees more
    than N in any W."""
    n, w, per_run, restarts = 100, 2.0, 60, 10
    token = "kill-and-rerun-token-0123456789"
    key = token_key(token)
    sb = sandbox_in_thread(tokens=frozenset({token}), max_requests=n, window=w)
    store = tmp_path / "limits.sqlite3"
    spec = write_spec(
        tmp_path / "spec.toml",
        {
            "date_from": "2015-01-01",
            "date_to": "2024-01-01",  # 108 months x 7 reports = 756 units, one request each
            "output": str(tmp_path / "out"),
            "reports": REPORTS,
            "api_url": sb.api_url,
            "status_url": sb.status_url,
            "limit_store": str(store),
            "rate_limit": {"max_requests": n, "window": w},
            "concurrency": {"per_token": 4, "total": 4},
            "tokens": [{"label": "team", "env": "KILL_TEST_TOKEN"}],
        },
    )
    env = {**os.environ, "KILL_TEST_TOKEN": token}
    command = [sys.executable, "-m", "lexer_activity_async", "backfill", str(spec), "--json"]

    def arrivals() -> int:
        return len(sb.stats.arrivals.get(key, ()))  # len() of a list: safe across threads

    sent_per_run = []
    for _ in range(restarts):
        before = arrivals()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
        try:
            _wait_for_run(proc, arrivals, before + per_run)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -9, "the run must be killed, not finish"
        sent_per_run.append(arrivals() - before)

    final = subprocess.run(command, env=env, capture_output=True, timeout=120)
    assert final.returncode == 0, final.stderr.decode()
    assert token.encode() not in final.stdout + final.stderr
    events = [json.loads(line) for line in final.stdout.splitlines() if line.startswith(b"{")]
    assert events, "the final run reports its progress"

    assert sb.stats.rate_limited == 0
    assert sb.stats.max_in_window(key, w) <= n
    assert all(sent >= per_run for sent in sent_per_run)
    done = list((tmp_path / "out" / "team").rglob("*.json"))
    assert len(done) == 108 * len(REPORTS)
    print(f"10 kills: {sent_per_run} requests per run, {arrivals()} in all, 0 429s")


async def test_two_processes_share_a_token_through_the_store(tmp_path: Path) -> None:
    n, w, waves = 50, 3.0, 4  # a burst of N, then waves - 1 windows
    token = "two-processes-one-store-token"
    total = waves * n
    counts = [total // 2, total - total // 2]
    store = tmp_path / "limits.sqlite3"
    async with Sandbox(tokens=frozenset({token}), max_requests=n, window=w) as sb:
        env = {**os.environ, "LEXER_API_TOKEN": token}
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                "--api-url",
                sb.api_url,
                "--status-url",
                sb.status_url,
                "--limit-store",
                str(store),
                "--count",
                str(count),
                "--max-requests",
                str(n),
                "--window",
                str(w),
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for count in counts
        ]
        outputs = [await proc.communicate() for proc in procs]
        for proc, (_, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err.decode()
            assert token.encode() not in err
        reports = [json.loads(out) for out, _ in outputs]
        key = token_key(token)
        arrivals = sorted(sb.stats.arrivals[key])

    assert sb.stats.rate_limited == 0
    assert sum(r["rate_limited"] for r in reports) == 0
    assert len(arrivals) == total
    assert sb.stats.max_in_window(key, w) <= n
    # after the first burst of N, the rest can arrive no faster than N per W
    rate = (total - n) / (arrivals[-1] - arrivals[0])
    print(f"2 processes: {rate:.2f} req/s = {rate / (n / w):.1%} of N/W, 0 429s")
    # 75 %, not 100 %: on a loaded 2-core machine each process wakes late (87 % seen at load
    # 10); a limiter that wakes its waiters a window late gets at most 67 % here.
    assert rate >= 0.75 * n / w, f"{rate:.2f} req/s is under 75 % of {n / w:.2f}"
