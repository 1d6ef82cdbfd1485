"""Backfill wall time against the rate-limit lower bound, and peak memory as tokens grow
(the bulk-backfill issue, item 7).

The sandbox runs in a separate process (``_common.SandboxProcess``, pinned to CPU 1)
enforcing N requests per W seconds per token on arrival. Each measured backfill runs in a
fresh child process (this script with ``--worker``, pinned to CPU 0), so its peak RSS is
its own (``os.wait4``) and the server's CPU does not compete inside its event loop.

Spec: K tokens, reports only (all 12 types), one-month windows over ``--months`` months.
Two plans, in the same run (``--plans``): ``each``, every window fetched alone, so each
token makes ``12 * months`` requests (default 12 x 26 = 312: four bursts of at most N=100,
three full windows to wait), the plan before issue 15; and ``joined``, the planner's:
the four series reports fetched in spans of up to 12 months and sliced per window
(8 x 26 + 4 x 3 = 220: three bursts, two windows to wait). The comparison table gives
joined / each for requests (target <= 0.72) and the joined wall time over the each-plan's
floor, today's floor (target <= 0.75, i.e. at least 25 % faster).

The window is scaled down from the real 300 s (``scaled_window``): 5 s, but never under
3 ms per request of one window's burst, so 1 and 10 tokens run at W = 5 s (floor 15 s)
and 200 tokens at W = 60 s (floor 180 s). ``--window`` forces one W for every count, e.g.
``--tokens 200 --window 5`` for the CPU-bound stress case.

Concurrency caps: ``--per-token`` (default 100, so a token's burst is not held back) and
``--total`` (default 100: the sandbox listens with aiohttp's default backlog of 128, and
more simultaneous connects than that overflow it; the kernel then drops SYNs and the
client's retransmits after 1 s and 3 s dominate the wall time. The table counts those
drops, from ``/proc/net/netstat``).

For each run:
  - wall: ``run_backfill`` from call to return, in the child;
  - floor: ``backfill.rate_limit_floor(R_t, N, W)`` per token from the requests that token
    ACTUALLY made (its limiter's count, cross-checked with the sandbox's arrivals), and the
    run's floor is the largest (tokens run in parallel);
  - ratio = wall / floor (target <= 1.05), and each token's own finish time / own floor;
  - CPU: the child's CPU seconds / wall (near 100 % on its one CPU means client-bound)
    and the sandbox's (near 100 % means server-bound);
  - 429s (must be 0) and the sandbox's max arrivals of any token in any W span (<= N);
  - peak RSS of the child;
  - the CPU share a busy loop gets on the child's CPU just before the run, since a shared
    or throttled machine gives a process less than a whole core.
Medians over ``--runs`` runs (fresh tokens each run); a token count whose run makes more
than 20,000 requests gets at most ``--big-runs`` runs (default 3; each takes over 3 min).

    python benchmarks/bench_backfill.py [--quick] [--runs N] [--big-runs N]
        [--tokens 1 10 200] [--months M] [--window W] [--per-token P] [--total T] [--no-pin]
        [--plans each joined]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import _common as c

from lexer_activity_async import LimiterRegistry
from lexer_activity_async.backfill import (
    ALL_REPORTS,
    BackfillEvent,
    BackfillSpec,
    TokenSource,
    UnitFinished,
    plan,
    rate_limit_floor,
    run_backfill,
)
from lexer_activity_async.limits import token_key
from lexer_activity_async.reports import add_months

NPS_FORM = 55
TARGET = 1.05
TARGET_REQUESTS = 0.72
TARGET_WALL = 0.75
PLANS = ("each", "joined")
MAX_DAY_CACHE = 20_000
BURST_BUDGET_S = 0.003  # wall seconds a scaled window allows per request of its burst
DATE_TO = datetime(2025, 1, 1, tzinfo=timezone.utc)


# -- the child: one backfill, measured from inside ---------------------------------------


def token_labels(count: int) -> list[str]:
    return [f"t{i:03d}" for i in range(count)]


def token_env(label: str) -> str:
    """The environment variable the child reads ``label``'s token from (set by the parent,
    which warms the sandbox's world for those tokens first)."""
    return f"BENCH_BACKFILL_{label.upper()}"


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    labels = token_labels(args.tokens)
    tokens = {label: os.environ[token_env(label)] for label in labels}
    output = Path(tempfile.mkdtemp(prefix="bench-backfill-", dir=args.output_dir))
    spec = BackfillSpec(
        tokens=tuple(TokenSource(label, env=token_env(label)) for label in labels),
        date_from=add_months(DATE_TO, -args.months),
        date_to=DATE_TO,
        output=output,
        reports=ALL_REPORTS,
        nps_form=NPS_FORM,
        api_url=args.api_url,
        status_url=args.status_url,
        max_requests=args.max_requests,
        window=args.window,
        per_token_concurrency=args.per_token,
        total_concurrency=args.total,
    )
    registry = LimiterRegistry()
    finished_at: dict[str, float] = {}
    requests: dict[str, int] = {}
    t0 = 0.0

    def on_event(event: BackfillEvent) -> None:
        if isinstance(event, UnitFinished):
            finished_at[event.unit.label] = time.perf_counter() - t0

    async def measured() -> Any:
        nonlocal t0
        t0 = time.perf_counter()
        summary = await run_backfill(
            spec, on_event=on_event, registry=registry, join=args.plan == "joined"
        )
        limiters = registry.limiters()
        for label, token in tokens.items():
            requests[label] = limiters[token_key(token)].stats.requests
        return summary

    busy_wall, busy_cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - busy_wall < 0.3:
        pass
    cpu_share = (time.process_time() - busy_cpu) / (time.perf_counter() - busy_wall)
    cpu0 = time.process_time()
    summary = await measured()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    shutil.rmtree(output, ignore_errors=True)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_share": cpu_share,
        "planned_requests_per_token": plan(spec).requests_of(labels[0], join=args.plan == "joined"),
        "requests": requests,
        "finished_at_s": finished_at,
        "keys": {label: token_key(token) for label, token in tokens.items()},
        "ok": summary.ok,
        "units_done": sum(summary.done.values()),
        "rate_limited": summary.rate_limited,
        "retries": summary.retries,
        "files": summary.files,
        "bytes": summary.bytes,
        "self_peak_rss": c.self_peak_rss(),
    }


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for name in ("--api-url", "--status-url", "--output-dir"):
        parser.add_argument(name)
    for name in ("--tokens", "--months", "--max-requests", "--per-token", "--total"):
        parser.add_argument(name, type=int)
    parser.add_argument("--window", type=float)
    parser.add_argument("--plan", choices=PLANS, default="joined")
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args(argv)
    c.pin_self(args.cpu)
    print(json.dumps(asyncio.run(worker(args))), flush=True)


# -- the parent: sandbox process, children, tables -----------------------------------------


def days_per_token(months: int) -> int:
    """World days a backfill of ``months`` months reads per token, rounded up (cases look
    a week back)."""
    return 31 * months + 40


def scaled_window(tokens: int, max_requests: int, quick: bool = False) -> float:
    """The scaled rate window for ``tokens``: 5 s (1 s with --quick), the real 300 s cut
    60-fold, but never less than 3 ms per request of one window's burst (tokens x N),
    rounded up to 5 s. Below that the run measures how fast this 2-core machine can make
    and serve requests, not the client's scheduling: the real window gives each request
    of a 200-token burst 15 ms; at W = 5 s it would get 0.25 ms, less than bare aiohttp
    needs (~0.5 ms), so no client could come near the floor. --quick steps by 1 s."""
    step = 1.0 if quick else 5.0
    needed = tokens * max_requests * BURST_BUDGET_S
    return max(step, math.ceil(needed / step) * step)


def listen_drops() -> int | None:
    """SYNs the kernel dropped because a listen queue was full (``ListenDrops``), or None."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(fields["ListenDrops"]) if "ListenDrops" in fields else None
    return None


def one_run(
    args: argparse.Namespace,
    sb: c.SandboxProcess,
    tokens: int,
    window: float,
    client_cpu: int | None,
    plan_name: str = "joined",
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--api-url",
        sb.api_url,
        "--status-url",
        sb.status_url,
        "--output-dir",
        str(args.output_dir),
        "--tokens",
        str(tokens),
        "--months",
        str(args.months),
        "--max-requests",
        str(args.max_requests),
        "--window",
        str(window),
        "--per-token",
        str(args.per_token),
        "--total",
        str(args.total),
        "--plan",
        plan_name,
    ]
    if client_cpu is not None:
        cmd += ["--cpu", str(client_cpu)]
    tokens_of = {label: f"bench-{secrets.token_hex(12)}" for label in token_labels(tokens)}
    env = {**os.environ, **{token_env(label): token for label, token in tokens_of.items()}}
    warmed: dict[str, Any] = {"generated": 0, "cpu_s": 0.0}
    if not args.cold and tokens * days_per_token(args.months) <= args.day_cache:
        # Every day the backfill's requests read (cases look LAG_DAYS back), generated now,
        # the same for both plans: the run then times the client and its plan, not the
        # simulator's first touch of each day. (Not when the sandbox's day cache cannot
        # hold them all: the run would regenerate what it evicted.)
        warm_keys = [token_key(token) for token in tokens_of.values()]
        warmed = sb.warm(warm_keys, add_months(DATE_TO, -args.months), DATE_TO)
    generated0 = sb.stats(window)["days_generated"]
    server_cpu0, drops0 = c.proc_cpu_seconds(sb.pid), listen_drops()
    child = c.run_child(cmd, timeout=3600, env=env)
    server_cpu1, drops1 = c.proc_cpu_seconds(sb.pid), listen_drops()
    if child.returncode != 0:
        raise RuntimeError(f"worker failed ({child.returncode}):\n{child.stderr}")
    result: dict[str, Any] = json.loads(child.stdout.splitlines()[-1])
    stats = sb.stats(window)
    days_generated = stats["days_generated"] - generated0
    n, w = args.max_requests, window
    floors = {label: rate_limit_floor(r, n, w) for label, r in result["requests"].items()}
    floor = max(floors.values())
    per_token = [
        c.ratio(result["finished_at_s"][label], floors[label])
        for label in floors
        if floors[label] > 0
    ]
    keys = result["keys"].values()
    server_requests = {
        label: stats["requests"].get(key, 0) for label, key in result["keys"].items()
    }
    wall = result["wall_s"]
    server_cpu = (server_cpu1 - server_cpu0) if server_cpu0 is not None and server_cpu1 else None
    return {
        "plan": plan_name,
        "tokens": tokens,
        "window_s": window,
        "wall_s": wall,
        "floor_s": floor,
        "ratio": c.ratio(wall, floor),
        "per_token_ratio_median": c.median(per_token),
        "per_token_ratio_max": max(per_token) if per_token else float("nan"),
        "requests_total": sum(result["requests"].values()),
        "requests_per_token_min_max": c.spread(result["requests"].values()),
        "planned_requests_per_token": result["planned_requests_per_token"],
        "server_requests_match": server_requests == result["requests"],
        "client_cpu_pct": 100 * result["cpu_s"] / wall,
        "client_cpu_ms_per_request": 1000 * result["cpu_s"] / sum(result["requests"].values()),
        "cpu_share_pct": 100 * result["cpu_share"],
        "syn_drops": drops1 - drops0 if drops0 is not None and drops1 is not None else None,
        "server_cpu_pct": 100 * server_cpu / wall if server_cpu is not None else None,
        "client_429": result["rate_limited"],
        "server_429": sum(stats["rate_limited_by_token"].get(k, 0) for k in keys),
        "max_in_window": max(stats["max_in_window"].get(k, 0) for k in keys),
        "retries": result["retries"],
        "ok": result["ok"],
        "units_done": result["units_done"],
        "files": result["files"],
        "bytes": result["bytes"],
        "peak_rss_mb": child.peak_rss / c.MB,
        "child_wall_s": child.wall,
        "days_warmed": warmed["generated"],
        "warm_cpu_s": warmed["cpu_s"],
        "days_generated_in_run": days_generated,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return c.median(r[key] for r in runs if r[key] is not None)

    return {
        "plan": runs[0]["plan"],
        "tokens": runs[0]["tokens"],
        "window_s": runs[0]["window_s"],
        "runs": len(runs),
        "wall_s": med("wall_s"),
        "wall_s_min_max": c.spread(r["wall_s"] for r in runs),
        "floor_s": med("floor_s"),
        "ratio": med("ratio"),
        "ratio_min_max": c.spread(r["ratio"] for r in runs),
        "within_target": med("ratio") <= TARGET,
        "over_target_pct": max(0.0, (med("ratio") - 1) * 100),
        "per_token_ratio_median": med("per_token_ratio_median"),
        "per_token_ratio_max": med("per_token_ratio_max"),
        "requests_total": med("requests_total"),
        "requests_per_s": med("requests_total") / med("wall_s"),
        "client_cpu_pct": med("client_cpu_pct"),
        "client_cpu_ms_per_request": med("client_cpu_ms_per_request"),
        "cpu_share_pct": med("cpu_share_pct"),
        "syn_drops": max((r["syn_drops"] or 0) for r in runs),
        "server_cpu_pct": med("server_cpu_pct"),
        "client_429": max(r["client_429"] for r in runs),
        "server_429": max(r["server_429"] for r in runs),
        "max_in_window": max(r["max_in_window"] for r in runs),
        "all_ok": all(r["ok"] and r["server_requests_match"] for r in runs),
        "peak_rss_mb": med("peak_rss_mb"),
        "peak_rss_mb_min_max": c.spread(r["peak_rss_mb"] for r in runs),
        "days_generated_in_run": max(r["days_generated_in_run"] for r in runs),
    }


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker_main(sys.argv[2:])
        return
    parser = c.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument(
        "--months",
        type=int,
        default=None,
        help="months backfilled (12 report requests per month per token)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=None,
        help="rate window W (s) for every token count (default: scaled_window)",
    )
    parser.add_argument("--max-requests", type=int, default=100, help="rate limit N")
    parser.add_argument("--per-token", type=int, default=100, help="per-token unit cap")
    parser.add_argument("--total", type=int, default=100, help="overall unit cap")
    parser.add_argument("--plans", nargs="+", choices=PLANS, default=list(PLANS))
    parser.add_argument(
        "--cold",
        action="store_true",
        help="do not generate the sandbox world's days before each run (the run then "
        "includes the simulator's first touch of every day)",
    )
    parser.add_argument(
        "--big-runs", type=int, default=3, help="runs for token counts making over 20,000 requests"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the children write (default /dev/shm, else the temp dir)",
    )
    args = parser.parse_args()
    quick = args.quick
    args.runs = args.runs or (1 if quick else 3)
    args.tokens = args.tokens or ([1, 5, 20] if quick else [1, 10, 200])
    args.months = args.months or (9 if quick else 26)
    windows = {k: args.window or scaled_window(k, args.max_requests, quick) for k in args.tokens}
    if args.output_dir is None:
        shm = Path("/dev/shm")
        args.output_dir = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    args.output_dir = args.output_dir or Path(tempfile.gettempdir())
    client_cpu, server_cpu = c.cpu_plan(args.no_pin)
    per_token_requests = len(ALL_REPORTS) * args.months
    print(
        f"backfill: {len(ALL_REPORTS)} reports x {args.months} months = {per_token_requests} "
        f"requests per token; N={args.max_requests}; W (floor) by token count: "
        + ", ".join(
            f"{k}: {w:g}s ({rate_limit_floor(per_token_requests, args.max_requests, w):g}s)"
            for k, w in windows.items()
        )
        + f"; {args.runs} run(s) each; caps {args.per_token}/token, "
        f"{args.total} total; output under {args.output_dir}; "
        f"pinning client/server to CPUs {client_cpu}/{server_cpu}",
        flush=True,
    )
    cases = [(k, p) for k in args.tokens for p in args.plans]
    # Every token's days kept (up to ~500 MB): a joined 12-month fetch touches 373 days,
    # and with the world's default 1,024 the sandbox would regenerate them per request.
    day_cache = min(MAX_DAY_CACHE, max(args.tokens) * days_per_token(args.months))
    args.day_cache = day_cache
    all_runs: dict[tuple[int, str], list[dict[str, Any]]] = {case: [] for case in cases}
    with ExitStack() as stack:
        sandboxes = {
            w: stack.enter_context(
                c.SandboxProcess(
                    max_requests=args.max_requests, window=w, cpu=server_cpu, day_cache=day_cache
                )
            )
            for w in sorted(set(windows.values()))
        }
        for run in range(args.runs):
            for tokens, plan_name in cases:  # both plans in turn, under the same conditions
                big = tokens * per_token_requests > 20_000
                if big and run >= args.big_runs:
                    continue
                window = windows[tokens]
                result = one_run(args, sandboxes[window], tokens, window, client_cpu, plan_name)
                all_runs[(tokens, plan_name)].append(result)
                print(
                    f"  run {run + 1}: {tokens:4d} tokens {plan_name:6s} W {window:g}s  wall "
                    f"{result['wall_s']:7.2f}s  floor {result['floor_s']:6.2f}s  ratio "
                    f"{result['ratio']:.3f}  rss {result['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
    summaries = [summarise(all_runs[case]) for case in cases]
    c.print_table(
        f"Backfill wall time vs the rate-limit floor (medians of {args.runs}; target "
        f"ratio <= {TARGET})",
        [
            "tokens",
            "plan",
            "W s",
            "runs",
            "requests",
            "floor s",
            "wall s",
            "ratio",
            "ratio min-max",
            "excess s",
            "per-token med",
            "req/s",
            "client CPU %",
            "client CPU ms/req",
            "CPU share %",
            "server CPU %",
            "429s",
            "max/W",
            "SYN drops",
            "days made in run",
        ],
        [
            [
                s["tokens"],
                s["plan"],
                s["window_s"],
                s["runs"],
                int(s["requests_total"]),
                s["floor_s"],
                s["wall_s"],
                s["ratio"],
                "{:.3f}-{:.3f}".format(*s["ratio_min_max"]),
                s["wall_s"] - s["floor_s"],
                s["per_token_ratio_median"],
                s["requests_per_s"],
                s["client_cpu_pct"],
                s["client_cpu_ms_per_request"],
                s["cpu_share_pct"],
                s["server_cpu_pct"],
                s["client_429"] + s["server_429"],
                s["max_in_window"],
                s["syn_drops"],
                s["days_generated_in_run"],
            ]
            for s in summaries
        ],
    )
    by_case = {(s["tokens"], s["plan"]): s for s in summaries}
    compared = [k for k in args.tokens if (k, "each") in by_case and (k, "joined") in by_case]
    comparison = []
    for k in compared:
        each, joined = by_case[(k, "each")], by_case[(k, "joined")]
        comparison.append(
            {
                "tokens": k,
                "requests_each": each["requests_total"] / k,
                "requests_joined": joined["requests_total"] / k,
                "requests_ratio": joined["requests_total"] / each["requests_total"],
                "floor_each_s": each["floor_s"],
                "wall_each_s": each["wall_s"],
                "wall_joined_s": joined["wall_s"],
                "joined_wall_over_each_floor": joined["wall_s"] / each["floor_s"],
                "joined_wall_over_each_wall": joined["wall_s"] / each["wall_s"],
            }
        )
    if comparison:
        c.print_table(
            f"Joined plan vs window by window (same run; medians; targets: requests <= "
            f"{TARGET_REQUESTS}, wall <= {TARGET_WALL} x the window-by-window floor)",
            [
                "tokens",
                "req/token each",
                "joined",
                "ratio",
                "floor each s",
                "wall each s",
                "wall joined s",
                "joined wall / each floor",
                "joined wall / each wall",
            ],
            [
                [
                    row["tokens"],
                    int(row["requests_each"]),
                    int(row["requests_joined"]),
                    row["requests_ratio"],
                    row["floor_each_s"],
                    row["wall_each_s"],
                    row["wall_joined_s"],
                    row["joined_wall_over_each_floor"],
                    row["joined_wall_over_each_wall"],
                ]
                for row in comparison
            ],
        )
    summaries = [s for s in summaries if s["plan"] == args.plans[-1]]
    c.print_table(
        f"Peak RSS of the backfill process (MB, medians; plan {args.plans[-1]})",
        ["tokens", "peak RSS MB", "min-max", "MB per token over 1 token"],
        [
            [
                s["tokens"],
                s["peak_rss_mb"],
                "{:.0f}-{:.0f}".format(*s["peak_rss_mb_min_max"]),
                c.ratio(s["peak_rss_mb"] - summaries[0]["peak_rss_mb"], s["tokens"] - 1)
                if s["tokens"] > 1
                else float("nan"),
            ]
            for s in summaries
        ],
    )
    missed = [s for s in by_case.values() if not s["within_target"]]
    for s in missed:
        used = s["client_cpu_pct"] / max(s["cpu_share_pct"], 1e-9)
        burst_cpu = s["tokens"] * args.max_requests * s["client_cpu_ms_per_request"] / 1000
        bound = (
            "client CPU-bound throughout"
            if used >= 0.85
            else "server CPU-bound"
            if (s["server_cpu_pct"] or 0) >= 0.85 * s["cpu_share_pct"]
            else f"client CPU-bound during each window's burst: {s['tokens']} tokens x "
            f"N={args.max_requests} requests x {s['client_cpu_ms_per_request']:.2f} ms "
            f"= {burst_cpu:.1f} s of client CPU per window, vs "
            f"{s['wall_s'] - s['floor_s']:.1f} s over the floor"
        )
        print(
            f"\n{s['tokens']} tokens: {s['over_target_pct']:.1f}% over the floor "
            f"(target <= {(TARGET - 1) * 100:.0f}%); client CPU {s['client_cpu_pct']:.0f}% "
            f"and server CPU {s['server_cpu_pct']:.0f}% of a core, where a busy loop got "
            f"{s['cpu_share_pct']:.0f}%: {bound}; {s['requests_per_s']:.0f} requests/s "
            f"achieved vs {s['requests_total'] / max(s['floor_s'], 1e-9):.0f} needed to "
            f"meet the floor; {s['syn_drops']} SYNs dropped by the sandbox's listen queue"
        )
    c.write_results(
        "backfill",
        {
            "config": {
                "months": args.months,
                "reports": len(ALL_REPORTS),
                "requests_per_token": per_token_requests,
                "max_requests": args.max_requests,
                "window_s": windows,
                "per_token_cap": args.per_token,
                "total_cap": args.total,
                "runs": args.runs,
                "big_runs": args.big_runs,
                "quick": quick,
                "output_dir": str(args.output_dir),
                "client_cpu": client_cpu,
                "server_cpu": server_cpu,
                "target_ratio": TARGET,
                "warmed": not args.cold,
            },
            "summary": [by_case[case] for case in cases],
            "comparison": comparison,
            "runs": {f"{k}/{p}": runs for (k, p), runs in all_runs.items()},
        },
    )
    if any(
        not s["all_ok"]
        or s["client_429"]
        or s["server_429"]
        or s["max_in_window"] > args.max_requests
        for s in by_case.values()
    ):
        print(
            "FAILED: a run had failures, 429s or more than N requests in a window", file=sys.stderr
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
