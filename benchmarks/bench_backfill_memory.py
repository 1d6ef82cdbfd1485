"""Peak memory per token of a backfill, as tokens grow (issue 15, item 3).

Each measured backfill runs in a fresh child process (this script with ``--worker``), so
its peak RSS is its own (``os.wait4``); the sandbox runs in another process. Memory per
token is ``(peak RSS(K) - peak RSS(1)) / (K - 1)``: what each further token costs, the
interpreter and libraries set apart.

Plans: reports only (all 12 types), one-month windows; ``--tokens`` (default 1, 100 and
1,000; ``--tokens 1 10000`` for the largest) over one month (12 requests per token, under
N = 100: no token waits for its rate window), and ``--long-tokens`` (default 1 and 10)
over 26 months (220 requests per token joined, three rate windows). The window is scaled
down from the real 300 s to ``--window`` (default 20 s), the same in the sandbox. Caps: the spec's
defaults (8 per token, 64 in all) unless ``--per-token``/``--total``. The sandbox's world
is thinned (``daily_volume`` 2 messages a day, not 24) and keeps every token's days
(``--day-cache``), so that it serves 10,000 tokens quickly; the client's work per request
has the same shape either way.

    python benchmarks/bench_backfill_memory.py [--quick] [--tokens 1 100 1000]
        [--long-tokens 1 10] [--runs N] [--window W] [--per-token P] [--total T]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import _common as c

from lexer_activity_async import LimiterRegistry
from lexer_activity_async.backfill import ALL_REPORTS, BackfillSpec, TokenSource, run_backfill
from lexer_activity_async.reports import add_months

DATE_TO = datetime(2025, 1, 1, tzinfo=timezone.utc)
TARGET_KB = 100.0


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    labels = [f"t{i:05d}" for i in range(args.tokens)]
    # Token files, not environment variables: aiohttp reads the proxy settings from the
    # whole environment on every request (trust_env), and 10,000 variables made that
    # most of the client's CPU.
    token_dir = Path(tempfile.mkdtemp(prefix="bench-memory-tokens-", dir=args.output_dir))
    for label in labels:
        # Fresh tokens each run: the sandbox still counts the last run's requests.
        (token_dir / label).write_text(f"bench-mem-{args.nonce}-{label}-0123456789abcdef")
    output = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=args.output_dir))
    spec = BackfillSpec(
        tokens=tuple(TokenSource(label, file=token_dir / label) for label in labels),
        date_from=add_months(DATE_TO, -args.months),
        date_to=DATE_TO,
        output=output,
        reports=ALL_REPORTS,
        nps_form=55,
        api_url=args.api_url,
        status_url=args.status_url,
        max_requests=100,
        window=args.window,
        per_token_concurrency=args.per_token,
        total_concurrency=args.total,
    )
    started = time.perf_counter()
    summary = await run_backfill(spec, registry=LimiterRegistry())
    wall = time.perf_counter() - started
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(token_dir, ignore_errors=True)
    return {
        "ok": summary.ok,
        "requests": summary.requests,
        "files": summary.files,
        "wall_s": wall,
        "rate_limited": summary.rate_limited,
        "retries": summary.retries,
    }


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for name in ("--api-url", "--status-url", "--output-dir", "--nonce"):
        parser.add_argument(name)
    for name in ("--tokens", "--months", "--per-token", "--total"):
        parser.add_argument(name, type=int)
    parser.add_argument("--window", type=float)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(worker(args))), flush=True)


def one_run(args: argparse.Namespace, sb: c.SandboxProcess, tokens: int, months: int) -> Any:
    cmd = [sys.executable, __file__, "--worker", "--api-url", sb.api_url]
    cmd += ["--status-url", sb.status_url, "--output-dir", str(args.output_dir)]
    cmd += ["--tokens", str(tokens), "--months", str(months), "--window", str(args.window)]
    cmd += ["--per-token", str(args.per_token), "--total", str(args.total)]
    cmd += ["--nonce", secrets.token_hex(6)]
    child = c.run_child(cmd, timeout=7200)
    if child.returncode != 0:
        raise RuntimeError(f"worker failed ({child.returncode}):\n{child.stderr}")
    result: dict[str, Any] = json.loads(child.stdout.splitlines()[-1])
    if not result["ok"] or result["files"] != tokens * 12 * months:
        raise RuntimeError(f"backfill incomplete: {result}")
    return {**result, "tokens": tokens, "months": months, "peak_rss_mb": child.peak_rss / c.MB}


def series(
    args: argparse.Namespace, sb: c.SandboxProcess, counts: list[int], months: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for tokens in counts:
        runs = [one_run(args, sb, tokens, months) for _ in range(args.runs)]
        rows.append(
            {
                "tokens": tokens,
                "months": months,
                "runs": len(runs),
                "requests_per_token": runs[0]["requests"] / tokens,
                "rate_limited": sum(r["rate_limited"] for r in runs),
                "retries": sum(r["retries"] for r in runs),
                "wall_s": c.median(r["wall_s"] for r in runs),
                "peak_rss_mb": c.median(r["peak_rss_mb"] for r in runs),
                "peak_rss_mb_min_max": c.spread(r["peak_rss_mb"] for r in runs),
            }
        )
        print(f"  {months} months, {tokens} tokens: {rows[-1]}", flush=True)
    base = rows[0]
    for row in rows:
        extra = row["tokens"] - base["tokens"]
        row["kb_per_token"] = (
            (row["peak_rss_mb"] - base["peak_rss_mb"]) * 1000 / extra if extra else None
        )
        row["within_target"] = row["kb_per_token"] is None or row["kb_per_token"] <= TARGET_KB
    return rows


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker_main(sys.argv[2:])
        return
    parser = c.base_parser(__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--long-tokens", type=int, nargs="*", default=None)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--per-token", type=int, default=8)
    parser.add_argument("--total", type=int, default=64)
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 2)
    args.tokens = args.tokens or ([1, 20] if args.quick else [1, 100, 1000])
    if args.long_tokens is None:
        args.long_tokens = [] if args.quick else [1, 10]
    args.output_dir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    config = {"max_requests": 100, "window": args.window, "tokens": None, "daily_volume": 2}
    try:
        # Every token's days kept: with the world's default 1,024, tokens taking turns
        # make the sandbox regenerate each token's days for every request.
        days = max(args.tokens + args.long_tokens) * (31 * 26 + 40)
        with c.SandboxProcess(day_cache=min(days, 500_000), **config) as sb:
            short = series(args, sb, args.tokens, 1)
            long = series(args, sb, args.long_tokens, 26) if args.long_tokens else []
    finally:
        shutil.rmtree(args.output_dir, ignore_errors=True)
    headers = ("months", "tokens", "req/token", "429s", "wall s", "peak RSS MB", "KB per token")
    rows = [
        (
            r["months"],
            r["tokens"],
            f"{r['requests_per_token']:.0f}",
            r["rate_limited"],
            f"{r['wall_s']:.1f}",
            "{:.1f} ({:.1f}-{:.1f})".format(r["peak_rss_mb"], *r["peak_rss_mb_min_max"]),
            "-" if r["kb_per_token"] is None else f"{r['kb_per_token']:.1f}",
        )
        for r in [*short, *long]
    ]
    c.print_table(f"Backfill peak memory per token (target <= {TARGET_KB:.0f} KB)", headers, rows)
    path = c.write_results(
        "backfill_memory", {"environment": c.environment(), "one_month": short, "long": long}
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
