"""`tables` schemas as Arrow schemas and rows as Arrow tables, for the parquet and
duckdb sinks (and anything else writing those tables). Needs the ``[tables]`` extra.

Each schema carries its kind and version in its metadata (`KIND_KEY`, `VERSION_KEY`), so
a Parquet file says which schema wrote it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .. import exceptions as exc
from ..tables import ColumnType, Row, TableSchema
from . import TABLES_EXTRA_HINT

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["require", "arrow_schema", "to_table", "KIND_KEY", "VERSION_KEY"]

KIND_KEY = b"lexer.kind"
VERSION_KEY = b"lexer.schema_version"


def require(module: str, format: str) -> ModuleType:
    """Import ``module`` (``pyarrow``, ``pyarrow.parquet``, ``duckdb``) for ``format``, or
    `ConfigurationError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise exc.ConfigurationError(
            f"the {format} format needs the optional [tables] extra (pyarrow, duckdb), "
            f"and {module.split('.')[0]} is not installed: {TABLES_EXTRA_HINT}"
        ) from None


def _arrow_type(pa: Any, kind: ColumnType) -> Any:
    return {
        ColumnType.STRING: pa.string(),
        ColumnType.INT64: pa.int64(),
        ColumnType.FLOAT64: pa.float64(),
        ColumnType.TIMESTAMP: pa.timestamp("us", tz="UTC"),
    }[kind]


@functools.cache
def arrow_schema(schema: TableSchema) -> pa.Schema:
    """``schema`` as an Arrow schema, its kind and version in the metadata."""
    pa = require("pyarrow", "parquet")
    return pa.schema(
        [pa.field(c.name, _arrow_type(pa, c.type), nullable=c.nullable) for c in schema.columns],
        metadata={KIND_KEY: schema.table.encode(), VERSION_KEY: str(schema.version).encode()},
    )


def to_table(schema: TableSchema, rows: Sequence[Row]) -> pa.Table:
    """``rows`` (from `tables.to_rows`) as an Arrow table of ``schema``."""
    pa = require("pyarrow", "parquet")
    return pa.Table.from_pylist(list(rows), schema=arrow_schema(schema))
