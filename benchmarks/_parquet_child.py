"""One CSV → Parquet conversion in a fresh process, for `bench_csv_parquet.py`'s peak-RSS
measurement. Not a benchmark itself.

Modes: ``idle`` imports pyarrow and the converter only (the baseline RSS); ``stream`` runs
`csv_parquet.csv_to_parquet` (typed, a block at a time); ``whole`` is the naive way, the
whole file read by ``pyarrow.csv.read_csv`` (types inferred) and written by
``pyarrow.parquet.write_table``. Prints one JSON line: rows and seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lexer_activity_async.csv_parquet import csv_to_parquet
from lexer_activity_async.tables import export_schema_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["idle", "stream", "whole"])
    parser.add_argument("--source", default="")
    parser.add_argument("--dest", default="")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = 0
    if args.mode == "stream":
        done = csv_to_parquet(
            args.source,
            args.dest,
            export_schema_for("case_details"),
            label="bench",
            window_start=datetime(2026, 1, 1, tzinfo=timezone.utc),
            window_end=datetime(2026, 2, 1, tzinfo=timezone.utc),
        )
        rows = done.rows
    elif args.mode == "whole":
        table = pacsv.read_csv(
            args.source, parse_options=pacsv.ParseOptions(newlines_in_values=True)
        )
        pq.write_table(table, args.dest, compression="zstd")
        rows = table.num_rows
    seconds = time.perf_counter() - start
    if args.dest:
        Path(args.dest).unlink(missing_ok=True)
    print(json.dumps({"rows": rows, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
