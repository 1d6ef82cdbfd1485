"""Streaming CSV → Parquet of exports (`csv_parquet`): peak memory and speed.

1. Peak RSS of a fresh process converting a ``case_details`` CSV of each size, next to
   the same process importing the converter only (the baseline) and to the naive way
   (``pyarrow.csv.read_csv`` of the whole file, then ``write_table``). Streaming should
   stay flat as the file grows; the naive way grows with it.
2. Seconds per file: streaming (typed, checked) against the naive way, as a ratio.

The CSV is written here with rows like the sandbox's (quoted free text with commas,
quotes and newlines; ISO 8601 UTC times). Figures are medians of ``--runs`` runs,
alternating sides.
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import _common as c

from lexer_activity_async import tables
from lexer_activity_async.reports import ExportKind

CHILD = Path(__file__).resolve().parent / "_parquet_child.py"
HEADER = tables.EXPORT_SCHEMAS[ExportKind.CASE_DETAILS].names[3:]  # after label, window


def write_csv(path: Path, size: int) -> int:
    """A case_details CSV of at least ``size`` bytes; its row count."""
    rng = random.Random(7)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    pool = []
    for _ in range(2000):
        created = start + timedelta(seconds=rng.randrange(31 * 86400))
        reply = rng.uniform(10, 90000)
        note = rng.choice(["", 'called back, "urgent"', "line one\nline two", "ok, thanks"])
        pool.append(
            [
                created.isoformat(),
                (created + timedelta(seconds=reply * 2)).isoformat(),
                round(reply, 3),
                round(reply * 2, 3),
                rng.choice(["Jane Pear", "Barry Banana", "Zoë Quince"]),
                rng.randrange(1, 9),
                rng.choice(["", "amusing", "feedback; loyalty"]),
                rng.choice(["twitter", "facebook", "email"]),
                f"@customer{rng.randrange(10**6)}",
                note,
            ]
        )
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(HEADER)
        while handle.tell() < size:
            buffer = io.StringIO()
            batch = csv.writer(buffer, lineterminator="\r\n")
            for i in range(10_000):
                batch.writerow([rows + i + 1, *pool[(rows + i) % len(pool)]])
            handle.write(buffer.getvalue())
            rows += 10_000
    return rows


def child(mode: str, source: Path | None, dest: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, str(CHILD), mode]
    if source is not None and dest is not None:
        cmd += ["--source", str(source), "--dest", str(dest)]
    run = c.run_child(cmd)
    if run.returncode != 0:
        raise RuntimeError(f"child failed ({run.returncode}): {run.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    out["peak_rss_bytes"] = run.peak_rss
    return out


def main() -> None:
    parser = c.base_parser(__doc__)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="CSV sizes in MiB (default 64 512)"
    )
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    sizes = args.sizes or ([4, 16] if args.quick else [64, 512])
    results: dict[str, Any] = {"environment": c.environment(), "runs": runs, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="bench-parquet-") as folder:
        work = Path(folder)
        idle = [child("idle", None, None)["peak_rss_bytes"] for _ in range(runs)]
        results["idle_peak_rss_bytes"] = c.median(idle)
        table = []
        for mib in sizes:
            source = work / f"cases-{mib}.csv"
            rows = write_csv(source, mib * c.MiB)
            stream: list[dict[str, Any]] = []
            whole: list[dict[str, Any]] = []
            for _ in range(runs):  # alternating sides
                stream.append(child("stream", source, work / "s.parquet"))
                whole.append(child("whole", source, work / "w.parquet"))
            assert all(r["rows"] == rows for r in stream + whole)
            entry = {
                "mib": mib,
                "bytes": source.stat().st_size,
                "rows": rows,
                "stream_peak_rss_bytes": c.median(r["peak_rss_bytes"] for r in stream),
                "whole_peak_rss_bytes": c.median(r["peak_rss_bytes"] for r in whole),
                "stream_seconds": c.median(r["seconds"] for r in stream),
                "whole_seconds": c.median(r["seconds"] for r in whole),
                "stream_runs": stream,
                "whole_runs": whole,
            }
            results["sizes"].append(entry)
            source.unlink()
            base = results["idle_peak_rss_bytes"]
            table.append(
                [
                    f"{mib} MiB",
                    rows,
                    f"{entry['stream_peak_rss_bytes'] / c.MiB:.0f} MiB",
                    f"{(entry['stream_peak_rss_bytes'] - base) / c.MiB:.0f} MiB",
                    f"{entry['whole_peak_rss_bytes'] / c.MiB:.0f} MiB",
                    c.fmt(entry["stream_seconds"]),
                    c.fmt(entry["whole_seconds"]),
                    c.fmt(c.ratio(entry["stream_seconds"], entry["whole_seconds"])),
                ]
            )
    c.print_table(
        f"CSV -> Parquet (idle process: {results['idle_peak_rss_bytes'] / c.MiB:.0f} MiB)",
        [
            "CSV",
            "rows",
            "stream RSS",
            "stream - idle",
            "whole-file RSS",
            "stream s",
            "whole s",
            "stream/whole",
        ],
        table,
    )
    c.write_results("bench_csv_parquet", results)


if __name__ == "__main__":
    main()
