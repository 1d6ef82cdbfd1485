"""The backfill checkpoint: an SQLite file recording each unit's state.

A unit is ``done`` once its output file is renamed into place. An export unit records
that it is about to start a job (``starting``) before the request, and the job's report
token (``pending``) as soon as the answer arrives, so a rerun polls that job again rather
than starting another; a unit found ``starting`` may have had a job started that was
never recorded. Every write is committed before the runner goes on.

A ``done`` unit also records when it was fetched and whether it is final: a provisional
unit (its window too recent to have settled) is refetched by every run until it is.

The schema is versioned (SQLite's ``user_version``): a checkpoint of an older version
is migrated in place when opened, one of a newer version is refused with a clear error.

The checkpoint defends itself: a file that is not a readable checkpoint raises
`CheckpointError` saying so and what to do, and so does a write after the file was
deleted or replaced while the run held it open.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs

from . import exceptions as exc

__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "CheckpointError",
    "UnitRecord",
    "DONE",
    "FAILED",
    "PENDING",
    "STARTING",
    "SCHEMA_VERSION",
    "PAGE_CACHE_KIB",
]

DONE = "done"
FAILED = "failed"
PENDING = "pending"
STARTING = "starting"

SCHEMA_VERSION = 2
"""The checkpoint schema this version writes: 1 had no ``fetched_at`` and ``final``."""
PAGE_CACHE_KIB = 256
"""SQLite's page cache for the checkpoint's connection, in KiB (its default: 2,000)."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    unit_id      TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    report_token TEXT,
    error        TEXT,
    bytes        INTEGER,
    updated_at   REAL NOT NULL,
    fetched_at   REAL,
    final        INTEGER
)
"""
_V1_COLUMNS = ("unit_id", "state", "report_token", "error", "bytes", "updated_at")
_COLUMNS = (*_V1_COLUMNS, "fetched_at", "final")
# Version 1 to 2: a done unit was fetched when last updated; whether it is final is
# unknown (NULL), so the runner judges it by its window and that time.
_MIGRATE_V1 = (
    "ALTER TABLE units ADD COLUMN fetched_at REAL",
    "ALTER TABLE units ADD COLUMN final INTEGER",
    "UPDATE units SET fetched_at = updated_at WHERE state = 'done'",
)
_SELECT = "SELECT unit_id, state, report_token, error, bytes, fetched_at, final FROM units"

_UPSERT = (
    "INSERT INTO units (unit_id, state, report_token, error, bytes, updated_at, "
    "fetched_at, final) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(unit_id) DO UPDATE SET "
    "state=excluded.state, report_token=excluded.report_token, "
    "error=excluded.error, bytes=excluded.bytes, updated_at=excluded.updated_at, "
    "fetched_at=coalesce(excluded.fetched_at, units.fetched_at), "
    "final=coalesce(excluded.final, units.final)"
)
_CORRUPT_CODES = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}
T = TypeVar("T")


class CheckpointError(exc.OutputError):
    """The backfill checkpoint cannot be used: it is corrupt, cannot be written (a full
    disk, a read-only folder), or was deleted or replaced during the run. The backfill
    stops, since what it does next could not be recorded. ``path`` is the checkpoint."""


def _reason(error: sqlite3.Error) -> str:
    """What to tell the user about an SQLite error on the checkpoint."""
    code = getattr(error, "sqlite_errorname", "")
    # OperationalError covers the file system's refusals (full, read-only, unopenable);
    # its siblings under DatabaseError mean the file's contents are bad.
    operational = isinstance(error, sqlite3.OperationalError)
    if code in _CORRUPT_CODES or (isinstance(error, sqlite3.DatabaseError) and not operational):
        return _corrupt(str(error))
    return f"cannot use the checkpoint: {error}"


def _corrupt(detail: str) -> str:
    return (
        f"the checkpoint is corrupt ({detail}); move it and any -wal and -shm files "
        "beside it aside and rerun (its units are then fetched again and their files "
        "rewritten)"
    )


@attrs.frozen
class UnitRecord:
    """A unit's row. ``fetched_at`` (epoch seconds) is when its file was last written;
    ``final`` whether that file is final (None: unknown, from a version 1 checkpoint)."""

    unit_id: str
    state: str
    report_token: str | None
    error: str | None
    bytes: int | None
    fetched_at: float | None = None
    final: bool | None = None

    @classmethod
    def of_row(cls, row: tuple[Any, ...]) -> UnitRecord:
        unit_id, state, report_token, error, size, fetched_at, final = row
        return cls(
            unit_id,
            state,
            report_token,
            error,
            size,
            fetched_at,
            None if final is None else bool(final),
        )


class CheckpointStore(Protocol):
    """What the backfill's runner and writer need of a checkpoint: the SQLite file
    (`Checkpoint`) on one host, or PostgreSQL (`checkpoint_pg.PostgresCheckpoint`)
    shared by workers on many. Every write is durable when the call returns."""

    def record_intent(self, unit_id: str) -> None: ...

    def record_job(self, unit_id: str, report_token: str) -> None: ...

    def mark_done(
        self, unit_id: str, size: int, *, final: bool = True, fetched_at: float | None = None
    ) -> None: ...

    def mark_done_many(
        self,
        units: Sequence[tuple[str, int]],
        *,
        final: bool | Sequence[bool] = True,
        fetched_at: float | None = None,
    ) -> None: ...

    def mark_failed(self, unit_id: str, error: str, report_token: str | None = None) -> None: ...

    def get(self, unit_id: str) -> UnitRecord | None: ...

    def records(self) -> dict[str, UnitRecord]: ...

    def close(self) -> None: ...


class Checkpoint:
    """Unit states in ``path``.

    SQLite in WAL mode with synchronous=NORMAL: every commit survives a crash of the
    process (SIGKILL included); only an OS crash or power cut may roll back the last
    few, and then those units are simply redone (their files are rewritten identically,
    their export jobs started again). FULL would fsync each commit, a millisecond per
    unit on the event loop, for no gain against process crashes.

    The connection stays open for the whole run, and every write first checks that
    ``path`` is still the file opened (same device and inode): a checkpoint deleted or
    replaced mid-run raises `CheckpointError` instead of recording into a ghost.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise exc.OutputError(path.parent, error.strerror or str(error)) from None
        # The backfill's report writer commits from a worker thread: one connection,
        # shared across threads, every use under _lock.
        self._lock = threading.Lock()
        self._db = self._sql(
            lambda: sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        )
        try:
            self._sql(self._prepare)
            self._identity = self._stat()
        except BaseException:
            self._db.close()
            raise
        if self._identity is None:  # pragma: no cover - deleted between open and stat
            self._db.close()
            raise CheckpointError(path, "the checkpoint vanished as it was opened")

    def _prepare(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # A run reads the table once and writes each unit's row once: SQLite's default
        # 2 MiB page cache, filled by a large checkpoint, was a fifth of a 100-token
        # run's memory above one token's; the OS page cache serves the misses.
        self._db.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        self._db.execute("BEGIN IMMEDIATE")  # one process migrates; others wait
        try:
            self._migrate()
        except BaseException:
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._check_integrity()

    def _migrate(self) -> None:
        """Create the table, or bring an older checkpoint to `SCHEMA_VERSION`."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise CheckpointError(
                self.path,
                f"the checkpoint was written by a newer lexer-activity-async (schema "
                f"{version}; this version reads up to {SCHEMA_VERSION}); upgrade, or use "
                "another output folder",
            )
        columns = self._columns()
        if not columns:
            self._db.execute(_SCHEMA)
        elif version < SCHEMA_VERSION and columns == _V1_COLUMNS:
            for statement in _MIGRATE_V1:
                self._db.execute(statement)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _columns(self) -> tuple[str, ...]:
        return tuple(row[1] for row in self._db.execute("PRAGMA table_info(units)"))

    def _check_integrity(self) -> None:
        columns = self._columns()
        if columns != _COLUMNS:
            raise CheckpointError(
                self.path,
                "not a backfill checkpoint (its `units` table has other columns); "
                "use another output folder or move the file aside",
            )
        problems = [str(row[0]) for row in self._db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            # The first finding is enough to say what is wrong; there may be thousands.
            lines = [line for problem in problems for line in problem.splitlines()]
            first = next((line for line in lines if not line.startswith("***")), "")
            raise CheckpointError(self.path, _corrupt(first or "integrity check failed"))

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _sql(self, call: Callable[[], T]) -> T:
        """``call()``, its SQLite errors as `CheckpointError`. Raised outside the handler,
        so the error carries no cause or context."""
        try:
            return call()
        except sqlite3.Error as error:
            reason = _reason(error)
        raise CheckpointError(self.path, reason)

    def _write(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Run ``sql`` for each row in one transaction, once the file is checked."""
        with self._lock:
            self._sql(lambda: self._write_checked(sql, rows))

    def _write_checked(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        if self._stat() != self._identity:
            raise CheckpointError(
                self.path,
                "the checkpoint was deleted or replaced while the backfill was "
                "using it; the run stopped, since it could record nothing more. "
                "A rerun uses whatever checkpoint is there now (with none, every "
                "unit is fetched again)",
            )
        if len(rows) == 1:
            # One statement in autocommit mode: its own transaction, committed on return.
            self._db.execute(sql, rows[0])
            return
        self._db.execute("BEGIN")
        try:
            self._db.executemany(sql, rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _upsert(
        self,
        unit_id: str,
        state: str,
        *,
        report_token: str | None = None,
        error: str | None = None,
        size: int | None = None,
    ) -> None:
        self._write(_UPSERT, [(unit_id, state, report_token, error, size, time.time(), None, None)])

    def record_intent(self, unit_id: str) -> None:
        """An export job is about to be started for ``unit_id`` (no token known yet)."""
        self._upsert(unit_id, STARTING)

    def record_job(self, unit_id: str, report_token: str) -> None:
        """An export job was started for ``unit_id``: remember its report token."""
        self._upsert(unit_id, PENDING, report_token=report_token)

    def mark_done(
        self, unit_id: str, size: int, *, final: bool = True, fetched_at: float | None = None
    ) -> None:
        """``unit_id``'s file of ``size`` bytes is in place: final, or provisional (to be
        refetched); fetched at ``fetched_at`` (default: now)."""
        self.mark_done_many([(unit_id, size)], final=final, fetched_at=fetched_at)

    def mark_done_many(
        self,
        units: Sequence[tuple[str, int]],
        *,
        final: bool | Sequence[bool] = True,
        fetched_at: float | None = None,
    ) -> None:
        """Mark several units done in one transaction (the report writer's group commit);
        ``final`` for all, or one per unit."""
        if not units:
            return
        now = time.time()
        when = now if fetched_at is None else fetched_at
        finals = [final] * len(units) if isinstance(final, bool) else list(final)
        self._write(
            _UPSERT,
            [
                (unit_id, DONE, None, None, size, now, when, int(is_final))
                for (unit_id, size), is_final in zip(units, finals, strict=True)
            ],
        )

    def mark_failed(self, unit_id: str, error: str, report_token: str | None = None) -> None:
        self._upsert(unit_id, FAILED, error=error, report_token=report_token)

    def get(self, unit_id: str) -> UnitRecord | None:
        with self._lock:
            row = self._sql(
                lambda: self._db.execute(_SELECT + " WHERE unit_id = ?", (unit_id,)).fetchone()
            )
        return UnitRecord.of_row(row) if row else None

    def records(self) -> dict[str, UnitRecord]:
        with self._lock:
            rows = self._sql(lambda: self._db.execute(_SELECT).fetchall())
        return {row[0]: UnitRecord.of_row(row) for row in rows}
