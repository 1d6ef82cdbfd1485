"""The ``duckdb`` sink: one database file, ``<output>/lexer.duckdb``, a table per report
kind (named and typed as in `tables`), each window replaced in one transaction.

DuckDB lets one process hold a database file for writing, and while it does no other
process can open it, not even read-only. So the sink opens the file for each batch of
units, replaces the batch's windows in one transaction (DELETE their rows, INSERT the
new ones, record the windows), and closes it: between batches any process may open it
read-only. While a reader holds it, the next batch waits for it (up to `LOCK_WAIT`
seconds; then those units fail, and a rerun writes them). Another backfill writing the
same file is refused at `open` (an advisory lock held for the whole run).

Table ``_lexer_schema`` records each table's schema version; ``_lexer_windows`` each
window written (label, window, rows), so a unit whose window the file lacks is fetched
again.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from .. import exceptions as exc
from ..kinds import ReportResult
from ..reports import ReportType
from ..tables import ColumnType, TableSchema, schema_for, to_rows
from . import Slot, Staged
from .arrow_tables import require, to_table

__all__ = ["DuckDBSink", "DATABASE_NAME", "LOCK_WAIT", "create_statement"]

DATABASE_NAME = "lexer.duckdb"
LOCK_WAIT = 120.0
"""Seconds a batch waits for a reader to release the database before its units fail."""

_SQL_TYPES = {
    ColumnType.STRING: "VARCHAR",
    ColumnType.INT64: "BIGINT",
    ColumnType.FLOAT64: "DOUBLE",
    ColumnType.TIMESTAMP: "TIMESTAMPTZ",
}
_META = (
    "CREATE TABLE IF NOT EXISTS _lexer_schema (table_name VARCHAR PRIMARY KEY, version INTEGER)",
    "CREATE TABLE IF NOT EXISTS _lexer_windows (table_name VARCHAR NOT NULL, "
    "label VARCHAR NOT NULL, window_start TIMESTAMPTZ NOT NULL, "
    "window_end TIMESTAMPTZ NOT NULL, rows BIGINT NOT NULL, "
    "PRIMARY KEY (table_name, label, window_start, window_end))",
)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def create_statement(schema: TableSchema) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for ``schema`` (its primary key is documented,
    not declared: DuckDB before 1.2 refused a key deleted and inserted again in one
    transaction, which is how a window is replaced)."""
    columns = ", ".join(
        f"{_quoted(c.name)} {_SQL_TYPES[c.type]}{'' if c.nullable else ' NOT NULL'}"
        for c in schema.columns
    )
    return f"CREATE TABLE IF NOT EXISTS {_quoted(schema.table)} ({columns})"


def _window_key(slot: Slot) -> tuple[str, str, float, float]:
    return (
        schema_for(slot.kind).table,
        slot.label,
        slot.window_start.timestamp(),
        slot.window_end.timestamp(),
    )


def _locked(error: Exception) -> bool:
    return "lock" in str(error).lower()


class DuckDBSink:
    format = "duckdb"
    needs_body = False

    def __init__(
        self,
        output: Path,
        lock_wait: float = LOCK_WAIT,
        on_locked: Callable[[], object] | None = None,
    ) -> None:
        """``on_locked`` is called each time a batch finds the database held (tests)."""
        self.output = output
        self.path = output / DATABASE_NAME
        self.lock_wait = lock_wait
        self.on_locked = on_locked
        self._duckdb: ModuleType | None = None
        self._windows: set[tuple[str, str, float, float]] | None = None
        self._writer_lock: BinaryIO | None = None

    # -- opening ---------------------------------------------------------------------------

    def open(self, kinds: Sequence[ReportType]) -> None:
        """`ConfigurationError` without the extra; `OutputError` if another backfill or
        process holds the file, or a table there has another schema version."""
        require("pyarrow", self.format)
        self._duckdb = require("duckdb", self.format)
        self._hold_writer_lock()
        try:
            with self._connect(wait=False) as con:
                self._check_versions(con, [schema_for(k) for k in dict.fromkeys(kinds)])
                rows = con.execute(
                    "SELECT table_name, label, epoch(window_start), epoch(window_end) "
                    "FROM _lexer_windows"
                ).fetchall()
                self._windows = {(t, label, float(lo), float(hi)) for t, label, lo, hi in rows}
        except BaseException:
            self.close()
            raise

    def _hold_writer_lock(self) -> None:
        """An advisory lock beside the database for the whole run, so a second backfill
        is refused at once, not between two batches (POSIX; elsewhere not taken)."""
        if sys.platform == "win32":  # pragma: no cover - not run on Windows in CI
            return
        import fcntl

        lock_path = self.output / f".{DATABASE_NAME}.writer-lock"
        try:
            self.output.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "ab")  # noqa: SIM115 - held until close()
        except OSError as error:
            raise exc.OutputError(lock_path, error.strerror or str(error)) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise exc.OutputError(
                self.path, "another backfill is writing this database; wait for it to finish"
            ) from None
        self._writer_lock = handle

    def _check_versions(self, con: Any, schemas: Sequence[TableSchema]) -> None:
        for statement in _META:
            con.execute(statement)
        versions = dict(con.execute("SELECT table_name, version FROM _lexer_schema").fetchall())
        for schema in schemas:
            found = versions.get(schema.table)
            if found is not None and found != schema.version:
                raise exc.OutputError(
                    self.path,
                    f"table {schema.table} has schema version {found}; this version writes "
                    f"{schema.version}: use another output folder (or move the database away)",
                )
        con.execute("BEGIN")
        for schema in schemas:
            if schema.table not in versions:
                con.execute(create_statement(schema))
                con.execute(
                    "INSERT INTO _lexer_schema VALUES (?, ?)", [schema.table, schema.version]
                )
        con.execute("COMMIT")

    @contextlib.contextmanager
    def _connect(self, *, wait: bool) -> Iterator[Any]:
        """A read-write connection, closed on leaving (which folds the write-ahead log
        into the file). Locked by another process: wait up to `lock_wait` if ``wait``,
        else `OutputError` at once."""
        assert self._duckdb is not None, "open() the sink first"
        deadline = time.monotonic() + self.lock_wait
        delay = 0.01
        while True:
            try:
                # One thread: a batch is small, and DuckDB's thread pool doubled the cost
                # of each open and close (about 16 ms instead of 40 on two busy cores).
                con = self._duckdb.connect(str(self.path), config={"threads": 1})
                break
            except self._duckdb.Error as error:
                if not _locked(error):
                    raise exc.OutputError(self.path, str(error)) from None
                if self.on_locked is not None:
                    self.on_locked()
                if not wait or time.monotonic() >= deadline:
                    raise exc.OutputError(
                        self.path,
                        "another process holds the database (DuckDB allows no reader while "
                        f"a writer has it open, nor a writer while a reader has): {error}",
                    ) from None
                time.sleep(delay)  # a worker thread, waiting for another process
                delay = min(delay * 2, 1.0)
        try:
            yield con
        finally:
            con.close()

    def close(self) -> None:
        if self._writer_lock is not None:
            self._writer_lock.close()  # releases the advisory lock
            self._writer_lock = None

    # -- units -----------------------------------------------------------------------------

    def has(self, slot: Slot, size: int | None) -> bool:
        """Whether the database records the unit's window (unopened: whether it exists)."""
        if self._windows is None:
            return self.path.exists()
        return _window_key(slot) in self._windows

    def stage(self, slot: Slot, result: ReportResult, body: bytes | None) -> Staged:
        rows = to_rows(
            slot.kind,
            result,
            label=slot.label,
            window_start=slot.window_start,
            window_end=slot.window_end,
            form=slot.form,
        )
        table = to_table(schema_for(slot.kind), rows)
        return Staged(slot, table.nbytes, self.path, table=table)

    def write(self, batch: Sequence[Staged]) -> list[Exception | None]:
        """The batch's windows replaced in one transaction (a commit per window cost
        about 5 ms); if that fails, each window in its own, so a failure stays its own."""
        assert self._duckdb is not None, "open() the sink first"
        error_type = self._duckdb.Error
        try:
            with self._connect(wait=True) as con:
                try:
                    self._replace(con, batch)
                    return [None] * len(batch)
                except error_type:
                    with contextlib.suppress(error_type):
                        con.execute("ROLLBACK")
                errors: list[Exception | None] = []
                for entry in batch:
                    try:
                        self._replace(con, [entry])
                        errors.append(None)
                    except error_type as error:
                        with contextlib.suppress(error_type):
                            con.execute("ROLLBACK")
                        errors.append(exc.OutputError(self.path, str(error)))
                return errors
        except exc.OutputError as error:
            return [error] * len(batch)

    def _replace(self, con: Any, entries: Sequence[Staged]) -> None:
        """The entries' windows in one transaction: their old rows out, the new ones in
        (per table one DELETE and one INSERT: statements cost about 1 ms each)."""
        pa = require("pyarrow", self.format)
        by_table: dict[str, list[Staged]] = {}
        for entry in entries:
            by_table.setdefault(schema_for(entry.slot.kind).table, []).append(entry)
        con.execute("BEGIN")
        for table, group in by_table.items():
            windows = pa.table(
                {
                    "table_name": [table] * len(group),
                    "label": [e.slot.label for e in group],
                    "window_start": pa.array(
                        [e.slot.window_start for e in group], pa.timestamp("us", tz="UTC")
                    ),
                    "window_end": pa.array(
                        [e.slot.window_end for e in group], pa.timestamp("us", tz="UTC")
                    ),
                    "rows": pa.array([e.table.num_rows for e in group], pa.int64()),  # type: ignore[attr-defined]
                }
            )
            rows = pa.concat_tables([e.table for e in group])
            con.register("_lexer_staged_windows", windows)
            con.register("_lexer_staged_rows", rows)
            try:
                con.execute(
                    f"DELETE FROM {_quoted(table)} t USING _lexer_staged_windows w "
                    "WHERE t.label = w.label AND t.window_start = w.window_start "
                    "AND t.window_end = w.window_end"
                )
                con.execute(f"INSERT INTO {_quoted(table)} SELECT * FROM _lexer_staged_rows")
                con.execute(
                    "INSERT OR REPLACE INTO _lexer_windows SELECT * FROM _lexer_staged_windows"
                )
            finally:
                con.unregister("_lexer_staged_windows")
                con.unregister("_lexer_staged_rows")
        con.execute("COMMIT")
        if self._windows is not None:
            self._windows.update(_window_key(entry.slot) for entry in entries)

    def discard(self, staged: Staged) -> None:
        staged.table = None
