"""The backfill checkpoint: an SQLite file recording each unit's state.

A unit is ``done`` once its output file is renamed into place; an export unit records its
job's report token as soon as the job is started, so a rerun polls that job again rather
than starting another. Every write is committed before the runner goes on.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import attrs

__all__ = ["Checkpoint", "UnitRecord", "DONE", "FAILED", "PENDING"]

DONE = "done"
FAILED = "failed"
PENDING = "pending"

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


_UPSERT = (
    "INSERT INTO units (unit_id, state, report_token, error, bytes, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(unit_id) DO UPDATE SET "
    "state=excluded.state, report_token=excluded.report_token, "
    "error=excluded.error, bytes=excluded.bytes, updated_at=excluded.updated_at"
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
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The backfill's report writer commits from a worker thread: one connection,
        # shared across threads, every use under _lock.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

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
        # One statement in autocommit mode: its own transaction, committed on return.
        with self._lock:
            self._db.execute(
                _UPSERT, (unit_id, state, report_token, error, size, time.time())
            )

    def record_job(self, unit_id: str, report_token: str) -> None:
        """An export job was started for ``unit_id``: remember its report token."""
        self._upsert(unit_id, PENDING, report_token=report_token)

    def mark_done(self, unit_id: str, size: int) -> None:
        self._upsert(unit_id, DONE, size=size)

    def mark_done_many(self, units: list[tuple[str, int]]) -> None:
        """Mark several units done in one transaction (the report writer's group commit)."""
        now = time.time()
        rows = [(unit_id, DONE, None, None, size, now) for unit_id, size in units]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(_UPSERT, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def mark_failed(self, unit_id: str, error: str, report_token: str | None = None) -> None:
        self._upsert(unit_id, FAILED, error=error, report_token=report_token)

    def get(self, unit_id: str) -> UnitRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT unit_id, state, report_token, error, bytes FROM units WHERE unit_id = ?",
                (unit_id,),
            ).fetchone()
        return UnitRecord(*row) if row else None

    def records(self) -> dict[str, UnitRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT unit_id, state, report_token, error, bytes FROM units"
            ).fetchall()
        return {row[0]: UnitRecord(*row) for row in rows}
