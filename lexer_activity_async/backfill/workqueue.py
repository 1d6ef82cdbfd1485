"""The work queue of a backfill across hosts, in the PostgreSQL checkpoint's database.

A *run* is one plan, written once: the first worker to find no unfinished run plans one
(under an advisory lock, so exactly one does) and records its "now", from which every
other worker rebuilds the same units. Each unit of the run is a queue row; each token a
row too, so that a worker claims a token as a whole (its units then come from one
process) and, only when every token with work is held by a live worker, helps with
another's queued units. Claims take rows with ``FOR UPDATE SKIP LOCKED`` and a lease
(``claimed_by``, ``lease_until``, by the database's clock, so hosts' clocks never
matter); a worker renews its leases while it works, and a unit whose lease ran out (its
worker died or stalled) is claimed again by another. Workers record a heartbeat, so the
status can say how many are alive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import attrs

from ..checkpoint_pg import PostgresCheckpoint
from .plan import Unit

if TYPE_CHECKING:
    import psycopg

__all__ = ["WorkQueue", "Run", "Claim", "QUEUED", "LEASED", "FINISHED"]

QUEUED, LEASED, FINISHED = "queued", "leased", "finished"
_PLAN_LOCK = 7_211_180_392
_OPEN = "(q.status = 'queued' OR (q.status = 'leased' AND q.lease_until < now()))"


@attrs.frozen
class Run:
    """A planned run: its id and the "now" its plan was made at."""

    run_id: int
    plan_now: datetime


@attrs.frozen
class Claim:
    """Units leased to this worker, all of one token; ``whole`` if the token is held
    as a whole (no other worker takes its units while the lease lasts)."""

    label: str
    unit_ids: tuple[str, ...]
    whole: bool


class WorkQueue:
    """The queue in ``db``'s database, as seen by worker ``worker_id`` with leases of
    ``lease`` seconds (status readers pass any id and never claim)."""

    def __init__(self, db: PostgresCheckpoint, worker_id: str, lease: float = 60.0) -> None:
        self.db = db
        self.worker_id = worker_id
        self.lease = lease

    def _interval(self) -> str:
        return f"{self.lease} seconds"

    # -- runs ----------------------------------------------------------------------------

    def latest_run(self) -> Run | None:
        if not self.db.exists:
            return None
        row = self.db.run(
            lambda db: db.execute(
                "SELECT run_id, plan_now FROM lexer_runs ORDER BY run_id DESC LIMIT 1"
            ).fetchone()
        )
        return Run(row[0], row[1].astimezone(timezone.utc)) if row else None

    def unfinished(self, run: Run) -> int:
        """Units of ``run`` not finished (queued or leased)."""
        row = self.db.run(
            lambda db: db.execute(
                "SELECT count(*) FROM lexer_queue WHERE run_id = %s AND status <> 'finished'",
                (run.run_id,),
            ).fetchone()
        )
        return int(row[0]) if row else 0

    def plan_run(self, after: Run | None, plan_now: datetime, units: Sequence[Unit]) -> Run:
        """Record a run planned at ``plan_now`` with ``units`` to do, unless another
        worker recorded one after ``after`` first (then that one). Idempotent: whoever
        takes the lock first plans; the others find its run."""

        def plan(db: psycopg.Connection[Any]) -> Run:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_PLAN_LOCK,))
                row = db.execute("SELECT max(run_id) FROM lexer_runs").fetchone()
                latest = row[0] if row and row[0] is not None else 0
                if latest != (after.run_id if after else 0):
                    found = db.execute(
                        "SELECT run_id, plan_now FROM lexer_runs WHERE run_id = %s", (latest,)
                    ).fetchone()
                    assert found is not None
                    return Run(found[0], found[1].astimezone(timezone.utc))
                run_id = latest + 1
                db.execute(
                    "INSERT INTO lexer_runs (run_id, plan_now) VALUES (%s, %s)",
                    (run_id, plan_now),
                )
                labels: dict[str, int] = {}
                for unit in units:
                    labels.setdefault(unit.label, len(labels))
                with db.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO lexer_tokens (run_id, label, seq) VALUES (%s, %s, %s)",
                        [(run_id, label, seq) for label, seq in labels.items()],
                    )
                    cursor.executemany(
                        "INSERT INTO lexer_queue (run_id, unit_id, label, seq) "
                        "VALUES (%s, %s, %s, %s)",
                        [(run_id, unit.id, unit.label, seq) for seq, unit in enumerate(units)],
                    )
                return Run(run_id, plan_now)

        return self.db.run(plan)

    # -- workers -------------------------------------------------------------------------

    def register(self, host: str, pid: int) -> None:
        self.db.run(
            lambda db: db.execute(
                "INSERT INTO lexer_workers (worker_id, host, pid, alive_until) "
                "VALUES (%s, %s, %s, now() + %s::interval) ON CONFLICT (worker_id) DO UPDATE "
                "SET alive_until = excluded.alive_until, stopped_at = NULL",
                (self.worker_id, host, pid, self._interval()),
            )
        )

    def renew(self) -> None:
        """Extend this worker's leases and heartbeat by the lease from now."""

        def renew(db: psycopg.Connection[Any]) -> None:
            with db.transaction():
                for table in ("lexer_queue", "lexer_tokens"):
                    db.execute(
                        f"UPDATE {table} SET lease_until = now() + %s::interval "
                        "WHERE claimed_by = %s AND lease_until IS NOT NULL",
                        (self._interval(), self.worker_id),
                    )
                db.execute(
                    "UPDATE lexer_workers SET alive_until = now() + %s::interval "
                    "WHERE worker_id = %s",
                    (self._interval(), self.worker_id),
                )

        self.db.run(renew)

    def stop(self) -> None:
        """This worker leaves: its unfinished units and tokens go back to the queue."""

        def stop(db: psycopg.Connection[Any]) -> None:
            with db.transaction():
                db.execute(
                    "UPDATE lexer_queue SET status = 'queued', claimed_by = NULL, "
                    "lease_until = NULL WHERE claimed_by = %s AND status = 'leased'",
                    (self.worker_id,),
                )
                db.execute(
                    "UPDATE lexer_tokens SET claimed_by = NULL, lease_until = NULL "
                    "WHERE claimed_by = %s",
                    (self.worker_id,),
                )
                db.execute(
                    "UPDATE lexer_workers SET stopped_at = now(), alive_until = now() "
                    "WHERE worker_id = %s",
                    (self.worker_id,),
                )

        self.db.run(stop)

    # -- claims --------------------------------------------------------------------------

    def claim(
        self, run: Run, batch: int, *, label: str | None = None, share: bool = False
    ) -> Claim | None:
        """Lease up to ``batch`` units: of ``label`` (a token this worker holds), else of
        a token no live worker holds (taken as a whole), else - with ``share``, when
        every token with work is held - queued units of another's token. None if nothing
        is claimable now."""

        def claim(db: psycopg.Connection[Any]) -> Claim | None:
            with db.transaction():
                whole = True
                chosen = label
                if chosen is None:
                    row = db.execute(
                        "SELECT t.label FROM lexer_tokens t WHERE t.run_id = %s AND "
                        "(t.claimed_by IS NULL OR t.lease_until < now()) AND EXISTS ("
                        "SELECT 1 FROM lexer_queue q WHERE q.run_id = t.run_id AND "
                        f"q.label = t.label AND {_OPEN}) "
                        "ORDER BY t.seq LIMIT 1 FOR UPDATE SKIP LOCKED",
                        (run.run_id,),
                    ).fetchone()
                    if row is None and share:
                        whole = False
                        row = db.execute(
                            "SELECT q.label FROM lexer_queue q WHERE q.run_id = %s AND "
                            f"{_OPEN} ORDER BY q.seq LIMIT 1 FOR UPDATE SKIP LOCKED",
                            (run.run_id,),
                        ).fetchone()
                    if row is None:
                        return None
                    chosen = row[0]
                rows = db.execute(
                    "UPDATE lexer_queue SET status = 'leased', claimed_by = %s, "
                    "lease_until = now() + %s::interval, attempts = attempts + 1 "
                    "WHERE (run_id, unit_id) IN (SELECT q.run_id, q.unit_id FROM lexer_queue q "
                    f"WHERE q.run_id = %s AND q.label = %s AND {_OPEN} ORDER BY q.seq "
                    "LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING seq, unit_id",
                    (self.worker_id, self._interval(), run.run_id, chosen, batch),
                ).fetchall()
                if not rows:
                    return None
                if whole:
                    db.execute(
                        "UPDATE lexer_tokens SET claimed_by = %s, "
                        "lease_until = now() + %s::interval WHERE run_id = %s AND label = %s",
                        (self.worker_id, self._interval(), run.run_id, chosen),
                    )
                assert chosen is not None
                return Claim(chosen, tuple(unit_id for _, unit_id in sorted(rows)), whole)

        return self.db.run(claim)

    def load(self, run: Run) -> tuple[int, int]:
        """(tokens of ``run`` with units not finished, workers alive): how to share."""

        def load(db: psycopg.Connection[Any]) -> tuple[int, int]:
            tokens = db.execute(
                "SELECT count(DISTINCT label) FROM lexer_queue WHERE run_id = %s "
                "AND status <> 'finished'",
                (run.run_id,),
            ).fetchone()
            alive = db.execute(
                "SELECT count(*) FROM lexer_workers WHERE alive_until >= now() "
                "AND stopped_at IS NULL"
            ).fetchone()
            return (int(tokens[0]) if tokens else 0, int(alive[0]) if alive else 0)

        return self.db.run(load)

    def finish(self, run: Run, unit_ids: Iterable[str]) -> None:
        """These units ended (done or failed, as the checkpoint says)."""
        ids = list(unit_ids)
        if not ids:
            return
        self.db.run(
            lambda db: db.execute(
                "UPDATE lexer_queue SET status = 'finished', lease_until = NULL, "
                "finished_by = %s WHERE run_id = %s AND unit_id = ANY(%s) AND claimed_by = %s",
                (self.worker_id, run.run_id, ids, self.worker_id),
            )
        )

    def holds(self, run: Run, unit_id: str) -> bool:
        """Whether ``unit_id`` is still leased to this worker (not taken over by another
        after this worker's lease ran out)."""
        row = self.db.run(
            lambda db: db.execute(
                "SELECT 1 FROM lexer_queue WHERE run_id = %s AND unit_id = %s "
                "AND claimed_by = %s AND status = 'leased'",
                (run.run_id, unit_id, self.worker_id),
            ).fetchone()
        )
        return row is not None

    def release_token(self, run: Run, label: str) -> None:
        """This worker no longer holds ``label`` as a whole."""
        self.db.run(
            lambda db: db.execute(
                "UPDATE lexer_tokens SET claimed_by = NULL, lease_until = NULL "
                "WHERE run_id = %s AND label = %s AND claimed_by = %s",
                (run.run_id, label, self.worker_id),
            )
        )

    # -- status --------------------------------------------------------------------------

    def leased_units(self, run: Run) -> set[str]:
        """Units of ``run`` leased to a live worker (a lease not run out)."""
        rows = self.db.run(
            lambda db: db.execute(
                "SELECT unit_id FROM lexer_queue WHERE run_id = %s AND status = 'leased' "
                "AND lease_until >= now()",
                (run.run_id,),
            ).fetchall()
        )
        return {row[0] for row in rows}

    def workers_alive(self) -> int:
        """Workers whose heartbeat has not run out and that have not stopped."""
        row = self.db.run(
            lambda db: db.execute(
                "SELECT count(*) FROM lexer_workers WHERE alive_until >= now() "
                "AND stopped_at IS NULL"
            ).fetchone()
        )
        return int(row[0]) if row else 0
