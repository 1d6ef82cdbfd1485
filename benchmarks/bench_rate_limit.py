"""Rate-limit efficiency and report fan-out, in real time against the sandbox
.

The sandbox runs in a separate process (pinned to CPU 1; this process to CPU 0) and
enforces a strict sliding window of N requests per W seconds per token on arrival. Its
counters are read through ``_sandbox_server.py``'s control endpoint.

1. One token sends R requests (``summary`` reports, all gathered at once) as fast as its
   limiter allows. Measured from the first send to the last completion (T):
     - lower bound: ``(ceil(R/N) - 1) * W`` (the first N go at once, each further N must
       wait a full window);
     - efficiency = lower_bound / T (1.0 is perfect);
     - sustained rate = (R - N) / T, the requests after the first burst over the elapsed
       time, as a percentage of N/W (target >= 97 %; equals the efficiency when N
       divides R);
     - 429s seen by the sandbox (must be 0) and by the client (``client.stats``);
     - max arrivals of the token in any W-second span as seen by the sandbox (<= N).
   Repeated ``--runs`` times (fresh tokens each time); medians reported.
2. ``--tokens`` tokens at once (one `LexerClient` each, sharing one aiohttp session),
   each sending R requests: every token's efficiency (min and median), its 429s and its
   max-in-window.
3. Fan-out: with the limit lifted and a server latency of ``--latency`` s, all 12 report
   types for one token gathered at once should take about as long as the slowest single
   report, not the sum: ratios gathered/slowest-single and gathered/sum-of-singles.

    python benchmarks/bench_rate_limit.py [--quick] [--runs N] [--requests R] [--tokens K]
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import _common as c
import aiohttp

from lexer_activity_async import LexerClient, LimiterRegistry, ReportType
from lexer_activity_async.limits import token_key
from lexer_activity_async.sandbox import Sandbox

NPS_FORM = min(Sandbox.nps_form_ids())
DATE_TO = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
DATE_FROM = DATE_TO - timedelta(days=30)


def new_token(tag: str) -> str:
    return f"bench-{tag}-{secrets.token_hex(8)}"


async def drive_token(client: LexerClient, requests: int, t0: float) -> dict[str, float]:
    """Send ``requests`` summaries through ``client`` at once; times relative to ``t0``."""
    done: list[float] = []

    async def one() -> None:
        await client.summary(DATE_FROM, DATE_TO)
        done.append(time.perf_counter() - t0)

    await asyncio.gather(*(one() for _ in range(requests)))
    return {"elapsed_s": max(done), "client_429": client.stats.rate_limited}


def judge(elapsed: float, requests: int, n: int, w: float) -> dict[str, float]:
    lower = (math.ceil(requests / n) - 1) * w
    return {
        "elapsed_s": elapsed,
        "lower_bound_s": lower,
        "efficiency": c.ratio(lower, elapsed),
        "rate_per_s": requests / elapsed,
        "sustained_rate_pct": c.ratio((requests - n) / elapsed, n / w) * 100,
    }


async def run_tokens(
    sb: c.SandboxProcess,
    tokens: list[str],
    requests: int,
    n: int,
    w: float,
    shared_session: bool = True,
) -> list[dict[str, Any]]:
    """All ``tokens`` at once, each with its own client; one shared aiohttp session (its
    pool of 100 connections), or with ``shared_session=False`` each client its own."""
    registry = LimiterRegistry()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
        clients = [
            LexerClient(
                token,
                api_url=sb.api_url,
                status_url=sb.status_url,
                session=session if shared_session else None,
                max_requests=n,
                window=w,
                registry=registry,
            )
            for token in tokens
        ]
        for client in clients:
            await client.open()
        try:
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            server_before = c.proc_cpu_seconds(sb.pid) or 0.0
            outcomes = await asyncio.gather(*(drive_token(cl, requests, t0) for cl in clients))
            wall = time.perf_counter() - t0
            client_util = (time.process_time() - cpu0) / wall
            server_util = ((c.proc_cpu_seconds(sb.pid) or 0.0) - server_before) / wall
        finally:
            for client in clients:
                await client.aclose()
    stats = sb.stats(window=w)
    rows = []
    for token, outcome in zip(tokens, outcomes, strict=True):
        key = token_key(token)
        row: dict[str, Any] = judge(outcome["elapsed_s"], requests, n, w)
        row |= {
            "client_429": outcome["client_429"],
            "server_429": stats["rate_limited_by_token"].get(key, 0),
            "server_requests": stats["requests"].get(key, 0),
            "max_in_window": stats["max_in_window"].get(key, 0),
            "server_cpu_util": server_util,
            "client_cpu_util": client_util,
            "all_tokens_rate_per_s": requests * len(tokens) / wall,
        }
        rows.append(row)
    return rows


async def fan_out(sb: c.SandboxProcess, runs: int) -> dict[str, Any]:
    specs = [(kind, {"form": NPS_FORM} if kind.needs_form else {}) for kind in ReportType]
    async with LexerClient(
        new_token("fanout"),
        api_url=sb.api_url,
        status_url=sb.status_url,
        max_requests=10**9,
        window=1.0,
        registry=LimiterRegistry(),
    ) as client:

        async def call(spec: tuple[ReportType, dict[str, Any]]) -> None:
            await client.report(spec[0], DATE_FROM, DATE_TO, **spec[1])

        async def gathered() -> float:
            start = time.perf_counter()
            await asyncio.gather(*(call(spec) for spec in specs))
            return time.perf_counter() - start

        await gathered()  # warm-up: open the 12 connections
        samples = []
        for _ in range(runs):
            singles = {}
            for spec in specs:
                start = time.perf_counter()
                await call(spec)
                singles[spec[0].value] = time.perf_counter() - start
            together = await gathered()
            slowest = max(singles.values())
            samples.append(
                {
                    "gathered_s": together,
                    "slowest_single_s": slowest,
                    "sum_singles_s": sum(singles.values()),
                    "gathered_over_slowest": together / slowest,
                    "gathered_over_sum": together / sum(singles.values()),
                }
            )
    return {key: c.median(s[key] for s in samples) for key in samples[0]} | {
        "reports": len(specs),
        "runs": samples,
    }


async def main_async(args: Any) -> dict[str, Any]:
    client_cpu, server_cpu = c.cpu_plan(args.no_pin)
    c.pin_self(client_cpu)
    n, w, r = args.max_requests, args.window, args.requests
    results: dict[str, Any] = {
        "config": {
            "max_requests": n,
            "window_s": w,
            "requests_per_token": r,
            "windows_spanned": math.ceil(r / n),
            "runs_single": args.runs,
            "tokens": args.tokens,
            "shared_session": not args.session_per_token,
            "fanout_latency_s": args.latency,
            "fanout_runs": args.fanout_runs,
            "client_cpu": client_cpu,
            "server_cpu": server_cpu,
            "quick": args.quick,
        }
    }
    with c.SandboxProcess(max_requests=n, window=w, cpu=server_cpu) as sb:
        singles = []
        for run in range(args.runs):
            (row,) = await run_tokens(sb, [new_token(f"single{run}")], r, n, w)
            singles.append(row)
            print(
                f"single token run {run + 1}/{args.runs}: {row['elapsed_s']:.2f}s, "
                f"efficiency {row['efficiency']:.3f}, 429s {row['server_429']}",
                flush=True,
            )
        multi_tokens = [new_token(f"multi{i}") for i in range(args.tokens)]
        multi = await run_tokens(sb, multi_tokens, r, n, w, not args.session_per_token)
        totals = sb.stats(window=w)
    results["single"] = {
        "runs": singles,
        "median": {key: c.median(row[key] for row in singles) for key in singles[0]},
        "max_in_window_max": max(row["max_in_window"] for row in singles),
        "server_429_total": sum(row["server_429"] for row in singles),
        "client_429_total": sum(row["client_429"] for row in singles),
    }
    effs = [row["efficiency"] for row in multi]
    results["multi"] = {
        "tokens": len(multi),
        "efficiency_min": min(effs),
        "efficiency_median": c.median(effs),
        "sustained_rate_pct_min": min(row["sustained_rate_pct"] for row in multi),
        "sustained_rate_pct_median": c.median(row["sustained_rate_pct"] for row in multi),
        "elapsed_s_max": max(row["elapsed_s"] for row in multi),
        "lower_bound_s": multi[0]["lower_bound_s"],
        "max_in_window_max": max(row["max_in_window"] for row in multi),
        "server_429_total": sum(row["server_429"] for row in multi),
        "client_429_total": sum(row["client_429"] for row in multi),
        "server_cpu_util": multi[0]["server_cpu_util"],
        "client_cpu_util": multi[0]["client_cpu_util"],
        "all_tokens_rate_per_s": multi[0]["all_tokens_rate_per_s"],
        # Every token done at the lower bound: K * R requests in lower_bound seconds.
        "needed_rate_per_s": c.ratio(len(multi) * r, multi[0]["lower_bound_s"]),
        "per_token": multi,
    }
    results["sandbox_rate_limited_total"] = totals["rate_limited"]
    lifted = {"max_requests": 10**9, "window": 1.0, "latency": args.latency}
    with c.SandboxProcess(cpu=server_cpu, **lifted) as sb:
        results["fanout"] = await fan_out(sb, args.fanout_runs)
    return results


def report(results: dict[str, Any]) -> None:
    cfg = results["config"]
    n, w, r = cfg["max_requests"], cfg["window_s"], cfg["requests_per_token"]
    s, m = results["single"], results["multi"]
    sm = s["median"]
    c.print_table(
        f"Rate limit N={n} per W={w:g}s, R={r} requests per token "
        f"({cfg['windows_spanned']} windows), lower bound {sm['lower_bound_s']:g}s",
        [
            "case",
            "elapsed s",
            "efficiency",
            "sustained % of N/W",
            "R/T per s",
            "429 server",
            "429 client",
            "max in W",
        ],
        [
            [
                f"1 token (median of {len(s['runs'])})",
                sm["elapsed_s"],
                sm["efficiency"],
                sm["sustained_rate_pct"],
                sm["rate_per_s"],
                s["server_429_total"],
                s["client_429_total"],
                s["max_in_window_max"],
            ],
            [
                f"{m['tokens']} tokens: min",
                m["elapsed_s_max"],
                m["efficiency_min"],
                m["sustained_rate_pct_min"],
                "",
                m["server_429_total"],
                m["client_429_total"],
                m["max_in_window_max"],
            ],
            [
                f"{m['tokens']} tokens: median",
                "",
                m["efficiency_median"],
                m["sustained_rate_pct_median"],
                "",
                "",
                "",
                "",
            ],
        ],
    )
    print(
        f"targets: efficiency/sustained >= 97 %, 429s == 0, max in W <= {n}; "
        f"sandbox 429s in all: {results['sandbox_rate_limited_total']}.\n"
        f"{m['tokens']}-token run: {m['all_tokens_rate_per_s']:.0f} requests/s achieved in all "
        f"vs {m['needed_rate_per_s']:.0f}/s needed for full efficiency; CPU use: client "
        f"{m['client_cpu_util']:.0%}, sandbox {m['server_cpu_util']:.0%}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    f = results["fanout"]
    c.print_table(
        f"Fan-out: {f['reports']} report types gathered, server latency "
        f"{cfg['fanout_latency_s']:g}s (median of {cfg['fanout_runs']} runs)",
        ["gathered s", "slowest single s", "sum of singles s", "gathered/slowest", "gathered/sum"],
        [
            [
                f["gathered_s"],
                f["slowest_single_s"],
                f["sum_singles_s"],
                f["gathered_over_slowest"],
                f["gathered_over_sum"],
            ]
        ],
    )


def main() -> None:
    parser = c.base_parser(__doc__)
    parser.add_argument("--max-requests", type=int, default=100, help="N")
    parser.add_argument("--window", type=float, default=None, help="W seconds")
    parser.add_argument("--requests", type=int, default=None, help="R per token")
    parser.add_argument("--tokens", type=int, default=None, help="tokens in the multi case")
    parser.add_argument(
        "--session-per-token",
        action="store_true",
        help="multi case: each client its own aiohttp session (default: one shared)",
    )
    parser.add_argument("--latency", type=float, default=0.2, help="fan-out server latency")
    args = parser.parse_args()
    quick = args.quick
    if quick:
        args.max_requests = 20 if args.max_requests == 100 else args.max_requests
    args.window = args.window if args.window is not None else (1.0 if quick else 5.0)
    args.requests = args.requests if args.requests is not None else (60 if quick else 700)
    args.tokens = args.tokens if args.tokens is not None else (5 if quick else 50)
    args.runs = args.runs if args.runs is not None else (1 if quick else 3)
    args.fanout_runs = 2 if quick else 5
    results = asyncio.run(main_async(args))
    report(results)
    c.write_results("bench_rate_limit", results)


if __name__ == "__main__":
    main()
