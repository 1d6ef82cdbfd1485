"""Export download throughput, peak memory, and status polls per job.

The sandbox serves the export file from a separate process (pinned to CPU 1; this process
and its children to CPU 0).

1. Throughput on one sandbox file of ``--size`` bytes (default 1 GiB; --quick 64 MiB),
   each method writing to a fresh file in ``--dest-dir`` (a real disk by default), runs
   alternating, medians of ``--runs``:
     - ``client``: ``client.download_export(job, dest)`` (stream to ``dest.part``, fsync,
       rename);
     - ``bare``: one aiohttp GET, ``iter_chunked(1 MiB)``, ``file.write`` (no fsync);
     - ``bare+fsync``: the same plus flush+fsync before close, to show what the client's
       durability costs;
     - ``curl``: ``curl -s -o dest`` (when curl is installed).
   Reported in MB/s (10^6 bytes/s) and the ratio client/bare (target >= 0.9).
2. Peak RSS of a fresh process (``_export_child.py``) running one ``client.export`` of
   100 MiB and one of 1 GiB (--quick: 16 and 64 MiB), read with ``os.wait4`` for that
   child alone, with one connection and with 4 parallel ranges; the sandbox is in another
   process so its memory does not count. Also an
   ``idle`` child (import, open a client, one request) as the baseline. Target: the same
   for both sizes and under 100 MB.
3. Parallel ranged downloads: ``client.download_export`` with ``DownloadPolicy(connections=1)``
   against ``connections=4``, runs alternating, medians of ``--runs``, on the uncapped
   sandbox above (target: no loss, ratio >= 0.95) and on a sandbox whose file host caps
   each connection at ``--cap`` bytes/s (default 8 MB/s, ``--capped-size`` 48 MiB; --quick
   16 MiB), as object stores and long links do (target: >= 3x with 4 connections).
4. Status polls per export with the default `PollPolicy`, for sandbox
   ``export_pending_seconds`` in (1, 5, 20) (--quick: 1, 3): several jobs per setting,
   polls counted by the client and by the sandbox, and the detection delay (time from
   the job becoming ready to the client seeing it complete).

    python benchmarks/bench_exports.py [--quick] [--runs N] [--size BYTES] [--dest-dir DIR]
        [--cap BYTES_PER_S] [--capped-size BYTES]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import _common as c
import aiohttp

from lexer_activity_async import LexerClient, LimiterRegistry, exports
from lexer_activity_async import models as m
from lexer_activity_async.exports import DownloadPolicy

KIND = "case_details"
DATE_TO = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
    days=1
)
DATE_FROM = DATE_TO - timedelta(days=30)
UNLIMITED = 10**9
CHILD = c.HERE / "_export_child.py"


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def human(size: int) -> str:
    for unit, factor in (("GiB", c.GiB), ("MiB", c.MiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def make_client(sb: c.SandboxProcess, token: str, registry: LimiterRegistry) -> LexerClient:
    return LexerClient(
        token,
        api_url=sb.api_url,
        status_url=sb.status_url,
        max_requests=UNLIMITED,
        window=1.0,
        registry=registry,
    )


# -- 1. throughput -------------------------------------------------------------------


async def bare_download(url: str, dest: Path, fsync: bool) -> int:
    written = 0
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        with open(dest, "wb") as handle:  # noqa: ASYNC230 - the baseline the client does too
            async for chunk in response.content.iter_chunked(1 << 20):
                handle.write(chunk)
                written += len(chunk)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
    return written


def curl_download(url: str, dest: Path) -> int:
    subprocess.run(["curl", "-s", "-f", "-o", str(dest), url], check=True)
    return dest.stat().st_size


async def throughput(
    sb: c.SandboxProcess, token: str, size: int, runs: int, dest_dir: Path
) -> dict[str, Any]:
    registry = LimiterRegistry()
    async with make_client(sb, token, registry) as client:
        dest = dest_dir / "export.csv"
        t = time.perf_counter()
        first = await client.export(KIND, DATE_FROM, DATE_TO, dest)
        end_to_end = time.perf_counter() - t
        if first.bytes != size:
            raise RuntimeError(f"export wrote {first.bytes} bytes, expected {size}")
        job = first.jobs[0]
        assert job.url is not None
        url = job.url
        dest.unlink()

        async def run_client(target: Path) -> int:
            return await client.download_export(job, target)

        methods: dict[str, Any] = {
            "client": run_client,
            "bare": lambda target: bare_download(url, target, fsync=False),
            "bare+fsync": lambda target: bare_download(url, target, fsync=True),
        }
        if shutil.which("curl"):
            methods["curl"] = lambda target: asyncio.to_thread(curl_download, url, target)
        names = list(methods)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for run in range(runs):
            order = names if run % 2 == 0 else names[::-1]
            for name in order:
                target = dest_dir / f"{name.replace('+', '_')}.csv"
                # Start each run with no dirty pages left by the previous one (untimed).
                await asyncio.to_thread(os.sync)
                start = time.perf_counter()
                got = await methods[name](target)
                took = time.perf_counter() - start
                if got != size or target.stat().st_size != size:
                    raise RuntimeError(f"{name} wrote {got} bytes, expected {size}")
                target.unlink()
                samples[name].append(size / took / c.MB)
    medians = {name: c.median(v) for name, v in samples.items()}
    return {
        "size_bytes": size,
        "mb_per_s": medians,
        "mb_per_s_runs": samples,
        "ratio_client_bare": c.ratio(medians["client"], medians["bare"]),
        "ratio_client_bare_fsync": c.ratio(medians["client"], medians["bare+fsync"]),
        "ratio_client_curl": c.ratio(medians["client"], medians.get("curl", float("nan"))),
        "first_export_end_to_end_s": end_to_end,
    }


# -- 3. ranged downloads -------------------------------------------------------------


async def ranged(sb: c.SandboxProcess, token: str, runs: int, dest_dir: Path) -> dict[str, Any]:
    """MB/s of one stream and of 4 ranges on the same file, runs alternating."""
    async with make_client(sb, token, LimiterRegistry()) as client:
        job = await client.wait_for_export(await client.start_export(KIND, DATE_FROM, DATE_TO))
        samples: dict[int, list[float]] = {1: [], 4: []}
        size = 0
        for run in range(runs):
            for connections in (1, 4) if run % 2 == 0 else (4, 1):
                target = dest_dir / f"ranged-{connections}.csv"
                await asyncio.to_thread(os.sync)
                start = time.perf_counter()
                size = await client.download_export(
                    job, target, policy=DownloadPolicy(connections=connections)
                )
                took = time.perf_counter() - start
                target.unlink()
                samples[connections].append(size / took / c.MB)
    one, four = c.median(samples[1]), c.median(samples[4])
    return {
        "size_bytes": size,
        "mb_per_s": {"1": one, "4": four},
        "mb_per_s_runs": {str(k): v for k, v in samples.items()},
        "ratio_4_over_1": c.ratio(four, one),
    }


# -- 2. peak RSS ---------------------------------------------------------------------


def child_rss(
    sb: c.SandboxProcess, token: str, dest: Path | None, connections: int = 1
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(CHILD),
        "--api",
        sb.api_url,
        "--status",
        sb.status_url,
        "--token",
        token,
        "--date-from",
        DATE_FROM.isoformat(),
        "--date-to",
        DATE_TO.isoformat(),
    ]
    cmd += ["--dest", str(dest)] if dest is not None else ["--idle"]
    cmd += ["--connections", str(connections)]
    run = c.run_child(cmd)
    if run.returncode != 0:
        raise RuntimeError(f"export child failed ({run.returncode}): {run.stderr[-2000:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if dest is not None:
        dest.unlink(missing_ok=True)
    return {
        "peak_rss_bytes": run.peak_rss,
        "self_reported_peak_rss_bytes": out["self_peak_rss"],
        "bytes": out["bytes"],
        "seconds": out["seconds"],
    }


def peak_rss(
    sandboxes: dict[int, c.SandboxProcess], token: str, runs: int, dest_dir: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    any_sb = next(iter(sandboxes.values()))
    idle = [child_rss(any_sb, token, None) for _ in range(runs)]
    out["idle"] = {"peak_rss_bytes": c.median(r["peak_rss_bytes"] for r in idle), "runs": idle}
    for (size, sb), connections in [(item, n) for item in sandboxes.items() for n in (1, 4)]:
        rows = [child_rss(sb, token, dest_dir / "rss.csv", connections) for _ in range(runs)]
        for row in rows:
            if row["bytes"] != size:
                raise RuntimeError(f"child exported {row['bytes']} bytes, expected {size}")
        name = human(size) if connections == 1 else f"{human(size)}, {connections} ranges"
        out[name] = {
            "size_bytes": size,
            "peak_rss_bytes": c.median(r["peak_rss_bytes"] for r in rows),
            "seconds": c.median(r["seconds"] for r in rows),
            "sandbox_peak_rss_bytes": sb.peak_rss(),
            "runs": rows,
        }
    return out


# -- 3. polls per job ----------------------------------------------------------------


async def poll_jobs(sb: c.SandboxProcess, pending: float, jobs: int) -> dict[str, Any]:
    registry = LimiterRegistry()
    tokens = [f"bench-poll-{secrets.token_hex(6)}" for _ in range(jobs)]

    async def one(token: str) -> dict[str, Any]:
        async with make_client(sb, token, registry) as client:
            polls = 0

            def count(_: m.ExportJob) -> None:
                nonlocal polls
                polls += 1

            job = await client.start_export(KIND, DATE_FROM, DATE_TO)
            started = time.perf_counter()
            done = await exports.wait_for_export(client, job, on_poll=count)
            seen = time.perf_counter() - started
            return {"report_token": done.token, "polls": polls, "seconds": seen}

    rows = await asyncio.gather(*(one(t) for t in tokens))
    server_polls = (await asyncio.to_thread(sb.stats))["status_polls"]
    for row in rows:
        row["server_polls"] = server_polls.get(row.pop("report_token"), 0)
        row["detection_delay_s"] = row["seconds"] - pending
    return {
        "pending_s": pending,
        "jobs": jobs,
        "polls_median": c.median(r["polls"] for r in rows),
        "polls_min": min(r["polls"] for r in rows),
        "polls_max": max(r["polls"] for r in rows),
        "server_polls_total": sum(r["server_polls"] for r in rows),
        "detection_delay_s_median": c.median(r["detection_delay_s"] for r in rows),
        "detection_delay_s_max": max(r["detection_delay_s"] for r in rows),
        "per_job": rows,
    }


async def polls(pendings: list[float], jobs: int, server_cpu: int | None) -> list[dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        sandboxes = [
            stack.enter_context(
                c.SandboxProcess(
                    max_requests=UNLIMITED,
                    export_pending_seconds=p,
                    export_rows=1000,
                    cpu=server_cpu,
                )
            )
            for p in pendings
        ]
        # The settings run side by side (each job just waits), so this takes ~max(pending).
        pairs = zip(sandboxes, pendings, strict=True)
        return list(await asyncio.gather(*(poll_jobs(sb, p, jobs) for sb, p in pairs)))


# -- main ----------------------------------------------------------------------------


async def main_async(args: Any) -> dict[str, Any]:
    client_cpu, server_cpu = c.cpu_plan(args.no_pin)
    c.pin_self(client_cpu)
    token = f"bench-exports-{secrets.token_hex(6)}"
    dest_dir = Path(tempfile.mkdtemp(prefix="bench-exports-", dir=args.dest_dir))
    results: dict[str, Any] = {
        "config": {
            "size_bytes": args.size,
            "runs": args.runs,
            "rss_sizes": args.rss_sizes,
            "rss_runs": args.rss_runs,
            "poll_pending_s": args.pendings,
            "poll_jobs": args.poll_jobs,
            "cap_bytes_per_s": args.cap,
            "capped_size_bytes": args.capped_size,
            "dest_dir": str(dest_dir),
            "client_cpu": client_cpu,
            "server_cpu": server_cpu,
            "quick": args.quick,
        }
    }
    try:
        with contextlib.ExitStack() as stack:
            main_sb = stack.enter_context(
                c.SandboxProcess(
                    max_requests=UNLIMITED,
                    export_size_bytes=args.size,
                    export_pending_seconds=0.0,
                    cpu=server_cpu,
                )
            )
            print(f"throughput: {human(args.size)} x {args.runs} runs per method...", flush=True)
            results["throughput"] = await throughput(main_sb, token, args.size, args.runs, dest_dir)
            print("ranged downloads, uncapped and capped...", flush=True)
            capped_sb = stack.enter_context(
                c.SandboxProcess(
                    max_requests=UNLIMITED,
                    export_size_bytes=args.capped_size,
                    export_pending_seconds=0.0,
                    file_bandwidth=args.cap,
                    cpu=server_cpu,
                )
            )
            results["ranged"] = {
                "uncapped": await ranged(main_sb, token, args.runs, dest_dir),
                "capped": await ranged(capped_sb, token, args.runs, dest_dir),
            }
            sandboxes: dict[int, c.SandboxProcess] = {}
            for size in args.rss_sizes:
                sandboxes[size] = (
                    main_sb
                    if size == args.size
                    else stack.enter_context(
                        c.SandboxProcess(
                            max_requests=UNLIMITED,
                            export_size_bytes=size,
                            export_pending_seconds=0.0,
                            cpu=server_cpu,
                        )
                    )
                )
            # The poll jobs mostly wait, and peak RSS does not depend on timing, so the two
            # run side by side (in a thread: the RSS children are reaped with blocking waits).
            print(
                f"peak RSS of export children, and status polls for pending {args.pendings} s...",
                flush=True,
            )
            rss, poll_rows = await asyncio.gather(
                asyncio.to_thread(peak_rss, sandboxes, token, args.rss_runs, dest_dir),
                polls(args.pendings, args.poll_jobs, server_cpu),
            )
            results["peak_rss"], results["polls"] = rss, poll_rows
    finally:
        shutil.rmtree(dest_dir, ignore_errors=True)
    return results


def report(results: dict[str, Any]) -> None:
    cfg = results["config"]
    tp = results["throughput"]
    rows = []
    for name, value in tp["mb_per_s"].items():
        lo, hi = c.spread(tp["mb_per_s_runs"][name])
        client_over = c.ratio(tp["mb_per_s"]["client"], value)
        rows.append([name, value, f"{c.fmt(lo)}-{c.fmt(hi)}", client_over])
    c.print_table(
        f"Download throughput, {human(tp['size_bytes'])} file, MB/s (10^6 B/s), "
        f"median of {cfg['runs']} runs",
        ["method", "MB/s", "range", "client / this"],
        rows,
    )
    print(
        f"ratio client/bare = {tp['ratio_client_bare']:.3f} (target >= 0.9); first export "
        f"end to end (start, poll, generate, download): {tp['first_export_end_to_end_s']:.2f}s"
    )
    rows = []
    for name, found in results["ranged"].items():
        label = name if name == "uncapped" else f"capped at {cfg['cap_bytes_per_s'] / c.MB:g} MB/s"
        rows.append(
            [
                f"{label}, {human(found['size_bytes'])}",
                found["mb_per_s"]["1"],
                found["mb_per_s"]["4"],
                found["ratio_4_over_1"],
            ]
        )
    c.print_table(
        f"Ranged downloads, MB/s, median of {cfg['runs']} runs",
        ["file host", "1 connection", "4 connections", "4 / 1"],
        rows,
    )
    print("targets: capped >= 3x, uncapped no loss (>= 0.95)")
    rss = results["peak_rss"]
    rows = [["idle (import, open, 1 request)", "", rss["idle"]["peak_rss_bytes"] / c.MB, "", ""]]
    for name, row in rss.items():
        if name == "idle":
            continue
        sandbox_rss = row["sandbox_peak_rss_bytes"]
        rows.append(
            [
                f"export {name}",
                row["seconds"],
                row["peak_rss_bytes"] / c.MB,
                (row["peak_rss_bytes"] - rss["idle"]["peak_rss_bytes"]) / c.MB,
                sandbox_rss / c.MB if sandbox_rss else float("nan"),
            ]
        )
    c.print_table(
        f"Peak RSS of a fresh process (MB = 10^6 B), median of {cfg['rss_runs']} runs",
        ["child", "seconds", "peak RSS MB", "over idle MB", "sandbox peak MB"],
        rows,
    )
    print("target: same for both sizes, under 100 MB")
    c.print_table(
        f"Status polls per export job, default PollPolicy ({cfg['poll_jobs']} jobs per row)",
        [
            "pending s",
            "polls median",
            "min",
            "max",
            "server polls",
            "detect delay s (med)",
            "(max)",
        ],
        [
            [
                p["pending_s"],
                p["polls_median"],
                p["polls_min"],
                p["polls_max"],
                p["server_polls_total"],
                p["detection_delay_s_median"],
                p["detection_delay_s_max"],
            ]
            for p in results["polls"]
        ],
    )


def main() -> None:
    parser = c.base_parser(__doc__)
    parser.add_argument("--size", type=parse_size, default=None, help="file size (e.g. 1GiB)")
    parser.add_argument("--dest-dir", default=None, help="where downloads are written")
    parser.add_argument("--cap", type=float, default=8e6, help="capped host: bytes/s a connection")
    parser.add_argument("--capped-size", type=parse_size, default=None, help="capped file size")
    args = parser.parse_args()
    quick = args.quick
    if args.size is None:
        args.size = 64 * c.MiB if quick else c.GiB
    args.runs = args.runs if args.runs is not None else (2 if quick else 5)
    if args.capped_size is None:
        args.capped_size = 16 * c.MiB if quick else 48 * c.MiB
    args.rss_sizes = [16 * c.MiB, 64 * c.MiB] if quick else [100 * c.MiB, c.GiB]
    args.rss_runs = 1 if quick else 2
    args.pendings = [1.0, 3.0] if quick else [1.0, 5.0, 20.0]
    args.poll_jobs = 2 if quick else 5
    results = asyncio.run(main_async(args))
    report(results)
    c.write_results("bench_exports", results)


if __name__ == "__main__":
    main()
