"""Where a backfill stands, read from its checkpoint and its files without a request:
per token, how many units are final, provisional, failed and pending; with a PostgreSQL
checkpoint also leased (claimed by a live worker), and how many workers are alive."""

from __future__ import annotations

from contextlib import closing
from datetime import datetime

import attrs

from ..checkpoint import DONE, FAILED, Checkpoint, UnitRecord
from ..checkpoint_pg import PostgresCheckpoint
from ..sinks import ReportSink, make_sink
from .plan import Plan, Unit, plan
from .runner import CHECKPOINT_NAME, is_final, open_checkpoint, unit_present
from .spec import BackfillSpec

__all__ = ["TokenStatus", "RunStatus", "backfill_status", "run_status"]


@attrs.frozen
class TokenStatus:
    """One token's units by state. ``provisional`` units are refetched by every run;
    ``next_final`` is the earliest time after which a run makes one of them final."""

    label: str
    final: int = 0
    provisional: int = 0
    failed: int = 0
    pending: int = 0
    next_final: datetime | None = None
    leased: int | None = None
    """Units claimed by a live worker (a PostgreSQL checkpoint only; else None)."""


@attrs.frozen
class RunStatus:
    """Every token's `TokenStatus`; with a PostgreSQL checkpoint, the workers alive and
    the run the database is on (None before the first worker planned one)."""

    tokens: list[TokenStatus]
    workers_alive: int | None = None
    run_id: int | None = None


def _state(the_plan: Plan, sink: ReportSink | None, unit: Unit, record: UnitRecord | None) -> str:
    """A unit's state; with a ``sink``, a done unit whose data it lacks is pending."""
    if record is None or record.state not in (DONE, FAILED):
        return "pending"  # never fetched, or stopped while its export job ran
    if record.state == FAILED:
        return "failed"
    if sink is not None and not unit_present(the_plan.spec, sink, unit, record):
        return "pending"  # the next run fetches it again
    return "final" if is_final(the_plan, unit, record) else "provisional"


def backfill_status(spec: BackfillSpec, *, now: datetime | None = None) -> list[TokenStatus]:
    """Each token's `TokenStatus` at ``now``, from the checkpoint in the spec's output
    folder (none yet: every unit pending). Sends no request and creates no file."""
    return run_status(spec, now=now).tokens


def run_status(spec: BackfillSpec, *, now: datetime | None = None) -> RunStatus:
    """Where the spec's backfill stands at ``now``: from the SQLite checkpoint and the
    files, or read-only from the PostgreSQL one (which it trusts: the output folder need
    not be mounted where the status is asked). Sends no request; writes nothing."""
    if spec.checkpoint_url is not None:
        return _database_status(spec, now)
    the_plan = plan(spec, now=now)
    path = spec.output / CHECKPOINT_NAME
    records: dict[str, UnitRecord] = {}
    if path.exists():
        with Checkpoint(path) as checkpoint:
            records = checkpoint.records()
    sink = make_sink(spec.format, spec.output)  # not opened: it only looks for files
    result = []
    for source in spec.tokens:
        counts = {"final": 0, "provisional": 0, "failed": 0, "pending": 0}
        settles: list[datetime] = []
        for unit in the_plan.units_of(source.label):
            state = _state(the_plan, sink, unit, records.get(unit.id))
            counts[state] += 1
            if state == "provisional":
                settles.append(the_plan.settles_at(unit))
        result.append(TokenStatus(source.label, **counts, next_final=min(settles, default=None)))
    return RunStatus(result)


def _database_status(spec: BackfillSpec, now: datetime | None) -> RunStatus:
    from .workqueue import WorkQueue

    with closing(open_checkpoint(spec, read_only=True)) as checkpoint:
        assert isinstance(checkpoint, PostgresCheckpoint)
        records = checkpoint.records()
        queue = WorkQueue(checkpoint, "status")
        run = queue.latest_run()
        leased = queue.leased_units(run) if run is not None else set()
        alive = queue.workers_alive() if checkpoint.exists else 0
    # The run's plan (its "now"), so relative ranges match what the workers do.
    the_plan = plan(spec, now=run.plan_now if run is not None and now is None else now)
    result = []
    for source in spec.tokens:
        counts = {"final": 0, "provisional": 0, "failed": 0, "pending": 0, "leased": 0}
        settles: list[datetime] = []
        for unit in the_plan.units_of(source.label):
            state = _state(the_plan, None, unit, records.get(unit.id))
            if state == "pending" and unit.id in leased:
                state = "leased"
            counts[state] += 1
            if state == "provisional":
                settles.append(the_plan.settles_at(unit))
        result.append(TokenStatus(source.label, **counts, next_final=min(settles, default=None)))
    return RunStatus(result, alive, run.run_id if run is not None else None)
