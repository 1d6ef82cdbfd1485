"""Each backfill sink's cost per report unit, next to JSON: stage (on the event loop)
plus write (the batch's worker-thread call: fsync and rename, or DuckDB's transaction
per window), for three report kinds of different sizes.

Results come from the in-process sandbox once (summary: one row; user_volume: ~50 rows;
states_volume: ~200 rows); then each run writes ``--units`` units per kind (distinct
windows, in batches of ``--batch``, as the writer's group commit does) into a fresh
folder under ``--dir`` (default: $TMPDIR) with every format in turn, interleaved, so
drift affects all alike. The table shows the median µs per unit over runs, the spread,
and the ratio to JSON in the same run.

    python benchmarks/bench_sinks.py [--quick] [--runs N] [--units N] [--batch N] [--dir D]
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import _common as c

from lexer_activity_async import LexerClient, LimiterRegistry
from lexer_activity_async.kinds import ReportResult
from lexer_activity_async.reports import ReportType, add_months, window_stamp
from lexer_activity_async.sandbox import Sandbox, SandboxConfig
from lexer_activity_async.sinks import FORMATS, Slot, make_sink

KINDS = (ReportType.SUMMARY, ReportType.USER_VOLUME, ReportType.STATES_VOLUME)
START = datetime(2024, 1, 1, tzinfo=timezone.utc)
TOKEN = "bench-sinks-token-0123456789"


async def fetch_results() -> dict[ReportType, tuple[ReportResult, bytes]]:
    """One January's result and body per kind, from the in-process sandbox."""
    config = SandboxConfig(max_requests=1000, window=1.0, tokens=frozenset({TOKEN}))
    async with (
        Sandbox(config) as sb,
        LexerClient(
            TOKEN, api_url=sb.api_url, status_url=sb.status_url, registry=LimiterRegistry()
        ) as client,
    ):
        found = {}
        for kind in KINDS:
            raw = await client.report_raw(kind, START, add_months(START, 1))
            found[kind] = (raw.result, raw.body)
        return found


def one_run(
    format: str, folder: Path, results: dict[ReportType, tuple[ReportResult, bytes]], args: Any
) -> dict[str, tuple[float, float]]:
    """(wall, CPU) µs per unit of ``format``, per kind: stage and write, over
    ``args.units`` units."""
    sink = make_sink(format, folder)
    sink.open(KINDS)
    per_unit: dict[str, tuple[float, float]] = {}
    try:
        for kind, (result, body) in results.items():
            started, cpu = time.perf_counter(), time.process_time()
            for first in range(0, args.units, args.batch):
                batch = []
                for i in range(first, min(first + args.batch, args.units)):
                    lo, hi = add_months(START, i), add_months(START, i + 1)
                    slot = Slot(f"t{i % 10}", kind.value, kind, lo, hi, window_stamp(lo, hi))
                    batch.append(sink.stage(slot, result, body))
                errors = sink.write(batch)
                assert not any(errors), errors
            per_unit[kind.value] = (
                (time.perf_counter() - started) / args.units * 1e6,
                (time.process_time() - cpu) / args.units * 1e6,
            )
    finally:
        sink.close()
    return per_unit


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--units", type=int, default=240, help="units per kind per run")
    parser.add_argument("--batch", type=int, default=32, help="units per write (group commit)")
    parser.add_argument("--dir", default=None, help="where to write (default: $TMPDIR)")
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 7)
    if args.quick:
        args.units = 32
    results = asyncio.run(fetch_results())
    sizes = {kind.value: len(body) for kind, (_, body) in results.items()}

    def table() -> dict[str, dict[str, list[float]]]:
        return {f: {k.value: [] for k in KINDS} for f in FORMATS}

    samples, ratios, cpus, cpu_ratios = table(), table(), table(), table()
    for _ in range(runs):
        measured = {}
        for format in FORMATS:
            with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-sinks-") as folder:
                measured[format] = one_run(format, Path(folder), results, args)
        for format in FORMATS:
            for kind, (us, cpu) in measured[format].items():
                samples[format][kind].append(us)
                ratios[format][kind].append(c.ratio(us, measured["json"][kind][0]))
                cpus[format][kind].append(cpu)
                cpu_ratios[format][kind].append(c.ratio(cpu, measured["json"][kind][1]))
    rows = []
    for format in FORMATS:
        for kind in (k.value for k in KINDS):
            lo, hi = c.spread(samples[format][kind])
            rows.append(
                [
                    f"{format} / {kind}",
                    c.median(samples[format][kind]),
                    f"{c.fmt(lo)}-{c.fmt(hi)}",
                    c.median(ratios[format][kind]),
                    c.median(cpus[format][kind]),
                    c.median(cpu_ratios[format][kind]),
                ]
            )
    c.print_table(
        f"µs per unit (median of {runs} runs, {args.units} units per kind, batches of "
        f"{args.batch}; response sizes {sizes})",
        ["sink / kind", "wall µs/unit", "spread", "x json", "CPU µs/unit", "x json"],
        rows,
    )
    c.write_results(
        "bench_sinks",
        {
            "config": {
                "runs": runs,
                "units": args.units,
                "batch": args.batch,
                "dir": args.dir or tempfile.gettempdir(),
                "response_bytes": sizes,
            },
            "us_per_unit": {f: {k: c.median(v) for k, v in d.items()} for f, d in samples.items()},
            "ratio_to_json": {f: {k: c.median(v) for k, v in d.items()} for f, d in ratios.items()},
            "cpu_us_per_unit": {f: {k: c.median(v) for k, v in d.items()} for f, d in cpus.items()},
            "cpu_ratio_to_json": {
                f: {k: c.median(v) for k, v in d.items()} for f, d in cpu_ratios.items()
            },
            "samples": samples,
        },
    )


if __name__ == "__main__":
    main()
