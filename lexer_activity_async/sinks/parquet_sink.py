"""The ``parquet`` sink: one dataset per report kind, hive-partitioned by label and
window, one file per window::

    <output>/<kind>/label=<label>/window=<from>_<to>/part.parquet

A window's file is written beside it as a hidden part file (which Parquet readers skip),
then renamed over the old one: a refetched (provisional) window replaces its rows, and
a rerun or a crash never leaves a duplicate. Each file's schema metadata holds its kind
and schema version (`arrow_tables.VERSION_KEY`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from urllib.parse import quote

from .. import exceptions as exc
from ..kinds import ReportResult
from ..reports import ReportType
from ..tables import schema_for, to_rows
from . import Slot
from .arrow_tables import VERSION_KEY, require, to_table
from .files import FileSink

__all__ = ["ParquetSink", "FILE_NAME", "partition_value", "window_partition"]

FILE_NAME = "part.parquet"


def partition_value(text: str) -> str:
    """``text`` as a hive partition value: percent-encoded, as Hive and Arrow do."""
    return quote(text, safe=" -.+@")


def window_partition(slot: Slot) -> str:
    """The window as a partition value: ``2024-01-01_2024-02-01`` when both bounds are
    UTC midnights, else the full stamp (offsets and times kept)."""
    lo, hi = slot.window_start, slot.window_end
    days = all(
        m.utcoffset() == timedelta(0) and (m.hour, m.minute, m.second) == (0, 0, 0)
        for m in (lo, hi)
    )
    return f"{lo.date()}_{hi.date()}" if days else slot.stamp


class ParquetSink(FileSink):
    format = "parquet"

    def __init__(self, output: Path) -> None:
        super().__init__(output)
        self._pq: ModuleType | None = None

    def dataset(self, kind: ReportType) -> Path:
        return self.output / schema_for(kind).table

    def path(self, slot: Slot) -> Path:
        label = f"label={partition_value(slot.label)}"
        window = f"window={partition_value(window_partition(slot))}"
        return self.dataset(slot.kind) / label / window / FILE_NAME

    def part_of(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.part")  # hidden: readers skip it

    def open(self, kinds: Sequence[ReportType]) -> None:
        """`ConfigurationError` without pyarrow; `OutputError` if a dataset holds files
        of another schema version (checked on the first file found in each)."""
        self._pq = require("pyarrow.parquet", self.format)
        for kind in dict.fromkeys(kinds):
            schema = schema_for(kind)
            found = next(self.dataset(kind).glob(f"label=*/window=*/{FILE_NAME}"), None)
            if found is None:
                continue
            try:
                metadata = self._pq.read_schema(found).metadata or {}
            except (OSError, ValueError) as error:
                raise exc.OutputError(found, f"not a readable Parquet file ({error})") from None
            version = metadata.get(VERSION_KEY, b"none").decode(errors="replace")
            if version != str(schema.version):
                raise exc.OutputError(
                    self.dataset(kind),
                    f"holds {schema.table} tables of schema version {version}; this version "
                    f"writes version {schema.version}: use another output folder (or move "
                    f"this dataset away)",
                )

    def encode(self, slot: Slot, result: ReportResult, body: bytes | None) -> bytes:
        assert self._pq is not None, "open() the sink first"
        schema = schema_for(slot.kind)
        rows = to_rows(
            slot.kind,
            result,
            label=slot.label,
            window_start=slot.window_start,
            window_end=slot.window_end,
            form=slot.form,
        )
        buffer = io.BytesIO()
        self._pq.write_table(to_table(schema, rows), buffer)
        return buffer.getvalue()
