"""Report throughput of `LexerClient` against a bare aiohttp loop, and the cost of
structuring each response.

1. Throughput. A sandbox with its rate limit lifted runs in a separate process (pinned to
   CPU 1; this process to CPU 0), so its CPU does not compete inside the measured loop.
   The same POST /activity/reports requests are sent, in batches of ``--concurrency``
   gathered with asyncio.gather, by
     - ``client``: `LexerClient` (limit lifted: huge max_requests, fresh LimiterRegistry),
       each call going through limiter, retry loop, deadline and typed decoding;
     - ``bare``: one aiohttp session posting the same JSON bodies with the same headers
       and ``json.loads`` on each body.
   One workload per report type (each alone, so each gets its own CPU ratio), then
   ``mixed`` (all 12 in turn). Runs alternate bare/client; each run reports requests/s,
   this process's CPU time per request (the client's own overhead, meaningful even when
   the server is the bottleneck), and the server's CPU use (near 100 % means the server
   is the bottleneck). The whole throughput section runs on asyncio's default loop, then
   again on uvloop when it is installed (both sides on the same loop each time).
2. Decoding. Each report type's sandbox body is captured once; `wire.decode_report` on it
   is timed against plain `json.loads` of the same bytes (microseconds per response).

    python benchmarks/bench_reports.py [--quick] [--runs N] [--requests N] [--concurrency C]
        [--no-uvloop] [--types summary,states_volume,...]
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import _common as c
import aiohttp

from lexer_activity_async import LexerClient, LimiterRegistry, ReportType, wire
from lexer_activity_async.reports import build_report_body
from lexer_activity_async.sandbox import Sandbox

TOKEN = "bench-reports-token-0123456789"
NPS_FORM = min(Sandbox.nps_form_ids())
UNLIMITED = 10**9

# A 30-day range ending yesterday: daily series (30 points per series), typical sizes.
DATE_TO = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
DATE_FROM = DATE_TO - timedelta(days=30)

Spec = tuple[ReportType, dict[str, Any]]
ALL_TYPES: list[Spec] = [
    (kind, {"form": NPS_FORM} if kind.needs_form else {}) for kind in ReportType
]
WORKLOADS: dict[str, list[Spec]] = {spec[0].value: [spec] for spec in ALL_TYPES} | {
    "mixed": ALL_TYPES
}


def body_for(spec: Spec) -> dict[str, object]:
    kind, kw = spec
    return build_report_body(
        kind.value, DATE_FROM, DATE_TO, needs_form=kind.needs_form, form=kw.get("form")
    )


async def in_batches(total: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> None:
    for start in range(0, total, concurrency):
        await asyncio.gather(*(one(i) for i in range(start, min(total, start + concurrency))))


async def run_client(
    sb: c.SandboxProcess, specs: list[Spec], total: int, concurrency: int
) -> dict[str, float]:
    async with LexerClient(
        TOKEN,
        api_url=sb.api_url,
        status_url=sb.status_url,
        max_requests=UNLIMITED,
        window=1.0,
        registry=LimiterRegistry(),
    ) as client:

        async def one(i: int) -> None:
            kind, kw = specs[i % len(specs)]
            if kind is ReportType.SUMMARY:
                await client.summary(DATE_FROM, DATE_TO)
            else:
                await client.report(kind, DATE_FROM, DATE_TO, **kw)

        await in_batches(concurrency, concurrency, one)  # warm-up: open connections
        return await measure(sb, lambda: in_batches(total, concurrency, one), total)


async def run_bare(
    sb: c.SandboxProcess, specs: list[Spec], total: int, concurrency: int
) -> dict[str, float]:
    url = sb.api_url + "/activity/reports"
    bodies = [body_for(spec) for spec in specs]
    headers = {
        wire.TOKEN_HEADER: TOKEN,
        "Accept": "application/json",
        "Content-Type": "application/json",
    }
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:

        async def one(i: int) -> None:
            async with session.post(url, json=bodies[i % len(bodies)], headers=headers) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {raw[:200]!r}")
                json.loads(raw)

        await in_batches(concurrency, concurrency, one)
        return await measure(sb, lambda: in_batches(total, concurrency, one), total)


async def measure(
    sb: c.SandboxProcess, work: Callable[[], Awaitable[None]], total: int
) -> dict[str, float]:
    server_before = c.proc_cpu_seconds(sb.pid) or 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    await work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    server = (c.proc_cpu_seconds(sb.pid) or 0.0) - server_before
    return {
        "wall_s": wall,
        "rps": total / wall,
        "client_cpu_us_per_req": cpu / total * 1e6,
        "client_cpu_util": cpu / wall,
        "server_cpu_util": server / wall,
    }


async def throughput(
    sb: c.SandboxProcess, runs: int, total: int, concurrency: int, names: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        specs = WORKLOADS[name]
        samples: dict[str, list[dict[str, float]]] = {"bare": [], "client": []}
        for run in range(runs):
            # Alternate which goes first so slow drift does not favour one side.
            order = ("bare", "client") if run % 2 == 0 else ("client", "bare")
            for side in order:
                fn = run_bare if side == "bare" else run_client
                samples[side].append(await fn(sb, specs, total, concurrency))
        summary: dict[str, Any] = {}
        for side, rows in samples.items():
            summary[side] = {key: c.median(row[key] for row in rows) for key in rows[0]} | {
                "rps_runs": [row["rps"] for row in rows]
            }
        summary["throughput_ratio"] = c.ratio(summary["client"]["rps"], summary["bare"]["rps"])
        summary["cpu_per_request_ratio"] = c.ratio(
            summary["client"]["client_cpu_us_per_req"], summary["bare"]["client_cpu_us_per_req"]
        )
        out[name] = summary
    return out


async def capture_bodies(sb: c.SandboxProcess) -> dict[ReportType, bytes]:
    url = sb.api_url + "/activity/reports"
    headers = {wire.TOKEN_HEADER: TOKEN, "Accept": "application/json"}
    bodies: dict[ReportType, bytes] = {}
    async with aiohttp.ClientSession() as session:
        for spec in ALL_TYPES:
            async with session.post(url, json=body_for(spec), headers=headers) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{spec[0].value}: HTTP {r.status}: {raw[:200]!r}")
                bodies[spec[0]] = raw
    return bodies


def per_call_us(fn: Callable[[], object], runs: int, target_s: float) -> float:
    """Median over ``runs`` of the mean microseconds per call, each run ~``target_s``."""
    n, took = 1, 0.0
    while took < target_s / 10:  # calibrate the loop count
        n *= 2
        start = time.perf_counter()
        for _ in range(n):
            fn()
        took = time.perf_counter() - start
    n = max(1, int(n * target_s / took))
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return c.median(samples)


def decode_costs(bodies: dict[ReportType, bytes], runs: int, target_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    decode_report, utc = wire.decode_report, timezone.utc
    for kind, raw in bodies.items():

        def structured(kind: ReportType = kind, raw: bytes = raw) -> object:
            return decode_report(kind, 200, raw, tz=utc)

        def plain(raw: bytes = raw) -> object:
            return json.loads(raw)

        structured()  # fails loudly if the sandbox payload does not decode
        decode_us = per_call_us(structured, runs, target_s)
        loads_us = per_call_us(plain, runs, target_s)
        out[kind.value] = {
            "bytes": len(raw),
            "decode_report_us": decode_us,
            "json_loads_us": loads_us,
            "ratio": c.ratio(decode_us, loads_us),
            "structuring_us": decode_us - loads_us,
        }
    return out


async def main_async(args: Any, sb: c.SandboxProcess) -> dict[str, Any]:
    tp = await throughput(sb, args.runs, args.requests, args.concurrency, args.types)
    bodies = await capture_bodies(sb)
    dec = decode_costs(bodies, args.runs, args.decode_seconds)
    return {"throughput": tp, "decode": dec}


async def loop_only(args: Any, sb: c.SandboxProcess) -> dict[str, Any]:
    """The throughput section alone (run again on uvloop)."""
    return await throughput(sb, args.runs, args.requests, args.concurrency, args.types)


def run(args: Any) -> dict[str, Any]:
    client_cpu, server_cpu = c.cpu_plan(args.no_pin)
    c.pin_self(client_cpu)
    with c.SandboxProcess(max_requests=UNLIMITED, window=1.0, cpu=server_cpu, tokens=[TOKEN]) as sb:
        found = asyncio.run(main_async(args, sb))
        tp, dec = found["throughput"], found["decode"]
        uv: dict[str, Any] | None = None
        uvloop = None if args.no_uvloop else _uvloop()
        if uvloop is not None:
            uv = uvloop.run(loop_only(args, sb))
        stats = sb.stats()
    return {
        "config": {
            "runs": args.runs,
            "requests_per_run": args.requests,
            "concurrency": args.concurrency,
            "date_range_days": 30,
            "client_cpu": client_cpu,
            "server_cpu": server_cpu,
            "quick": args.quick,
        },
        "throughput": tp,
        "throughput_uvloop": uv,
        "decode": dec,
        "sandbox_rate_limited": stats["rate_limited"],
    }


def _uvloop() -> Any:
    try:
        import uvloop
    except ImportError:
        print("uvloop is not installed: the uvloop section is skipped")
        return None
    return uvloop


def report(results: dict[str, Any]) -> None:
    cfg = results["config"]
    loops = [("asyncio", results["throughput"])]
    if results.get("throughput_uvloop"):
        loops.append(("uvloop", results["throughput_uvloop"]))
    for loop_name, found in loops:
        rows = []
        for name, s in found.items():
            for side in ("bare", "client"):
                r = s[side]
                lo, hi = c.spread(r["rps_runs"])
                rows.append(
                    [
                        f"{name} / {side}",
                        r["rps"],
                        f"{c.fmt(lo)}-{c.fmt(hi)}",
                        r["client_cpu_us_per_req"],
                        f"{r['client_cpu_util']:.0%}",
                        f"{r['server_cpu_util']:.0%}",
                    ]
                )
        c.print_table(
            f"Report throughput on {loop_name}: {cfg['requests_per_run']} requests/run, "
            f"batches of {cfg['concurrency']}, median of {cfg['runs']} runs",
            ["workload / side", "req/s", "range", "CPU us/req", "client CPU", "server CPU"],
            rows,
        )
    headers = ["workload", "CPU us/req bare", "client", "client/bare (target <= 1.2)"]
    if len(loops) > 1:
        headers += ["uvloop bare", "uvloop client", "client/bare", "client uvloop/asyncio"]
    rows = []
    for name, s in results["throughput"].items():
        row = [
            name,
            s["bare"]["client_cpu_us_per_req"],
            s["client"]["client_cpu_us_per_req"],
            s["cpu_per_request_ratio"],
        ]
        if len(loops) > 1:
            u = loops[1][1][name]
            row += [
                u["bare"]["client_cpu_us_per_req"],
                u["client"]["client_cpu_us_per_req"],
                u["cpu_per_request_ratio"],
                c.ratio(u["client"]["client_cpu_us_per_req"], s["client"]["client_cpu_us_per_req"]),
            ]
        rows.append(row)
    c.print_table("CPU per request, client vs bare aiohttp + json.loads (medians)", headers, rows)
    dec = results["decode"]
    rows = [
        [
            name,
            d["bytes"],
            d["json_loads_us"],
            d["decode_report_us"],
            d["structuring_us"],
            d["ratio"],
        ]
        for name, d in dec.items()
    ]
    mean_loads = sum(d["json_loads_us"] for d in dec.values()) / len(dec)
    mean_decode = sum(d["decode_report_us"] for d in dec.values()) / len(dec)
    rows.append(
        [
            "(mean of types)",
            "",
            mean_loads,
            mean_decode,
            mean_decode - mean_loads,
            c.ratio(mean_decode, mean_loads),
        ]
    )
    c.print_table(
        f"Structuring cost per response (median of {cfg['runs']} runs)",
        ["report type", "bytes", "json.loads us", "decode_report us", "extra us", "ratio"],
        rows,
    )
    print(f"\nsandbox 429s: {results['sandbox_rate_limited']} (limit lifted; must be 0)")


def main() -> None:
    parser = c.base_parser(__doc__)
    parser.add_argument("--requests", type=int, default=None, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=50, help="batch size for gather")
    parser.add_argument("--no-uvloop", action="store_true", help="skip the uvloop section")
    parser.add_argument(
        "--types", default=",".join(WORKLOADS), help="workloads, comma-separated (default all)"
    )
    args = parser.parse_args()
    args.types = [name.strip() for name in args.types.split(",") if name.strip()]
    unknown = sorted(set(args.types) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    if args.requests is None:
        args.requests = 200 if args.quick else 1000
    args.decode_seconds = 0.02 if args.quick else 0.2
    results = run(args)
    report(results)
    c.write_results("bench_reports", results)


if __name__ == "__main__":
    main()
