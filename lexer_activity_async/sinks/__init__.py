"""Where a backfill's reports land: one `ReportSink` per output format.

``json`` (the client's typed result as JSON, one file per unit), ``raw`` (the API's
response body byte for byte, one file per unit), ``parquet`` (one dataset per report
kind, hive-partitioned by label and window, one file per window) and ``duckdb`` (one
database file, a table per kind, each window replaced in one transaction). The tables
are those of `tables`; parquet and duckdb need the ``[tables]`` extra.

A sink stages each unit on the event loop (`ReportSink.stage`), then writes a batch
durably in a worker thread (`ReportSink.write`); the backfill's writer checkpoints a
unit only after that. Bad output (a missing extra, a schema version the output does not
hold, a database another process holds) is found by `ReportSink.open`, before any
request.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import attrs

from .. import exceptions as exc
from ..kinds import ReportResult
from ..reports import ReportType

__all__ = ["FORMATS", "Slot", "Staged", "ReportSink", "make_sink", "TABLES_EXTRA_HINT"]

FORMATS = ("json", "raw", "parquet", "duckdb")
"""The output formats of a backfill's reports; ``json`` is the default."""

TABLES_EXTRA_HINT = "pip install 'lexer-activity-async[tables]'"


@attrs.frozen
class Slot:
    """One report over one window for one token label: where a unit's data goes.
    ``name`` is the report's type name as requested (a folder name in json and raw),
    ``stamp`` the window as a file-name-safe string, ``form`` the NPS survey (NPS kinds)."""

    label: str
    name: str
    kind: ReportType
    window_start: datetime
    window_end: datetime
    stamp: str
    form: int | None = None


@attrs.define(eq=False)
class Staged:
    """A unit ready to be written: its ``size`` (bytes, recorded in the checkpoint),
    its destination ``path``, and what the sink keeps until `ReportSink.write`: a part
    file (file sinks) or an in-memory table (duckdb)."""

    slot: Slot
    size: int
    path: Path
    part: Path | None = None
    table: object = None


class ReportSink(Protocol):
    """How a backfill writes report units in one format."""

    format: str
    needs_body: bool
    """Whether `stage` needs the response body (``raw``), not just the typed result."""

    def open(self, kinds: Sequence[ReportType]) -> None:
        """Check the output before any request (extras, schema versions, locks) and
        hold what the run needs; raises `ConfigurationError` or `OutputError`."""

    def close(self) -> None:
        """Release what `open` holds."""

    def has(self, slot: Slot, size: int | None) -> bool:
        """Whether a unit recorded done with ``size`` still has its data in place."""

    def stage(self, slot: Slot, result: ReportResult, body: bytes | None) -> Staged:
        """Prepare ``result`` (and ``body``) for `write`; `OutputError` if it cannot."""

    def write(self, batch: Sequence[Staged]) -> list[Exception | None]:
        """Make ``batch`` durable (blocking, run in a worker thread); per entry the
        error that kept it from being written, or None. Failed entries leave nothing."""

    def discard(self, staged: Staged) -> None:
        """Drop a staged unit that will not be written (cancelled, failed)."""


def make_sink(format: str, output: Path) -> ReportSink:
    """The sink writing ``format`` under ``output`` (not yet opened); `ConfigurationError`
    for an unknown format."""
    if format == "json":
        from .files import JsonSink

        return JsonSink(output)
    if format == "raw":
        from .files import RawSink

        return RawSink(output)
    if format == "parquet":
        from .parquet_sink import ParquetSink

        return ParquetSink(output)
    if format == "duckdb":
        from .duckdb_sink import DuckDBSink

        return DuckDBSink(output)
    raise exc.ConfigurationError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
