"""Typed, streaming CSV → Parquet of exports: the sandbox's real export files over loopback
HTTP converted column by column, and every way a file can fail to fit its schema."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MakeClient

from lexer_activity_async import ExportSchemaError, ValidationError
from lexer_activity_async.csv_parquet import arrow_schema, csv_to_parquet, read_batches
from lexer_activity_async.exports import PollPolicy
from lexer_activity_async.reports import ExportKind
from lexer_activity_async.tables import (
    EXPORT_SCHEMAS,
    Column,
    ColumnType,
    TableSchema,
    export_schema_for,
)

JAN = datetime(2026, 1, 1, tzinfo=timezone.utc)
FEB = datetime(2026, 2, 1, tzinfo=timezone.utc)
POLL = PollPolicy(first_delay=0.02, factor=1.5, cap=0.05, timeout=30.0)
KINDS: list[tuple[str, dict[str, Any]]] = [
    ("case_details", {}),
    ("nps_submissions", {"form": 55}),
    ("mention_sla_export", {}),
]
WINDOW: dict[str, Any] = {"label": "care", "window_start": JAN, "window_end": FEB}

# A schema with one column of each type, for files written here.
MIXED = TableSchema(
    ExportKind.CASE_DETAILS,
    7,
    (
        *EXPORT_SCHEMAS[ExportKind.CASE_DETAILS].columns[:3],
        Column("id", ColumnType.INT64, "id"),
        Column("at", ColumnType.TIMESTAMP, "when"),
        Column("seconds", ColumnType.FLOAT64, "how long", nullable=True),
        Column("flag", ColumnType.BOOL, "yes or no", nullable=True),
        Column("note", ColumnType.STRING, "free text", nullable=True),
    ),
    ("label", "window_start", "window_end", "id"),
)


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] | None = None) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header or ("id", "at", "seconds", "flag", "note"))
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def _python(column: Column, text: str) -> object:
    """What a CSV field means as a value of ``column`` (the reference parse)."""
    if text == "":
        return None
    if column.type is ColumnType.INT64:
        return int(text)
    if column.type is ColumnType.FLOAT64:
        return float(text)
    if column.type is ColumnType.TIMESTAMP:
        return datetime.fromisoformat(text).astimezone(timezone.utc)
    return text


@pytest.mark.parametrize(("kind", "options"), KINDS, ids=[k for k, _ in KINDS])
async def test_sandbox_exports_convert_to_typed_parquet(
    make_client: MakeClient, tmp_path: Path, kind: str, options: dict[str, Any]
) -> None:
    source = tmp_path / f"{kind}.csv"
    async with make_client() as client:
        await client.export(kind, JAN, FEB, source, poll=POLL, **options)
    schema = export_schema_for(kind)
    dest = tmp_path / f"{kind}.parquet"
    # A small block makes several batches (row groups) of a file of a few hundred rows.
    result = csv_to_parquet(source, dest, schema, block_size=1024, row_group_rows=20, **WINDOW)

    with source.open(newline="", encoding="utf-8") as handle:
        expected = list(csv.DictReader(handle))
    assert expected
    parquet = pq.ParquetFile(dest)
    assert parquet.metadata.num_row_groups > 1
    assert parquet.schema_arrow == arrow_schema(schema)
    assert parquet.schema_arrow.metadata[b"lexer_activity.version"] == b"1"
    table = parquet.read()
    assert result.rows == table.num_rows == len(expected)
    assert result.bytes == dest.stat().st_size
    assert table.column_names == list(schema.names)
    assert table.schema.field("window_start").type == pa.timestamp("us", tz="UTC")
    rows = table.to_pylist()
    for row, raw in zip(rows, expected, strict=True):
        assert row["label"] == "care"
        assert row["window_start"] == JAN
        assert row["window_end"] == FEB
        for column in schema.data_columns:
            assert row[column.name] == _python(column, raw[column.name]), column.name
    key = schema.primary_key
    assert len({tuple(row[k] for k in key) for row in rows}) == len(rows)
    first_time = next(c.name for c in schema.data_columns if c.type is ColumnType.TIMESTAMP)
    assert rows[0][first_time].tzinfo is not None
    assert rows[0][first_time].utcoffset() == timedelta(0)
    assert not (tmp_path / f"{kind}.parquet.part").exists()


def test_every_type_parses_and_empty_fields_are_null(tmp_path: Path) -> None:
    source = write_csv(
        tmp_path / "mixed.csv",
        [
            ["1", "2026-01-01T10:00:00+10:00", "1.5", "true", 'a "quoted",\nmultiline note'],
            ["2", "2026-01-02T00:00:00Z", "", "FALSE", ""],
            ["3", "2026-01-03 00:00:00+00:00", "2", "1", "NA"],
        ],
    )
    batches = list(read_batches(source, MIXED, **WINDOW))
    rows = pa.Table.from_batches(batches).to_pylist()
    assert [r["at"] for r in rows] == [
        datetime(2026, 1, 1, tzinfo=timezone.utc),
        datetime(2026, 1, 2, tzinfo=timezone.utc),
        datetime(2026, 1, 3, tzinfo=timezone.utc),
    ]
    assert [r["seconds"] for r in rows] == [1.5, None, 2.0]
    assert [r["flag"] for r in rows] == [True, False, True]
    assert [r["note"] for r in rows] == ['a "quoted",\nmultiline note', None, "NA"]


@pytest.mark.parametrize(
    ("bad", "column", "message"),
    [
        (["x1", "2026-01-01T00:00:00Z", "1", "true", ""], "id", "'x1' is not an integer"),
        (["5", "2026-01-01T00:00:00", "1", "true", ""], "at", "with a UTC offset"),
        (["5", "2026-01-01T00:00:00Z", "fast", "true", ""], "seconds", "'fast' is not a number"),
        (["5", "2026-01-01T00:00:00Z", "1", "maybe", ""], "flag", "not a boolean"),
        (["", "2026-01-01T00:00:00Z", "1", "true", ""], "id", "cannot be null"),
    ],
)
def test_a_value_that_does_not_fit_names_its_row_and_column(
    tmp_path: Path, bad: list[str], column: str, message: str
) -> None:
    good = [[str(i), "2026-01-01T00:00:00Z", "1", "true", "x" * 50] for i in range(1, 400)]
    source = write_csv(tmp_path / "bad.csv", [*good, bad, *good])
    dest = tmp_path / "out.parquet"
    dest.write_bytes(b"the previous file")
    with pytest.raises(ExportSchemaError, match=message) as raised:
        # Blocks of 4 KiB: the bad row is in a later batch, counted from the file's start.
        csv_to_parquet(source, dest, MIXED, block_size=4096, **WINDOW)
    assert raised.value.row == 400
    assert raised.value.column == column
    assert raised.value.kind == "case_details"
    assert f"row 400, column {column!r}" in str(raised.value)
    assert "version 7" in str(raised.value)
    assert dest.read_bytes() == b"the previous file"  # untouched
    assert not (tmp_path / "out.parquet.part").exists()


def test_a_row_with_too_few_fields_is_refused_with_its_row(tmp_path: Path) -> None:
    good = [[str(i), "2026-01-01T00:00:00Z", "1", "true", ""] for i in range(1, 6)]
    source = write_csv(tmp_path / "short.csv", [*good, ["6", "2026-01-01T00:00:00Z"]])
    with pytest.raises(
        ExportSchemaError, match="cannot be parsed: Expected 5 columns, got 2"
    ) as raised:
        csv_to_parquet(source, tmp_path / "out.parquet", MIXED, **WINDOW)
    assert raised.value.row == 6
    assert "row 6" in str(raised.value)
    assert "2026-01-01" not in str(raised.value)  # the row's text is not repeated
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (("id", "at", "seconds", "flag"), "missing note"),
        (("id", "at", "seconds", "flag", "note", "extra"), "unexpected 'extra'"),
        (("at", "id", "seconds", "flag", "note"), "another order"),
    ],
)
def test_a_header_that_differs_is_refused(
    tmp_path: Path, header: tuple[str, ...], message: str
) -> None:
    source = write_csv(tmp_path / "h.csv", [], header=header)
    with pytest.raises(ExportSchemaError, match=message) as raised:
        csv_to_parquet(source, tmp_path / "out.parquet", MIXED, **WINDOW)
    assert raised.value.row is None
    assert not (tmp_path / "out.parquet").exists()


def test_an_empty_file_and_a_header_only_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ExportSchemaError, match="empty"):
        csv_to_parquet(empty, tmp_path / "e.parquet", MIXED, **WINDOW)
    header_only = write_csv(tmp_path / "header.csv", [])
    result = csv_to_parquet(header_only, tmp_path / "h.parquet", MIXED, **WINDOW)
    assert result.rows == 0
    assert pq.read_table(tmp_path / "h.parquet").schema == arrow_schema(MIXED)


def test_naive_window_bounds_are_refused(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "ok.csv", [])
    with pytest.raises(ValidationError, match="timezone-aware"):
        list(
            read_batches(
                source, MIXED, label="a", window_start=datetime(2026, 1, 1), window_end=FEB
            )
        )
