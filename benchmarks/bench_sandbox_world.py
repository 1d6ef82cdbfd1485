"""The sandbox's world: memory stays bounded however many tokens and years are queried, and
what a report costs to compute.

In one process, for ``--tokens`` tokens, every month of ``--years`` years is queried as a
summary and a case_summary (calling the sandbox's report builder directly, no HTTP), so every
day of every token's world is generated once. Peak RSS is sampled after each tenth of the
tokens: it must level off at the day LRU's size (`_world.DAY_CACHE_SIZE` days), not grow
with tokens x years. Then the cost of one report over 30 days and over 12 months, on days
already generated, is timed per report type.

    python benchmarks/bench_sandbox_world.py [--quick] [--tokens N] [--years Y]
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import _common as c

from lexer_activity_async.limits import token_key
from lexer_activity_async.reports import ReportType, add_months
from lexer_activity_async.sandbox import _data, _world

NOW = datetime(2026, 6, 15, tzinfo=timezone.utc)


def memory(tokens: int, years: int) -> dict[str, Any]:
    first = add_months(NOW.replace(day=1, hour=0), -12 * years)
    samples = []
    started = time.perf_counter()
    queries = 0
    for t in range(tokens):
        key = token_key(f"bench-world-token-{t}")
        month = first
        while month < NOW:
            nxt = add_months(month, 1)
            for kind in (ReportType.SUMMARY, ReportType.CASE_SUMMARY):
                _data.build_report(kind, key, month, nxt - timedelta(seconds=1), {}, now=NOW)
                queries += 1
            month = nxt
        if (t + 1) % max(1, tokens // 10) == 0 or t + 1 == tokens:
            samples.append({"tokens": t + 1, "peak_rss_mb": c.self_peak_rss() / c.MB})
    wall = time.perf_counter() - started
    info = _world.day.cache_info()
    return {
        "tokens": tokens,
        "years": years,
        "queries": queries,
        "days_generated": info.misses,
        "day_cache_size": info.maxsize,
        "wall_s": wall,
        "us_per_generated_day": wall / max(1, info.misses) * 1e6,
        "rss_samples": samples,
        "peak_rss_mb": samples[-1]["peak_rss_mb"],
    }


def cost(target_s: float) -> dict[str, Any]:
    key = token_key("bench-world-cost")
    out: dict[str, Any] = {}
    for label, days in (("30_days", 30), ("12_months", 365)):
        end = NOW - timedelta(days=1)
        start = end - timedelta(days=days)
        row: dict[str, float] = {}
        for kind in ReportType:
            params = {"form": 55} if kind.needs_form else {}
            _data.build_report(kind, key, start, end, params, now=NOW)  # generate the days
            calls, begun = 0, time.perf_counter()
            while time.perf_counter() - begun < target_s:
                _data.build_report(kind, key, start, end, params, now=NOW)
                calls += 1
            row[kind.value] = (time.perf_counter() - begun) / calls * 1e6
        out[label] = row
    return out


def main() -> None:
    parser = c.base_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--years", type=int, default=3)
    args = parser.parse_args()
    tokens = args.tokens or (40 if args.quick else 1000)
    mem = memory(tokens, args.years)
    costs = cost(0.05 if args.quick else 0.3)
    c.print_table(
        f"World memory: {tokens} tokens x {args.years} years, monthly summary + case_summary",
        ["tokens so far", "peak RSS MB"],
        [[s["tokens"], s["peak_rss_mb"]] for s in mem["rss_samples"]],
    )
    print(
        f"{mem['queries']} queries, {mem['days_generated']} days generated "
        f"({mem['us_per_generated_day']:.0f} us each, LRU of {mem['day_cache_size']} days)"
    )
    c.print_table(
        "Report cost on generated days (us per report)",
        ["report type", "30 days", "12 months"],
        [[k, costs["30_days"][k], costs["12_months"][k]] for k in costs["30_days"]],
    )
    c.write_results(
        "bench_sandbox_world",
        {"config": {"quick": args.quick}, "memory": mem, "report_cost_us": costs},
    )


if __name__ == "__main__":
    main()
