"""The backfill checkpoint in PostgreSQL: the SQLite checkpoint's semantics (finished
units, provisional windows, failed units with their error, export job tokens recorded as
soon as they start) in a database that workers on many hosts share, and that also holds
their work queue (`backfill.workqueue`).

One database (or one schema, chosen by the URL's ``options=-csearch_path=...``) holds
one backfill: the first use records the spec's identity (the keys that decide which
files a run writes), and a spec that differs is refused, naming the keys. The schema is
created and migrated by the tool under an advisory lock (one worker migrates, the others
wait); a newer schema is refused with a clear error.

psycopg 3 (the ``[postgres]`` extra), one connection in autocommit mode, every use under
a lock: the runner writes from the event loop, the report writer from a worker thread.
The URL's password never appears in an error: `redact` shows it as ``***``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from . import exceptions as exc
from .checkpoint import DONE, FAILED, PENDING, STARTING, CheckpointError, UnitRecord

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresCheckpoint", "PG_SCHEMA_VERSION", "redact", "is_postgres_url"]

PG_SCHEMA_VERSION = 1
"""The schema this version writes and reads."""
_LOCK_KEY = 7_211_180_391
"""The advisory lock held while the schema is created or migrated (an arbitrary id)."""
_TABLES = (
    "lexer_schema",
    "lexer_spec",
    "lexer_units",
    "lexer_runs",
    "lexer_queue",
    "lexer_tokens",
    "lexer_workers",
)
_SCHEMA_V1 = (
    "CREATE TABLE lexer_schema (version integer NOT NULL)",
    "CREATE TABLE lexer_spec (id integer PRIMARY KEY CHECK (id = 1), identity jsonb NOT NULL, "
    "created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE lexer_units (unit_id text PRIMARY KEY, state text NOT NULL, "
    "report_token text, error text, bytes bigint, updated_at double precision NOT NULL, "
    "fetched_at double precision, final boolean)",
    "CREATE TABLE lexer_runs (run_id integer PRIMARY KEY, plan_now timestamptz NOT NULL, "
    "created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE lexer_queue (run_id integer NOT NULL REFERENCES lexer_runs, "
    "unit_id text NOT NULL, label text NOT NULL, seq integer NOT NULL, "
    "status text NOT NULL DEFAULT 'queued', claimed_by text, lease_until timestamptz, "
    "attempts integer NOT NULL DEFAULT 0, finished_by text, PRIMARY KEY (run_id, unit_id))",
    "CREATE INDEX lexer_queue_open ON lexer_queue (run_id, label, seq) WHERE status <> 'finished'",
    "CREATE TABLE lexer_tokens (run_id integer NOT NULL REFERENCES lexer_runs, "
    "label text NOT NULL, seq integer NOT NULL, claimed_by text, lease_until timestamptz, "
    "PRIMARY KEY (run_id, label))",
    "CREATE TABLE lexer_workers (worker_id text PRIMARY KEY, host text NOT NULL, "
    "pid integer NOT NULL, started_at timestamptz NOT NULL DEFAULT now(), "
    "alive_until timestamptz NOT NULL, stopped_at timestamptz)",
    "INSERT INTO lexer_schema (version) VALUES (1)",
)
_SELECT = "SELECT unit_id, state, report_token, error, bytes, fetched_at, final FROM lexer_units"
_UPSERT = (
    "INSERT INTO lexer_units (unit_id, state, report_token, error, bytes, updated_at, "
    "fetched_at, final) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (unit_id) DO UPDATE "
    "SET state = excluded.state, report_token = excluded.report_token, "
    "error = excluded.error, bytes = excluded.bytes, updated_at = excluded.updated_at, "
    "fetched_at = coalesce(excluded.fetched_at, lexer_units.fetched_at), "
    "final = coalesce(excluded.final, lexer_units.final)"
)
T = TypeVar("T")


def is_postgres_url(url: str) -> bool:
    return urlsplit(url).scheme in ("postgresql", "postgres")


def redact(url: str) -> str:
    """``url`` with its password (if any) as ``***``, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise exc.ConfigurationError(
            "a postgresql:// checkpoint_url needs psycopg: pip install "
            "'lexer-activity-async[postgres]'"
        ) from None
    return psycopg


class PostgresCheckpoint:
    """Unit states (and the work queue's tables) in the PostgreSQL database at ``url``.

    ``identity`` is the spec's identity (key -> text): recorded on first use, compared on
    every later one (a difference raises `CheckpointError` naming the keys). With
    ``read_only`` the connection writes nothing (``lexer-activity status``): no schema is
    created, and a database without one reads as empty (`exists` is False).
    """

    def __init__(
        self,
        url: str,
        identity: Mapping[str, str],
        *,
        read_only: bool = False,
        application_name: str = "lexer-activity",
    ) -> None:
        self.url = url
        self.path = redact(url)
        self._psycopg = _import_psycopg()
        self._lock = threading.Lock()
        self.read_only = read_only
        self.exists = True
        self._db: psycopg.Connection[Any] = self._call(
            lambda: self._psycopg.connect(
                url,
                autocommit=True,
                connect_timeout=10,
                application_name=application_name[:63],
            ),
            connecting=True,
        )
        try:
            if read_only:
                self._call(lambda: self._db.execute("SET default_transaction_read_only = on"))
            self._call(lambda: self._prepare(identity))
        except BaseException:
            self._db.close()
            raise

    # -- errors ------------------------------------------------------------------------

    def _reason(self, error: Exception, connecting: bool) -> str:
        text = " ".join(str(error).split()) or type(error).__name__
        password = urlsplit(self.url).password
        if password:
            text = text.replace(password, "***")
        if connecting:
            return f"cannot connect to the checkpoint database: {text}"
        return f"checkpoint database error: {text}"

    def _call(self, call: Callable[[], T], *, connecting: bool = False) -> T:
        """``call()``, its database errors as `CheckpointError` (no cause, no context:
        nothing of the connection string travels in a chain)."""
        try:
            return call()
        except CheckpointError:
            raise
        except self._psycopg.Error as error:
            reason = self._reason(error, connecting)
        raise CheckpointError(self.path, reason)

    def run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``work(connection)`` under the lock, its errors as `CheckpointError` (for the
        work queue, which shares this connection)."""
        with self._lock:
            return self._call(lambda: work(self._db))

    # -- schema and identity -------------------------------------------------------------

    def _prepare(self, identity: Mapping[str, str]) -> None:
        db = self._db
        if self.read_only:
            version = self._version()
            if version is None:
                self.exists = False
                return
            self._check_version(version)
            self._check_identity(identity, write=False)
            return
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            version = self._version()
            if version is None:
                for statement in _SCHEMA_V1:
                    db.execute(statement)
            else:
                self._check_version(version)
            self._check_identity(identity, write=True)

    def _version(self) -> int | None:
        """The schema version, or None in a database without the tool's tables."""
        found = self._db.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ANY(%s) "
            "AND table_schema = current_schema()",
            (list(_TABLES),),
        ).fetchone()
        if not found or found[0] == 0:
            return None
        row = self._db.execute(
            "SELECT max(version) FROM lexer_schema"
            if found[0] == len(_TABLES)
            else "SELECT NULL::integer"
        ).fetchone()
        if row is None or row[0] is None:
            raise CheckpointError(
                self.path,
                "the database holds some of the backfill's tables but not all (or no schema "
                "version): not a backfill checkpoint; use another database or schema",
            )
        return int(row[0])

    def _check_version(self, version: int) -> None:
        if version > PG_SCHEMA_VERSION:
            raise CheckpointError(
                self.path,
                f"the checkpoint was written by a newer lexer-activity-async (schema "
                f"{version}; this version reads up to {PG_SCHEMA_VERSION}); upgrade, or use "
                "another database",
            )

    def _check_identity(self, identity: Mapping[str, str], *, write: bool) -> None:
        row = self._db.execute("SELECT identity FROM lexer_spec WHERE id = 1").fetchone()
        if row is None:
            if write:
                self._db.execute(
                    "INSERT INTO lexer_spec (id, identity) VALUES (1, %s)",
                    (json.dumps(dict(identity), sort_keys=True),),
                )
            return
        stored = row[0] if isinstance(row[0], dict) else json.loads(row[0])
        differ = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
        if differ:
            raise CheckpointError(
                self.path,
                f"this database holds the backfill of another spec (keys that differ: "
                f"{', '.join(differ)}); run with the same spec, or give this one its own "
                "database or schema",
            )

    # -- the checkpoint (see `checkpoint.CheckpointStore`) -------------------------------

    def _write(self, rows: Sequence[tuple[Any, ...]]) -> None:
        def write(db: psycopg.Connection[Any]) -> None:
            if len(rows) == 1:
                db.execute(_UPSERT, rows[0])
                return
            with db.transaction(), db.cursor() as cursor:
                cursor.executemany(_UPSERT, rows)

        self.run(write)

    def _upsert(
        self,
        unit_id: str,
        state: str,
        *,
        report_token: str | None = None,
        error: str | None = None,
    ) -> None:
        self._write([(unit_id, state, report_token, error, None, time.time(), None, None)])

    def record_intent(self, unit_id: str) -> None:
        self._upsert(unit_id, STARTING)

    def record_job(self, unit_id: str, report_token: str) -> None:
        self._upsert(unit_id, PENDING, report_token=report_token)

    def mark_done(
        self, unit_id: str, size: int, *, final: bool = True, fetched_at: float | None = None
    ) -> None:
        self.mark_done_many([(unit_id, size)], final=final, fetched_at=fetched_at)

    def mark_done_many(
        self,
        units: Sequence[tuple[str, int]],
        *,
        final: bool | Sequence[bool] = True,
        fetched_at: float | None = None,
    ) -> None:
        if not units:
            return
        now = time.time()
        when = now if fetched_at is None else fetched_at
        finals = [final] * len(units) if isinstance(final, bool) else list(final)
        self._write(
            [
                (unit_id, DONE, None, None, size, now, when, is_final)
                for (unit_id, size), is_final in zip(units, finals, strict=True)
            ]
        )

    def mark_failed(self, unit_id: str, error: str, report_token: str | None = None) -> None:
        self._upsert(unit_id, FAILED, error=error, report_token=report_token)

    def get(self, unit_id: str) -> UnitRecord | None:
        if not self.exists:
            return None
        row = self.run(
            lambda db: db.execute(_SELECT + " WHERE unit_id = %s", (unit_id,)).fetchone()
        )
        return UnitRecord.of_row(row) if row else None

    def records(self) -> dict[str, UnitRecord]:
        if not self.exists:
            return {}
        rows = self.run(lambda db: db.execute(_SELECT).fetchall())
        return {row[0]: UnitRecord.of_row(row) for row in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> PostgresCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
