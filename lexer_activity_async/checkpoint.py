"""The backfill checkpoint: an SQLite file recording each unit's state.

A unit is ``done`` once its output file is renamed into place. An export unit records
that it is about to start a job (``starting``) before the request, and the job's report
token (``pending``) as soon as the answer arrives, so a rerun polls that job again rather
than starting another; a unit found ``starting`` may have had a job started that was
never recorded. Every write is committed before the runner goes on.

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
from pathlib import Path
from typing import Any, TypeVar

import attrs

from . import exceptions as exc

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "UnitRecord",
    "DONE",
    "FAILED",
    "PENDING",
    "STARTING",
]

DONE = "done"
FAILED = "failed"
PENDING = "pending"
STARTING = "starting"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    unit_id      TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    report_token TEXT,
    error        TEXT,
    bytes        INTEGER,
    updated_at   REAL NOT NULL
)
"""
_COLUMNS = ("unit_id", "state", "report_token", "error", "bytes", "updated_at")

_UPSERT = (
    "INSERT INTO units (unit_id, state, report_token, error, bytes, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(unit_id) DO UPDATE SET "
    "state=excluded.state, report_token=excluded.report_token, "
    "error=excluded.error, bytes=excluded.bytes, updated_at=excluded.updated_at"
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
    unit_id: str
    state: str
    report_token: str | None
    error: str | None
    bytes: int | None


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
        self._db.execute(_SCHEMA)
        self._check_integrity()

    def _check_integrity(self) -> None:
        columns = tuple(row[1] for row in self._db.execute("PRAGMA table_info(units)"))
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
        self._write(_UPSERT, [(unit_id, state, report_token, error, size, time.time())])

    def record_intent(self, unit_id: str) -> None:
        """An export job is about to be started for ``unit_id`` (no token known yet)."""
        self._upsert(unit_id, STARTING)

    def record_job(self, unit_id: str, report_token: str) -> None:
        """An export job was started for ``unit_id``: remember its report token."""
        self._upsert(unit_id, PENDING, report_token=report_token)

    def mark_done(self, unit_id: str, size: int) -> None:
        self._upsert(unit_id, DONE, size=size)

    def mark_done_many(self, units: list[tuple[str, int]]) -> None:
        """Mark several units done in one transaction (the report writer's group commit)."""
        if not units:
            return
        now = time.time()
        self._write(_UPSERT, [(unit_id, DONE, None, None, size, now) for unit_id, size in units])

    def mark_failed(self, unit_id: str, error: str, report_token: str | None = None) -> None:
        self._upsert(unit_id, FAILED, error=error, report_token=report_token)

    def get(self, unit_id: str) -> UnitRecord | None:
        with self._lock:
            row = self._sql(
                lambda: self._db.execute(
                    "SELECT unit_id, state, report_token, error, bytes FROM units "
                    "WHERE unit_id = ?",
                    (unit_id,),
                ).fetchone()
            )
        return UnitRecord(*row) if row else None

    def records(self) -> dict[str, UnitRecord]:
        with self._lock:
            rows = self._sql(
                lambda: self._db.execute(
                    "SELECT unit_id, state, report_token, error, bytes FROM units"
                ).fetchall()
            )
        return {row[0]: UnitRecord(*row) for row in rows}
