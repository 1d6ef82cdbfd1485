"""Typed CSV → Parquet for exports, streaming: the CSV is read in blocks by pyarrow, each
column parsed to its `tables` type (aware UTC timestamps, integers, floats, booleans;
empty fields null), and written a batch at a time, so memory does not grow with the file.

A value that does not fit its column raises `ExportSchemaError` naming the row and the
column. The Parquet file is written to a part file, fsynced and renamed into place
(`durable`), so a failed or interrupted conversion leaves nothing at the destination.
Needs the ``[tables]`` extra (pyarrow).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import attrs

from . import durable
from .destinations import output_error
from .exceptions import ExportSchemaError, OutputError, ValidationError
from .tables import Column, ColumnType, TableSchema

try:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
except ImportError as error:  # without the extra: say which one to install
    raise ImportError(
        "Parquet output needs pyarrow: pip install 'lexer-activity-async[tables]'"
    ) from error

__all__ = [
    "BLOCK_SIZE",
    "ROW_GROUP_ROWS",
    "Converted",
    "arrow_schema",
    "read_batches",
    "csv_to_parquet",
    "convert_export",
]

BLOCK_SIZE = 1 << 20
"""Bytes of CSV parsed at a time. pyarrow's reader holds a few dozen times this at its
peak (36 MiB at 1 MiB blocks, 145 MiB at 4 MiB), whatever the file's size."""
ROW_GROUP_ROWS = 1 << 16
"""Rows gathered into one Parquet row group (about 9 MiB of CSV for case_details)."""

_ARROW_TYPES: dict[ColumnType, Any] = {
    ColumnType.STRING: pa.string(),
    ColumnType.INT64: pa.int64(),
    ColumnType.FLOAT64: pa.float64(),
    ColumnType.BOOL: pa.bool_(),
    ColumnType.TIMESTAMP: pa.timestamp("us", tz="UTC"),
}
_WHAT = {
    ColumnType.INT64: "an integer",
    ColumnType.FLOAT64: "a number",
    ColumnType.BOOL: "a boolean (true/false/1/0)",
    ColumnType.TIMESTAMP: "an ISO 8601 timestamp with a UTC offset",
}
_ROW = re.compile(r"Row #(\d+)")


@attrs.frozen
class Converted:
    """What a conversion wrote: rows and the Parquet file's size in bytes."""

    rows: int
    bytes: int


def arrow_schema(schema: TableSchema) -> Any:
    """The pyarrow schema of a `tables` schema, its kind and version in the metadata."""
    fields = [
        pa.field(
            c.name,
            _ARROW_TYPES[c.type],
            nullable=c.nullable,
            metadata={"description": c.description},
        )
        for c in schema.columns
    ]
    meta = {"lexer_activity.table": schema.table, "lexer_activity.version": str(schema.version)}
    return pa.schema(fields, metadata=meta)


def _utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise ValidationError(f"{name} must be timezone-aware")
    return moment.astimezone(timezone.utc)


def _fail(
    schema: TableSchema, text: str, row: int | None = None, column: str | None = None
) -> ExportSchemaError:
    where = "".join(
        (f", row {row}" if row is not None else "", f", column {column!r}" if column else "")
    )
    message = f"{schema.table} CSV{where}: {text} (table schema version {schema.version})"
    return ExportSchemaError(message, kind=schema.table, row=row, column=column)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _typed(schema: TableSchema, column: Column, values: Any, first_row: int) -> Any:
    """``values`` (strings, empty as null) as ``column``'s type; ``first_row`` numbers
    the batch's first row in the file."""
    target = _ARROW_TYPES[column.type]
    typed = values
    if column.type is not ColumnType.STRING:
        source = pc.utf8_lower(values) if column.type is ColumnType.BOOL else values
        try:
            typed = pc.cast(source, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for index, value in enumerate(source.to_pylist()):
                try:
                    pc.cast(pa.array([value], pa.string()), target)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise _fail(
                        schema,
                        f"{_shown(values[index].as_py())} is not {_WHAT[column.type]}",
                        first_row + index,
                        column.name,
                    ) from None
            raise  # pragma: no cover - a failing cast has a failing value
    if not column.nullable and typed.null_count:
        index = pc.index(pc.is_null(typed), True).as_py()
        raise _fail(schema, "empty, but the column cannot be null", first_row + index, column.name)
    return typed


class _BadRows:
    """pyarrow's invalid-row handler: keeps the first bad row's number and fails."""

    def __init__(self) -> None:
        self.first: int | None = None

    def __call__(self, row: Any) -> str:
        if self.first is None and row.number is not None:
            self.first = int(row.number) - 1  # pyarrow counts the header as row 1
        return "error"


def _reader(source: Path, schema: TableSchema, block_size: int, bad: _BadRows) -> Any:
    names = [c.name for c in schema.data_columns]
    try:
        reader = pacsv.open_csv(
            source,
            read_options=pacsv.ReadOptions(block_size=block_size, use_threads=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=bad),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in names},
                null_values=[""],
                strings_can_be_null=True,
            ),
        )
    except OSError as error:
        raise OutputError(source, error.strerror or str(error)) from None
    except pa.ArrowInvalid as error:
        raise _parse_error(schema, error, bad.first) from None
    found = reader.schema.names
    if found != names:
        missing = [n for n in names if n not in found]
        extra = [n for n in found if n not in names]
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(map(_shown, extra))}" if extra else "",
                "columns in another order" if not missing and not extra else "",
            )
            if part
        )
        raise _fail(schema, f"the header differs from the table's columns: {detail}")
    return reader


def _parse_error(schema: TableSchema, error: Exception, row: int | None) -> ExportSchemaError:
    """pyarrow's parse error with ``row`` (when known), the row's text (it may be long)
    dropped."""
    text = str(error)
    if "Empty CSV file" in text:
        return _fail(schema, "the file is empty: no header")
    reason = text.split(":", 2)[-1].strip() if "Expected" not in text else text
    reason = re.sub(r"(Expected \d+ columns, got \d+).*", r"\1", reason, flags=re.DOTALL)
    reason = reason.replace("CSV parse error: ", "")
    reason = _ROW.sub("", reason).strip(": ")
    return _fail(schema, f"cannot be parsed: {reason}", row)


def read_batches(
    source: str | os.PathLike[str],
    schema: TableSchema,
    *,
    label: str,
    window_start: datetime,
    window_end: datetime,
    block_size: int = BLOCK_SIZE,
) -> Iterator[Any]:
    """Typed pyarrow record batches of the export CSV at ``source``, with the table's
    ``label`` and window columns first (blocking: run it in a thread). `ExportSchemaError`
    on a header or value that does not fit ``schema``."""
    lo, hi = _utc(window_start, "window_start"), _utc(window_end, "window_end")
    target = arrow_schema(schema)
    bad = _BadRows()
    reader = _reader(Path(source), schema, block_size, bad)
    done = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as error:
            raise _parse_error(schema, error, bad.first) from None
        n = batch.num_rows
        columns = [
            pa.array([label] * n, pa.string()),
            pa.array([lo] * n, _ARROW_TYPES[ColumnType.TIMESTAMP]),
            pa.array([hi] * n, _ARROW_TYPES[ColumnType.TIMESTAMP]),
        ]
        for index, column in enumerate(schema.data_columns):
            columns.append(_typed(schema, column, batch.column(index), done + 1))
        done += n
        yield pa.RecordBatch.from_arrays(columns, schema=target)


def csv_to_parquet(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    schema: TableSchema,
    *,
    label: str,
    window_start: datetime,
    window_end: datetime,
    block_size: int = BLOCK_SIZE,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> Converted:
    """Convert the export CSV at ``source`` to Parquet at ``dest`` (zstd, row groups of
    about ``row_group_rows`` rows), atomically and durably; blocking. On any error nothing
    is left at ``dest`` (an existing file there is untouched)."""
    target = Path(dest)
    part = durable.part_path(target)
    batches = read_batches(
        source,
        schema,
        label=label,
        window_start=window_start,
        window_end=window_end,
        block_size=block_size,
    )
    rows = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(part, arrow_schema(schema), compression="zstd") as writer:
            group: list[Any] = []
            waiting = 0
            for batch in batches:
                group.append(batch)
                waiting += batch.num_rows
                if waiting >= row_group_rows:
                    writer.write_table(pa.Table.from_batches(group))
                    rows, group, waiting = rows + waiting, [], 0
            if group:
                writer.write_table(pa.Table.from_batches(group))
                rows += waiting
        durable.commit_part(part, target)
        durable.sync_folder(target.parent)
        return Converted(rows, target.stat().st_size)
    except OSError as error:
        raise output_error(target, error) from None
    finally:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)


async def convert_export(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    schema: TableSchema,
    *,
    label: str,
    window_start: datetime,
    window_end: datetime,
    block_size: int = BLOCK_SIZE,
    keep_source: bool = True,
) -> Converted:
    """`csv_to_parquet` in a worker thread, so the event loop keeps serving; with
    ``keep_source=False`` the CSV is removed afterwards, converted or not."""

    def run() -> Converted:
        try:
            return csv_to_parquet(
                source,
                dest,
                schema,
                label=label,
                window_start=window_start,
                window_end=window_end,
                block_size=block_size,
            )
        finally:
            if not keep_source:
                Path(source).unlink(missing_ok=True)

    return await anyio.to_thread.run_sync(run)
