"""What a backfill wrote, read back from any of its formats (json, raw, parquet,
duckdb): per token label and window of one report kind, the rows and the totals of the
kind's main value columns. `lexer-activity show` prints it; nothing is sent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import attrs

from . import exceptions as exc
from . import wire
from .kinds import REPORT_KINDS
from .models import converter
from .reports import ExportKind, ReportType, parse_datetime
from .sinks.arrow_tables import require
from .sinks.duckdb_sink import DATABASE_NAME
from .sinks.parquet_sink import FILE_NAME
from .tables import ColumnType, Row, TableSchema, schema_for, to_rows

__all__ = ["WindowOverview", "Overview", "overview", "value_columns", "detect_format"]

_MAIN_VALUES = 2
"""Value columns totalled per kind: its first integer columns outside the key."""
AGGREGATE_STATES = frozenset({"all_states", "all_closed_states"})
"""Rows the API adds up itself (user_volume, classifications): left out of totals."""


def value_columns(schema: TableSchema) -> tuple[str, ...]:
    """The kind's main value columns: its first integer columns that are not key columns
    (counts, which add up across periods and entities; averages do not)."""
    counts = [
        c.name
        for c in schema.columns
        if c.type is ColumnType.INT64 and c.name not in schema.primary_key
    ]
    return tuple(counts[:_MAIN_VALUES])


@attrs.frozen
class WindowOverview:
    label: str
    window_start: datetime
    window_end: datetime
    rows: int
    totals: tuple[int, ...]


@attrs.frozen
class Overview:
    """One kind's windows in ``output``, sorted by label and window; ``kinds`` lists
    every report kind the output holds."""

    output: Path
    format: str
    kind: ReportType
    columns: tuple[str, ...]
    windows: tuple[WindowOverview, ...]
    kinds: tuple[ReportType, ...]


def _kind_of(name: str) -> ReportType | None:
    """A report folder's kind: a report type, or else a renamed workflow-states type
    (exports and anything else: None)."""
    if name in {k.value for k in ExportKind}:
        return None
    try:
        return ReportType(name)
    except ValueError:
        return ReportType.WORKFLOW_STATES


def _parse_moment(text: str) -> datetime:
    """One bound of a window stamp (``2024-01-01T00-00-00+00-00``)."""
    day, time_part = text[:10], text[11:]
    clock = time_part[:8].replace("-", ":")
    offset = time_part[8] + time_part[9:].replace("-", ":")
    return parse_datetime(f"{day}T{clock}{offset}")


def _parse_window(text: str) -> tuple[datetime, datetime]:
    """A window stamp, or a parquet window partition (``2024-01-01_2024-02-01``)."""
    lo, _, hi = text.partition("_")
    if len(lo) == 10 and len(hi) == 10:
        return tuple(  # type: ignore[return-value]
            datetime.fromisoformat(d).replace(tzinfo=timezone.utc) for d in (lo, hi)
        )
    return _parse_moment(lo), _parse_moment(hi)


def _file_units(output: Path, folder: str) -> Iterator[tuple[str, str, Path]]:
    """(label, report folder name, file) of a json or raw output."""
    for path in sorted(output.glob(f"*/{folder}/*/*.json")):
        yield path.parts[-4], path.parts[-2], path


def detect_format(output: Path) -> str:
    """The format ``output`` holds (the first found of duckdb, parquet, json, raw);
    `OutputError` if it is not a folder or holds no reports."""
    if not output.is_dir():
        raise exc.OutputError(output, "no such folder (give a backfill's output folder)")
    if (output / DATABASE_NAME).is_file():
        return "duckdb"
    if any(output.glob(f"*/label=*/window=*/{FILE_NAME}")):
        return "parquet"
    for folder, name in (("reports", "json"), ("raw", "raw")):
        if next(_file_units(output, folder), None) is not None:
            return name
    raise exc.OutputError(output, "holds no backfill reports (json, raw, parquet or duckdb)")


def _summed(columns: tuple[str, ...], rows: list[Row]) -> tuple[int, ...]:
    """The columns' totals over ``rows``, but for rows of an aggregate state."""
    kept = [r for r in rows if r.get("state") not in AGGREGATE_STATES]
    return tuple(sum(int(r[c]) for r in kept) for c in columns)  # type: ignore[call-overload]


def _from_files(
    output: Path, format: str, kind: ReportType | None
) -> tuple[list[ReportType], ReportType, list[WindowOverview]]:
    folder = "reports" if format == "json" else "raw"
    units = [(label, name, path) for label, name, path in _file_units(output, folder)]
    kinds = list(dict.fromkeys(k for _, name, _ in units if (k := _kind_of(name)) is not None))
    chosen = _choose(kinds, kind, output)
    schema = schema_for(chosen)
    columns = value_columns(schema)
    windows = []
    for label, name, path in units:
        if _kind_of(name) is not chosen:
            continue
        lo, hi = _parse_window(path.stem)
        body = path.read_bytes()
        row = REPORT_KINDS[chosen]
        try:
            if format == "json":
                result = converter.structure(json.loads(body), row.result)
            else:
                result = wire.decode_report(chosen, 200, body, tz=lo.tzinfo or timezone.utc)
        except Exception as error:  # json, cattrs and the decoder each raise their own
            raise exc.OutputError(path, f"not a {chosen.value} report ({error})") from None
        # The rows are counted and summed only: an NPS report's form id is not needed.
        rows = to_rows(chosen, result, label=label, window_start=lo, window_end=hi, form=0)
        windows.append(WindowOverview(label, lo, hi, len(rows), _summed(columns, rows)))
    return kinds, chosen, windows


def _from_parquet(
    output: Path, kind: ReportType | None
) -> tuple[list[ReportType], ReportType, list[WindowOverview]]:
    pq = require("pyarrow.parquet", "parquet")
    kinds = [k for k in ReportType if any((output / k.value).glob(f"label=*/window=*/{FILE_NAME}"))]
    chosen = _choose(kinds, kind, output)
    columns = value_columns(schema_for(chosen))
    windows = []
    for path in sorted((output / chosen.value).glob(f"label=*/window=*/{FILE_NAME}")):
        label = unquote(path.parts[-3].removeprefix("label="))
        lo, hi = _parse_window(unquote(path.parts[-2].removeprefix("window=")))
        rows = pq.read_table(path).to_pylist()
        windows.append(WindowOverview(label, lo, hi, len(rows), _summed(columns, rows)))
    return kinds, chosen, windows


def _from_duckdb(
    output: Path, kind: ReportType | None
) -> tuple[list[ReportType], ReportType, list[WindowOverview]]:
    duckdb = require("duckdb", "duckdb")
    path = output / DATABASE_NAME
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as error:
        raise exc.OutputError(path, str(error)) from None
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM _lexer_schema").fetchall()}
        kinds = [k for k in ReportType if k.value in tables]
        chosen = _choose(kinds, kind, output)
        columns = value_columns(schema_for(chosen))
        kept = "t.state NOT IN ('all_states', 'all_closed_states')"
        if "state" not in schema_for(chosen).names:
            kept = "true"
        sums = "".join(f", coalesce(sum(t.{c}) FILTER (WHERE {kept}), 0)" for c in columns)
        rows: list[Any] = con.execute(
            # Epoch seconds, not TIMESTAMPTZ: older DuckDB releases need pytz to fetch those.
            f"SELECT w.label, epoch(w.window_start), epoch(w.window_end), w.rows{sums} "
            "FROM _lexer_windows w "
            f'LEFT JOIN "{chosen.value}" t ON t.label = w.label '
            "AND t.window_start = w.window_start AND t.window_end = w.window_end "
            "WHERE w.table_name = ? GROUP BY ALL",
            [chosen.value],
        ).fetchall()
    finally:
        con.close()
    windows = [
        WindowOverview(
            label,
            datetime.fromtimestamp(lo, timezone.utc),
            datetime.fromtimestamp(hi, timezone.utc),
            n,
            tuple(int(t) for t in totals),
        )
        for label, lo, hi, n, *totals in rows
    ]
    return kinds, chosen, windows


def _choose(kinds: list[ReportType], kind: ReportType | None, output: Path) -> ReportType:
    if not kinds:
        raise exc.OutputError(output, "holds no backfill reports (json, raw, parquet or duckdb)")
    if kind is None:
        return ReportType.SUMMARY if ReportType.SUMMARY in kinds else kinds[0]
    if kind not in kinds:
        held = ", ".join(k.value for k in kinds)
        raise exc.OutputError(output, f"holds no {kind.value} reports (it holds: {held})")
    return kind


def overview(output: Path, kind: ReportType | None = None, format: str | None = None) -> Overview:
    """What ``output`` holds of ``kind`` (default: summary, else the first kind found),
    read from ``format`` (default: `detect_format`). `OutputError` for a missing or
    empty folder or a kind it does not hold."""
    format = format or detect_format(output)
    if format == "duckdb":
        kinds, chosen, windows = _from_duckdb(output, kind)
    elif format == "parquet":
        kinds, chosen, windows = _from_parquet(output, kind)
    else:
        kinds, chosen, windows = _from_files(output, format, kind)
    windows.sort(key=lambda w: (w.label, w.window_start, w.window_end))
    return Overview(
        output, format, chosen, value_columns(schema_for(chosen)), tuple(windows), tuple(kinds)
    )
