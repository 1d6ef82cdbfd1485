"""Bulk backfills: a spec (TOML or Python), a planner, and a checkpointed runner.

A backfill pulls reports and exports for many tokens over a long span. The planner cuts
the span into windows (default one calendar month) and makes one *unit* per token x
window x report or export. The runner runs every token in parallel under its own limiter,
writes each unit atomically to ``<output>/<label>/...`` and records it in a checkpoint,
so a rerun after a crash skips finished units and polls in-flight export jobs again.
A unit whose file cannot be written fails alone (`OutputError`); a checkpoint that
cannot be used stops the run (`CheckpointError`). The spec itself is in `spec`.

Output layout (keyed by label, never the token)::

    <output>/<label>/reports/<type>/<from>_<to>.json
    <output>/<label>/exports/<kind>/<from>_<to>.csv
    <output>/.lexer-checkpoint.sqlite
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager, nullcontext, suppress
from datetime import datetime
from pathlib import Path

import aiohttp
import anyio
import attrs
from anyio.abc import TaskGroup

from . import durable, exports
from . import exceptions as exc
from .checkpoint import DONE, FAILED, PENDING, STARTING, Checkpoint, CheckpointError
from .client import LexerClient, api_session
from .events import Event
from .limits import LimiterRegistry, LimiterStats
from .models import ExportJob, converter
from .reports import split_range, window_stamp
from .spec import ALL_REPORTS, BackfillSpec, ExportSpec, SpecError, TokenSource

log = logging.getLogger("lexer_activity_async")

__all__ = [
    "SpecError",
    "TokenSource",
    "ExportSpec",
    "BackfillSpec",
    "Unit",
    "Plan",
    "plan",
    "UnitStarted",
    "UnitFinished",
    "BackfillEvent",
    "BackfillSummary",
    "run_backfill",
    "gc_tuned",
    "CHECKPOINT_NAME",
    "ALL_REPORTS",
    "CheckpointError",
]

CHECKPOINT_NAME = ".lexer-checkpoint.sqlite"
EXPORT_POLLS_ESTIMATE = 2
"""Status polls assumed per export job when estimating requests for ``--dry-run``."""


@attrs.frozen
class Unit:
    """One token x window x report-or-export."""

    label: str
    name: str
    is_export: bool
    date_from: datetime
    date_to: datetime

    @functools.cached_property
    def stamp(self) -> str:
        return window_stamp(self.date_from, self.date_to)

    @functools.cached_property
    def id(self) -> str:
        return f"{self.label}/{'exports' if self.is_export else 'reports'}/{self.name}/{self.stamp}"

    def path(self, output: Path) -> Path:
        suffix = ".csv" if self.is_export else ".json"
        return output / (self.id + suffix)


@attrs.frozen
class Plan:
    """The units of a spec, and what they cost in requests and rate-limit time."""

    spec: BackfillSpec
    units: tuple[Unit, ...]
    windows: tuple[tuple[datetime, datetime], ...]

    @functools.cached_property
    def _by_label(self) -> dict[str, list[Unit]]:
        # Built once: scanning every unit per token is quadratic (200 tokens: ~2 s).
        groups: dict[str, list[Unit]] = {}
        for unit in self.units:
            groups.setdefault(unit.label, []).append(unit)
        return groups

    def units_of(self, label: str) -> list[Unit]:
        return list(self._by_label.get(label, ()))

    def requests_of(self, label: str) -> int:
        """Estimated requests: one per report, 1 + `EXPORT_POLLS_ESTIMATE` per export."""
        return sum(1 + EXPORT_POLLS_ESTIMATE if u.is_export else 1 for u in self.units_of(label))

    def least_seconds(self, label: str) -> float:
        """The least time the rate limit allows for the token's requests: N go at once,
        then each further N wait a window (ignoring latency)."""
        return rate_limit_floor(self.requests_of(label), self.spec.max_requests, self.spec.window)


def rate_limit_floor(requests: int, max_requests: int, window: float) -> float:
    """Least seconds for ``requests`` under N per W: ``(ceil(R/N) - 1) * W``."""
    return max(0, math.ceil(requests / max_requests) - 1) * window


def plan(spec: BackfillSpec) -> Plan:
    windows = tuple(split_range(spec.date_from, spec.date_to, months=spec.window_months))
    units = []
    for source in spec.tokens:
        for lo, hi in windows:
            for name in spec.reports:
                units.append(Unit(source.label, name, False, lo, hi))
            for item in spec.exports:
                units.append(Unit(source.label, item.kind.value, True, lo, hi))
    return Plan(spec, tuple(units), windows)


@attrs.frozen
class UnitStarted:
    unit: Unit


@attrs.frozen
class UnitFinished:
    """A unit ended: ``state`` is done, failed or skipped; ``size`` in bytes."""

    unit: Unit
    state: str
    size: int = 0
    error: str | None = None


BackfillEvent = UnitStarted | UnitFinished | Event


@attrs.frozen
class BackfillSummary:
    """Per label: units done, failed, skipped (already done); and totals."""

    done: dict[str, int]
    failed: dict[str, list[tuple[str, str]]]
    skipped: dict[str, int]
    bytes: int
    requests: int
    rate_limited: int
    retries: int
    files: int

    @property
    def ok(self) -> bool:
        return not any(self.failed.values())


@attrs.define
class _Pending:
    unit_id: str
    part: Path
    path: Path
    size: int
    committed: bool = False
    error: Exception | None = None


def _output_error(path: Path, error: OSError | ValueError) -> exc.OutputError:
    """An OS refusal to write ``path`` (full disk, read-only folder, bad name) as the
    unit's `OutputError`."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return exc.OutputError(path, reason)


def _remove(part: Path) -> None:
    """Remove a part file, if any; a folder that refuses even that keeps it."""
    with suppress(OSError, ValueError):
        part.unlink(missing_ok=True)


class _ReportWriter:
    """Writes report files with group commit.

    Each unit's JSON goes to ``<file>.part`` on the event loop (a page-cache write).
    Then one worker-thread call per batch fsyncs the parts, renames them into place,
    fsyncs their folders and marks the units done in one checkpoint transaction. A thread
    hop per unit cost about 1 ms of CPU, more than the request itself. A unit is done only
    once its file is durable. A file that cannot be written fails its unit alone (an
    `OutputError`, its part file removed); a checkpoint that cannot be written fails the
    whole batch with `CheckpointError`. Only a crash can leave a ``.part`` file, which the
    rerun of that unit overwrites.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self._checkpoint = checkpoint
        self._pending: list[_Pending] = []
        self._lock = anyio.Lock()
        self._folders: set[Path] = set()

    def stage(self, unit_id: str, path: Path, payload: object) -> _Pending:
        """Write ``payload`` as JSON to ``<file>.part``; `commit` then makes it final.
        Nothing of the payload is kept: units waiting for their batch hold no data."""
        # Compact: json's C encoder is skipped whenever indent is set (4-5x slower here).
        data = (json.dumps(payload, separators=(",", ":")) + "\n").encode("utf-8")
        part = path.with_name(path.name + ".part")
        try:
            if path.parent not in self._folders:  # one mkdir per folder, not per unit
                path.parent.mkdir(parents=True, exist_ok=True)
                self._folders.add(path.parent)
            with open(part, "wb") as handle:
                handle.write(data)
        except (OSError, ValueError) as error:
            _remove(part)
            raise _output_error(path, error) from None
        return _Pending(unit_id, part, path, len(data))

    async def commit(self, entry: _Pending) -> int:
        """Wait until the batch holding ``entry`` is durable and checkpointed; its size.
        Cancelled before that, the entry leaves its batch and its part file is removed."""
        self._pending.append(entry)
        try:
            async with self._lock:  # batches run one at a time; later arrivals form the next
                if not entry.committed and entry.error is None:
                    batch, self._pending = self._pending, []
                    try:
                        await anyio.to_thread.run_sync(self._commit, batch)
                    except Exception as error:  # the checkpoint could not be written
                        for other in batch:
                            if not other.committed and other.error is None:
                                other.error = error
                                _remove(other.part)
        except BaseException:
            if not entry.committed:
                if entry in self._pending:
                    self._pending.remove(entry)
                _remove(entry.part)
            raise
        if entry.error is not None:
            raise entry.error
        return entry.size

    def _commit(self, batch: list[_Pending]) -> None:
        folders: dict[Path, list[_Pending]] = {}
        for entry in batch:
            try:
                durable.commit_part(entry.part, entry.path)
                folders.setdefault(entry.path.parent, []).append(entry)
            except OSError as error:
                entry.error = _output_error(entry.path, error)
                _remove(entry.part)
        for folder, entries in folders.items():
            try:
                durable.sync_folder(folder)
            except OSError as error:  # the renames may not be durable: not done
                for entry in entries:
                    entry.error = _output_error(entry.path, error)
        self._checkpoint.mark_done_many([(e.unit_id, e.size) for e in batch if e.error is None])
        for entry in batch:
            entry.committed = True


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class _InFlight:
    """The backfill's overall cap as one token's client enters it around each request;
    getting in also tells the token's run that another worker could be used."""

    def __init__(self, overall: anyio.CapacityLimiter, on_enter: Callable[[], None]) -> None:
        self._overall = overall
        self._on_enter = on_enter

    async def __aenter__(self) -> None:
        await self._overall.acquire()
        self._on_enter()

    async def __aexit__(self, *exc_info: object) -> None:
        self._overall.release()


class _TokenRun:
    """Runs one token's units, concurrently up to the caps, recording each."""

    def __init__(
        self,
        spec: BackfillSpec,
        source: TokenSource,
        units: Sequence[Unit],
        checkpoint: Checkpoint,
        writer: _ReportWriter,
        overall: anyio.CapacityLimiter,
        emit: Callable[[BackfillEvent], None],
        registry: LimiterRegistry | None,
    ) -> None:
        self.spec = spec
        self.source = source
        self.units = units
        self.checkpoint = checkpoint
        self.writer = writer
        self.overall = overall
        self.emit = emit
        self.registry = registry
        self.unauthorized: str | None = None
        self.stats: tuple[int, int, int] = (0, 0, 0)
        self.client: LexerClient | None = None
        self._before = LimiterStats()
        self._todo: deque[Unit] = deque()
        self._workers = 0
        self._group: TaskGroup | None = None
        self.fatal: CheckpointError | None = None

    def _export_spec(self, kind: str) -> ExportSpec:
        return next(e for e in self.spec.exports if e.kind.value == kind)

    async def open(self, stack: AsyncExitStack, session: aiohttp.ClientSession) -> bool:
        """Open the token's client on ``stack`` over the backfill's shared ``session``.
        False if the token cannot be read, which fails every unit."""
        try:
            token = self.source.read()
        except SpecError as error:
            for unit in self.units:
                self._fail(unit, str(error))
            return False
        self.client = await stack.enter_async_context(
            LexerClient(
                token,
                label=self.source.label,
                api_url=self.spec.api_url,
                status_url=self.spec.status_url,
                max_requests=self.spec.max_requests,
                window=self.spec.window,
                registry=self.registry,
                redis_url=self.spec.redis_url if self.registry is None else None,
                session=session,
                max_in_flight=_InFlight(self.overall, self._grow),
                workflow_states_type=self.spec.workflow_states_type,
                on_event=self.emit,
            )
        )
        self._before = self.client.stats
        self._todo = deque(self.units)
        return True

    def start(self, group: TaskGroup) -> None:
        """Start the token's first worker; more follow as requests go out (`_grow`)."""
        self._group = group
        self._grow()

    def _grow(self) -> None:
        """Add a worker, up to the per-token cap, while units wait. Called whenever one
        of the token's requests gets past the overall cap onto the wire. Workers so
        grow with requests actually sent, not all at once: thousands of tasks started
        up front would run before any response is read."""
        room = self._workers < self.spec.per_token_concurrency
        if self._group is not None and self._todo and room:
            self._workers += 1
            self._group.start_soon(self.worker)

    def record_stats(self) -> None:
        """Keep the client's request, 429 and retry counts of this run (before closing)."""
        if self.client is not None:
            after = self.client.stats
            self.stats = (
                after.requests - self._before.requests,
                after.rate_limited - self._before.rate_limited,
                after.retries - self._before.retries,
            )

    def _fail(self, unit: Unit, error: str, report_token: str | None = None) -> None:
        self.checkpoint.mark_failed(unit.id, error, report_token)
        self.emit(UnitFinished(unit, FAILED, error=error))

    async def worker(self) -> None:
        """Take the token's units in order until none are left."""
        assert self.client is not None
        while self._todo:
            await self._guarded(self.client, self._todo.popleft())

    async def _guarded(self, client: LexerClient, unit: Unit) -> None:
        """Run ``unit``, recording how it ended. A checkpoint that can no longer be
        written stops the whole backfill: nothing after that could be recorded."""
        try:
            await self._recorded(client, unit)
        except CheckpointError as error:
            self.fatal = error
            self._todo.clear()
            assert self._group is not None
            self._group.cancel_scope.cancel()

    async def _recorded(self, client: LexerClient, unit: Unit) -> None:
        if self.unauthorized is not None:
            self._fail(unit, f"not attempted: {self.unauthorized}")
            return
        self.emit(UnitStarted(unit))
        try:
            size = await self._run_unit(client, unit)
        except CheckpointError:
            raise
        except exc.UnauthorizedError as error:
            self.unauthorized = f"token {self.source.label!r} unauthorized ({error.message})"
            failure, keep_job = _describe(error), False
        except exc.LexerError as error:
            failure, keep_job = _describe(error), True
        else:  # _run_unit recorded it as done
            self.emit(UnitFinished(unit, DONE, size=size))
            return
        # Recorded outside the handler: a checkpoint error then carries no other error.
        record = self.checkpoint.get(unit.id) if keep_job else None
        self._fail(unit, failure, record.report_token if record else None)

    async def _run_unit(self, client: LexerClient, unit: Unit) -> int:
        path = unit.path(self.spec.output)
        if not unit.is_export:
            nps = unit.name in ("nps_summary", "nps_volume")
            # No local holds the result: it is freed before the wait for the commit.
            entry = self.writer.stage(
                unit.id,
                path,
                converter.unstructure(
                    await client.report(
                        unit.name,
                        unit.date_from,
                        unit.date_to,
                        form=self.spec.nps_form if nps else None,
                        nps_category=self.spec.nps_category if nps else None,
                    )
                ),
            )
            return await self.writer.commit(entry)
        spec = self._export_spec(unit.name)
        record = self.checkpoint.get(unit.id)
        done: ExportJob | None = None
        if record is not None and record.report_token and record.state in (PENDING, FAILED):
            # Poll the job started before (a crash, or a failure after it started) ...
            job = ExportJob(status="pending", url=None, token=record.report_token)
            try:
                done = await exports.wait_for_export(
                    client, job, kind=unit.name, poll=self.spec.poll
                )
            except (exc.ExportFailedError, exc.NotFoundError):
                done = None  # ... unless it failed or the server forgot it: start afresh.
        if done is None:
            if record is not None and record.state == STARTING:
                log.warning(
                    "backfill unit %s: the last run stopped while starting its export job; "
                    "that job may exist unrecorded, and another is started now",
                    unit.id,
                )
            # The intent before the request and the token right after it: a stop in
            # between can leave a job started that no rerun knows of (see the README).
            self.checkpoint.record_intent(unit.id)
            job = await exports.start_export(
                client,
                spec.kind,
                unit.date_from,
                unit.date_to,
                form=spec.form,
                nps_category=spec.nps_category,
            )
            self.checkpoint.record_job(unit.id, job.token)
            done = await exports.wait_for_export(client, job, kind=unit.name, poll=self.spec.poll)
        try:
            size = await exports.download(client, done, path, kind=unit.name, poll=self.spec.poll)
        except OSError as error:  # the download removed its part file
            raise _output_error(path, error) from None
        self.checkpoint.mark_done(unit.id, size)
        return size


GC_THRESHOLDS = (20_000, 50, 10)
_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None


@contextmanager
def gc_tuned() -> Iterator[None]:
    """Raise the cyclic GC's thresholds to at least `GC_THRESHOLDS` while inside, then
    restore them (when the last of several overlapping runs leaves).

    With the defaults (700, 10, 10) each decoded report's thousands of small objects
    outlive a young collection, get promoted, and trigger full collections of a heap
    that thousands of waiting tasks make large: at 200 tokens, 26 % of the client's CPU
    went to the collector, with pauses of up to 1.6 s. With these thresholds, about 6 %.
    Garbage without cycles is still freed at once; only cycles wait longer.
    """
    global _gc_users, _gc_saved
    if _gc_users == 0:
        _gc_saved = gc.get_threshold()
        gc.set_threshold(*(max(a, b) for a, b in zip(_gc_saved, GC_THRESHOLDS, strict=True)))
    _gc_users += 1
    try:
        yield
    finally:
        _gc_users -= 1
        if _gc_users == 0 and _gc_saved is not None:
            gc.set_threshold(*_gc_saved)


async def run_backfill(
    spec: BackfillSpec,
    *,
    retry_failed: bool = False,
    on_event: Callable[[BackfillEvent], None] | None = None,
    registry: LimiterRegistry | None = None,
    tune_gc: bool = True,
) -> BackfillSummary:
    """Run (or resume) a backfill. Units already done are skipped; failed units are
    skipped too (and reported as failed again) unless ``retry_failed``, which reruns them
    along with any unit a crash left unfinished. ``tune_gc`` raises the cyclic garbage
    collector's thresholds for the run (see `gc_tuned`); pass False to leave them."""
    the_plan = plan(spec)
    if spec.redis_url is not None and registry is None:
        from .limits_redis import check_redis

        await check_redis(spec.redis_url)  # fail the whole run early, clearly
    done: dict[str, int] = {s.label: 0 for s in spec.tokens}
    skipped: dict[str, int] = {s.label: 0 for s in spec.tokens}
    failed: dict[str, list[tuple[str, str]]] = {s.label: [] for s in spec.tokens}
    totals = {"bytes": 0, "files": 0}

    def emit(event: BackfillEvent) -> None:
        if isinstance(event, UnitFinished):
            if event.state == DONE:
                done[event.unit.label] += 1
                totals["bytes"] += event.size
                totals["files"] += 1
            elif event.state == FAILED:
                failed[event.unit.label].append((event.unit.id, event.error or ""))
        if on_event is not None:
            on_event(event)

    with (
        gc_tuned() if tune_gc else nullcontext(),
        Checkpoint(spec.output / CHECKPOINT_NAME) as checkpoint,
    ):
        records = checkpoint.records()
        overall = anyio.CapacityLimiter(spec.total_concurrency)
        writer = _ReportWriter(checkpoint)
        runs = []
        for source in spec.tokens:
            todo = []
            for unit in the_plan.units_of(source.label):
                record = records.get(unit.id)
                state = record.state if record is not None else None
                if state == FAILED and not retry_failed:
                    failed[source.label].append((unit.id, record.error or "" if record else ""))
                # A rerun does every unit not done, except that failed ones need
                # --retry-failed; units a crash left unfinished always run.
                if state == DONE or (state == FAILED and not retry_failed):
                    skipped[source.label] += 1
                    emit(UnitFinished(unit, "skipped"))
                else:
                    todo.append(unit)
            runs.append(_TokenRun(spec, source, todo, checkpoint, writer, overall, emit, registry))
        # One session for all tokens: connections are shared, not one pool per token.
        async with (
            api_session(connections=spec.total_concurrency) as session,
            AsyncExitStack() as clients,
        ):
            opened = [run for run in runs if await run.open(clients, session)]
            # One worker per token to begin with, each token growing its own as its
            # requests go out. The overall cap admits waiters in order, so requests
            # leave round-robin across tokens, and each later window keeps that order
            # (slots free in completion order): every token's first requests of a
            # window, the ones its last window waits on, go out early even when the
            # client's CPU is the bottleneck.
            async with anyio.create_task_group() as group:
                for run in opened:
                    run.start(group)
            for run in runs:
                run.record_stats()
        fatal = next((run.fatal for run in runs if run.fatal is not None), None)
        if fatal is not None:
            raise fatal
    return BackfillSummary(
        done=done,
        failed=failed,
        skipped=skipped,
        bytes=totals["bytes"],
        files=totals["files"],
        requests=sum(r.stats[0] for r in runs),
        rate_limited=sum(r.stats[1] for r in runs),
        retries=sum(r.stats[2] for r in runs),
    )
