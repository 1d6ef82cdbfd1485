"""A backfill worker: one of any number of identical processes, on any hosts, sharing a
run through the PostgreSQL checkpoint (its work queue, `workqueue`) and each token's rate
limit through Redis.

The worker joins the database's unfinished run, or plans one (exactly one worker does),
then claims batches of units, a token at a time, and runs them as a single-process
backfill runs a token (`runner.TokenRun`), recording each unit in the checkpoint and
finishing it in the queue. A heartbeat renews its leases every third of the lease. When
no unit is left to claim and none is leased to a live worker, it stops. A worker that
dies leaves its leases to run out; another then claims its units, and an export job it
had started is polled (its report token is in the checkpoint), not started again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack, nullcontext
from datetime import datetime, timezone

import aiohttp
import anyio
from anyio.abc import TaskGroup

from .. import exceptions as exc
from ..checkpoint import DONE, FAILED, CheckpointError
from ..checkpoint_pg import PostgresCheckpoint
from ..client import api_session, files_session
from ..instrumentation import Instrumentation, InstrumentationOption
from ..instrumentation import resolve as resolve_instrumentation
from ..logs import fields as log_fields
from ..network import network
from ..sinks import ReportSink, make_sink
from .admission import RankedCapacity
from .events import BackfillEvent, BackfillSummary, UnitFinished
from .plan import Plan, Unit, plan
from .runner import TokenRun, gc_tuned, open_checkpoint, select_units
from .spec import BackfillSpec
from .workqueue import Claim, Run, WorkQueue
from .writer import ReportWriter, report_kinds

log = logging.getLogger("lexer_activity_async")

__all__ = ["run_worker", "worker_name", "check_worker_spec", "LeaseGuard", "DEFAULT_LEASE"]

DEFAULT_LEASE = 60.0
"""Seconds a claim lasts without renewal: how long a dead worker's units wait."""


def worker_name() -> str:
    """A worker id unique across hosts: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def check_worker_spec(spec: BackfillSpec) -> None:
    """`ConfigurationError` unless ``spec`` can run as a worker: a PostgreSQL
    checkpoint to share the run, and Redis to share the rate limits."""
    if spec.checkpoint_url is None:
        raise exc.ConfigurationError(
            '--worker needs a shared checkpoint: set checkpoint_url = "postgresql://..." '
            "in the spec or give --checkpoint-url"
        )
    if spec.redis_url is None:
        raise exc.ConfigurationError(
            "--worker needs redis_url (or --redis-url): several workers may serve one token "
            "(a token split when workers outnumber tokens, or reclaimed from a stalled "
            "worker), and only Redis shares its rate limit across processes and hosts"
        )


class LeaseGuard:
    """The checkpoint as a worker's token runs see it: a failure is recorded only while
    the unit is still leased to this worker. A worker that stalled past its lease may
    find the unit taken over and done by another; its own failure (say, its part file
    renamed by the other) must not overwrite that."""

    def __init__(self, checkpoint: PostgresCheckpoint, queue: WorkQueue, run: Run) -> None:
        self._checkpoint = checkpoint
        self._queue = queue
        self._run = run
        self.record_intent = checkpoint.record_intent
        self.record_job = checkpoint.record_job
        self.mark_done = checkpoint.mark_done
        self.mark_done_many = checkpoint.mark_done_many
        self.get = checkpoint.get
        self.records = checkpoint.records
        self.close = checkpoint.close

    def mark_failed(self, unit_id: str, error: str, report_token: str | None = None) -> None:
        if not self._queue.holds(self._run, unit_id):
            log.warning(
                "backfill unit %s: another worker took it over (this worker's lease ran "
                "out); this worker's failure is not recorded: %s",
                unit_id,
                error,
                extra=log_fields(),
            )
            return
        self._checkpoint.mark_failed(unit_id, error, report_token)


class _Worker:
    """One worker's run: slots claiming and running batches, a heartbeat, a tally."""

    def __init__(
        self,
        spec: BackfillSpec,
        the_plan: Plan,
        run: Run,
        queue: WorkQueue,
        checkpoint: PostgresCheckpoint,
        batch: int,
        on_event: Callable[[BackfillEvent], None] | None,
        now: Callable[[], datetime] | None,
        sink: ReportSink,
        instrumentation: Instrumentation | None,
    ) -> None:
        self.spec = spec
        self.sink = sink
        self.instrumentation = instrumentation
        self.plan = the_plan
        self.run = run
        self.queue = queue
        self.checkpoint = checkpoint
        self.batch = batch
        self.on_event = on_event
        self.now = now
        self.units = {unit.id: unit for unit in the_plan.units}
        self.sources = {source.label: source for source in spec.tokens}
        self.guarded = LeaseGuard(checkpoint, queue, run)
        self.writer = ReportWriter(self.guarded, sink, now)
        self.overall = RankedCapacity(spec.total_concurrency)
        labels = [source.label for source in spec.tokens]
        self.done = dict.fromkeys(labels, 0)
        self.provisional = dict.fromkeys(labels, 0)
        self.failed: dict[str, list[tuple[str, str]]] = {label: [] for label in labels}
        self.totals = {"bytes": 0, "files": 0, "requests": 0, "rate_limited": 0, "retries": 0}
        self.idle = min(0.5, queue.lease / 4)
        self.session: aiohttp.ClientSession | None = None
        self.file_session: aiohttp.ClientSession | None = None
        self.held: set[str] = set()
        self.helping = 0
        self.changed = anyio.Event()

    def emit(self, event: BackfillEvent) -> None:
        if isinstance(event, UnitFinished) and event.state in (DONE, FAILED):
            self.queue.finish(self.run, [event.unit.id])
            if event.state == DONE:
                self.done[event.unit.label] += 1
                self.provisional[event.unit.label] += self.plan.is_provisional(event.unit)
                self.totals["bytes"] += event.size
                self.totals["files"] += 1
            else:
                self.failed[event.unit.label].append((event.unit.id, event.error or ""))
        if self.on_event is not None:
            self.on_event(event)

    async def heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.queue.lease / 3)
            await anyio.to_thread.run_sync(self.queue.renew)

    async def _share(self) -> tuple[int, bool]:
        """How many tokens this worker should hold (its fair share of the tokens with
        work among the live workers), and whether tokens must be shared (fewer tokens
        with work than workers: only then does a worker help with another's token)."""
        tokens, alive = await anyio.to_thread.run_sync(self.queue.load, self.run)
        alive = max(1, alive)
        return max(1, -(-tokens // alive)), tokens < alive

    async def claimer(self, group: TaskGroup) -> None:
        """Claim tokens up to this worker's fair share, each run by its own task, until
        the run has nothing left for anyone."""
        while True:
            share, must_share = await self._share()
            claim = None
            if len(self.held) + self.helping < share:
                claim = await anyio.to_thread.run_sync(self._claim, None, must_share)
            if claim is not None:
                if claim.whole:
                    self.held.add(claim.label)
                else:
                    self.helping += 1
                group.start_soon(self.token, claim)
                continue
            idle = not self.held and not self.helping
            if idle and await anyio.to_thread.run_sync(self.queue.unfinished, self.run) == 0:
                return
            # Others' leases, or this worker's own tokens: look again when one of its
            # tokens ends, or after a while (a lease may run out, a worker may leave).
            self.changed = anyio.Event()
            with anyio.move_on_after(self.idle):
                await self.changed.wait()

    async def token(self, claim: Claim) -> None:
        """Run ``claim``, then more of its token while this worker's share allows."""
        try:
            current: Claim | None = claim
            while current is not None:
                await self.run_claim(current)
                if not claim.whole:
                    return  # helping: one batch, then the claimer looks again
                share, _ = await self._share()
                if len(self.held) > share:
                    return  # others joined: leave the rest of this token to them
                current = await anyio.to_thread.run_sync(self._claim, claim.label, False)
        finally:
            if not claim.whole:
                self.helping -= 1
            else:
                self.held.discard(claim.label)
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.queue.release_token, self.run, claim.label)
            self.changed.set()

    def _claim(self, label: str | None, share: bool) -> Claim | None:
        return self.queue.claim(self.run, self.batch, label=label, share=share)

    async def run_claim(self, claim: Claim) -> None:
        units: list[Unit] = [self.units[unit_id] for unit_id in claim.unit_ids]
        label = claim.label
        token_run = TokenRun(
            self.spec,
            self.sources[label],
            units,
            self.guarded,
            self.writer,
            self.overall,
            self.emit,
            None,
            self.plan,
            self.now,
            instrumentation=self.instrumentation,
            join=self.spec.format != "raw",
        )
        async with AsyncExitStack() as clients:
            assert self.session is not None
            assert self.file_session is not None
            if await token_run.open(clients, self.session, self.file_session):
                async with anyio.create_task_group() as group:
                    token_run.start(group)
            token_run.record_stats()
        requests, limited, retries = token_run.stats
        self.totals["requests"] += requests
        self.totals["rate_limited"] += limited
        self.totals["retries"] += retries
        if token_run.fatal is not None:
            raise token_run.fatal

    async def main(self) -> None:
        net = network(proxy=self.spec.proxy, ca_bundle=self.spec.ca_bundle)
        async with (
            api_session(connections=self.spec.total_concurrency, network=net) as session,
            files_session(net) as file_session,
        ):
            self.session, self.file_session = session, file_session
            async with anyio.create_task_group() as beat:
                beat.start_soon(self.heartbeat)
                async with anyio.create_task_group() as group:
                    group.start_soon(self.claimer, group)
                beat.cancel_scope.cancel()

    def summary(self) -> BackfillSummary:
        return BackfillSummary(
            done=self.done,
            failed=self.failed,
            skipped=dict.fromkeys(self.done, 0),
            provisional=self.provisional,
            bytes=self.totals["bytes"],
            files=self.totals["files"],
            requests=self.totals["requests"],
            rate_limited=self.totals["rate_limited"],
            retries=self.totals["retries"],
        )


def _join_or_plan(
    spec: BackfillSpec,
    queue: WorkQueue,
    checkpoint: PostgresCheckpoint,
    *,
    new_run: bool,
    retry_failed: bool,
    refresh: tuple[datetime, datetime] | None,
    now: Callable[[], datetime] | None,
    sink: ReportSink,
) -> Run:
    """The run to work on: the latest unfinished one, else a new plan (the first ever,
    or with ``new_run`` after the last finished)."""
    latest = queue.latest_run()
    if latest is not None and (not new_run or queue.unfinished(latest) > 0):
        return latest
    moment = now() if now is not None else datetime.now(timezone.utc)
    the_plan = plan(spec, now=moment)
    selection = select_units(
        the_plan, sink, checkpoint.records(), retry_failed=retry_failed, refresh=refresh
    )
    todo = [unit for source in spec.tokens for unit in selection.todo[source.label]]
    return queue.plan_run(latest, moment, todo)


async def run_worker(
    spec: BackfillSpec,
    *,
    lease: float = DEFAULT_LEASE,
    batch: int | None = None,
    new_run: bool = False,
    retry_failed: bool = False,
    refresh: tuple[datetime, datetime] | None = None,
    on_event: Callable[[BackfillEvent], None] | None = None,
    worker_id: str | None = None,
    tune_gc: bool = True,
    now: Callable[[], datetime] | None = None,
    instrumentation: InstrumentationOption = "auto",
) -> BackfillSummary:
    """Work on the spec's run in its PostgreSQL checkpoint until nothing is left; what
    this worker did. Any number of workers may run at once, on any hosts.

    The first worker (or, with ``new_run``, the first after the last run finished)
    plans the run as `run_backfill` would choose its units (``retry_failed``,
    ``refresh``); the others join it. ``lease``: seconds a claim lasts unrenewed;
    ``batch``: units per claim (default four times the per-token concurrency).
    `ConfigurationError` without ``checkpoint_url`` and ``redis_url``."""
    check_worker_spec(spec)
    if not 0 < lease < 86_400:
        raise exc.ConfigurationError("the lease must be more than 0 and less than a day")
    assert spec.redis_url is not None
    from ..limits_redis import check_redis

    await check_redis(spec.redis_url)  # fail early, clearly, before any claim
    hooks = resolve_instrumentation(instrumentation)
    name = worker_id or worker_name()
    sink = make_sink(spec.format, spec.output)
    # Checked before any claim: the extra, schema versions, a database held elsewhere.
    sink.open(report_kinds(spec))
    checkpoint = open_checkpoint(spec, application_name=name)
    assert isinstance(checkpoint, PostgresCheckpoint)
    with contextlib.closing(sink), checkpoint, gc_tuned() if tune_gc else nullcontext():
        queue = WorkQueue(checkpoint, name, lease)
        # Registered before planning: workers started together then count each other
        # from their first claim, and share the tokens from the start.
        queue.register(socket.gethostname(), os.getpid())
        try:
            run = _join_or_plan(
                spec,
                queue,
                checkpoint,
                new_run=new_run,
                retry_failed=retry_failed,
                refresh=refresh,
                now=now,
                sink=sink,
            )
            worker = _Worker(
                spec,
                plan(spec, now=run.plan_now),
                run,
                queue,
                checkpoint,
                batch or 4 * spec.per_token_concurrency,
                on_event,
                now,
                sink,
                hooks,
            )
            await worker.main()
        finally:
            try:
                queue.stop()
            except CheckpointError as error:  # the database went away: leases run out
                log.warning(
                    "backfill worker %s: could not release its claims: %s",
                    name,
                    error,
                    extra=log_fields(),
                )
    return worker.summary()
