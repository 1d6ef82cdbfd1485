"""The runner: per-token workers under one overall cap, orchestration of a whole run
(skip what is done, resume export jobs, record every unit), and GC tuning for it."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, closing, contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import cast

import aiohttp
import anyio
import attrs
from anyio.abc import TaskGroup

from .. import exceptions as exc
from .. import exports
from ..checkpoint import (
    DONE,
    FAILED,
    PENDING,
    STARTING,
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    UnitRecord,
)
from ..client import LexerClient, api_session, files_session
from ..events import RateLimitWait, RequestSent
from ..instrumentation import Instrumentation, InstrumentationOption
from ..instrumentation import resolve as resolve_instrumentation
from ..kinds import ReportResult
from ..limits import LimiterRegistry, LimiterStats
from ..logs import fields as log_fields
from ..models import ExportJob
from ..network import network
from ..sinks import ReportSink, make_sink
from .admission import RankedCapacity, large, rank
from .events import BackfillEvent, BackfillSummary, UnitFinished, UnitStarted
from .plan import (
    Fetches,
    FetchGroup,
    Plan,
    Unit,
    fetch_groups,
    plan,
    requests_of,
    window_order,
)
from .slicing import Slicer, slice_series
from .spec import BackfillSpec, ExportSpec, SpecError, TokenSource, run_identity
from .writer import (
    PendingUnit,
    ReportWriter,
    output_error,
    report_kind,
    report_kinds,
    report_slot,
)

log = logging.getLogger("lexer_activity_async")

__all__ = [
    "run_backfill",
    "gc_tuned",
    "GC_THRESHOLDS",
    "CHECKPOINT_NAME",
    "is_final",
    "file_matches",
    "unit_present",
    "open_checkpoint",
    "select_units",
    "Selection",
    "TokenRun",
]

CHECKPOINT_NAME = ".lexer-checkpoint.sqlite"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class _InFlight:
    """The backfill's overall cap as one token's client enters it around each request,
    at the rank (and as large or not) its worker set for the fetch, read in the
    request's own task; getting in also tells the token's run that another worker
    could be used."""

    def __init__(self, overall: RankedCapacity, on_enter: Callable[[], None]) -> None:
        self._overall = overall
        self._on_enter = on_enter

    async def __aenter__(self) -> None:
        await self._overall.acquire(rank.get(), large=large.get())
        self._on_enter()

    async def __aexit__(self, *exc_info: object) -> None:
        self._overall.release(large=large.get())


class TokenRun:
    """Runs one token's units, concurrently up to the caps, recording each (the whole
    run's tokens in `run_backfill`, a claimed batch of one token in a worker)."""

    def __init__(
        self,
        spec: BackfillSpec,
        source: TokenSource,
        units: Iterable[Unit],
        checkpoint: CheckpointStore,
        writer: ReportWriter,
        overall: RankedCapacity,
        emit: Callable[[BackfillEvent], None],
        registry: LimiterRegistry | None,
        the_plan: Plan,
        now: Callable[[], datetime] | None = None,
        instrumentation: Instrumentation | None = None,
        join: bool = True,
    ) -> None:
        self.join = join
        self.spec = spec
        self.instrumentation = instrumentation
        self.plan = the_plan
        self.now = now
        self.source = source
        # Compact: a token's units as objects are most of what it holds between windows.
        self._share = spec.bulk_max_requests
        fetches = window_order(fetch_groups(units, join=join), self._share)
        self._todo = Fetches(the_plan, source.label, fetches)
        self._position = 0  # requests of the fetches taken so far
        self.checkpoint = checkpoint
        self.writer = writer
        self.overall = overall
        self.emit = emit
        self.registry = registry
        self.unauthorized: str | None = None
        self.stats: tuple[int, int, int] = (0, 0, 0)
        self.client: LexerClient | None = None
        self._before = LimiterStats()
        self._workers = 0
        self._waiting_for_window = False
        self._group: TaskGroup | None = None
        self.fatal: CheckpointError | None = None

    def _export_spec(self, kind: str) -> ExportSpec:
        return next(e for e in self.spec.exports if e.kind.value == kind)

    async def open(
        self,
        stack: AsyncExitStack,
        session: aiohttp.ClientSession,
        file_session: aiohttp.ClientSession,
    ) -> bool:
        """Open the token's client on ``stack`` over the backfill's shared ``session`` and
        ``file_session``. False if the token cannot be read, which fails every unit."""
        try:
            token = self.source.read()
        except SpecError as error:
            for unit in self._todo.units():
                self._fail(unit, str(error))
            self._todo.clear()
            return False
        self.client = await stack.enter_async_context(
            LexerClient(
                token,
                label=self.source.label,
                api_url=self.spec.api_url,
                status_url=self.spec.status_url,
                max_requests=self.spec.max_requests,
                window=self.spec.window,
                priority="bulk",  # a backfill never takes the reserve kept for services
                reserve=self.spec.reserve,
                registry=self.registry,
                redis_url=self.spec.redis_url if self.registry is None else None,
                session=session,
                file_session=file_session,
                max_in_flight=_InFlight(self.overall, self._grow),
                workflow_states_type=self.spec.workflow_states_type,
                on_event=self._on_client_event,
                now=self.now,
                instrumentation=self.instrumentation,
            )
        )
        self._before = self.client.stats
        return True

    def _stalled(self) -> bool:
        """Whether more workers would only wait, each holding a task: the token waits for
        its rate window, or more units wait for the disk than requests may be on the
        wire (the disk is the bottleneck)."""
        return self._waiting_for_window or self.writer.backlog > self.spec.total_concurrency

    def _held_back(self) -> bool:
        """Whether the token has more workers than its fair share of the overall cap
        while `_stalled`. Not fewer: taking the workers of whichever token looks first
        would leave it behind the others in every later window, and the run ends with
        its last one."""
        return self._workers > self.overall.fair_share and self._stalled()

    def _on_client_event(self, event: BackfillEvent) -> None:
        """Note whether the token's requests wait for its rate window (a request began to
        wait; until one takes a slot), then pass the event on."""
        if isinstance(event, RateLimitWait):
            self._waiting_for_window = True
        elif isinstance(event, RequestSent):
            self._waiting_for_window = False
        self.emit(event)

    def start(self, group: TaskGroup) -> None:
        """Start the token's first worker; more follow as requests go out (`_grow`)."""
        self._group = group
        if self._todo:
            self.overall.members += 1  # out again when its last worker ends
            self._grow()

    def _grow(self) -> None:
        """Add a worker, up to the per-token cap, while units wait. Called whenever one
        of the token's requests gets past the overall cap onto the wire. Workers so
        grow with requests actually sent, not all at once: thousands of tasks started
        up front would run before any response is read. Nor, past the token's fair share
        of the overall cap, while requests of any token queue for it: a worker more would
        only queue too, and with thousands of tokens each would hold `per_token` waiting
        tasks (their frames, some 8 KB each) while the same requests per second go out
        through the ones it has; nor past that share while `_stalled`. Up to its share
        it may: a token left with few workers while others queue many would lag behind
        them in every window, and the run ends with its last window."""
        if self._workers >= self.spec.per_token_concurrency:
            room = False
        elif self._workers < self.overall.fair_share:
            room = True
        else:
            room = not self.overall.waiting and not self._stalled()
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
        """Take the token's fetches (units, or groups of them) in order until none are
        left. While the token waits for its rate window its fair share of workers waits
        in its limiter and the others end (`_grow` adds them back as requests go out):
        with many tokens, a token between windows holds one task, not `per_token` of
        them, each with its call's frames. So too while the disk is behind
        (`_held_back`)."""
        assert self.client is not None
        try:
            while self._todo:
                if self._held_back():
                    return
                fetch = self._todo.popleft()
                # Its place within the token's rate window ranks it for the overall cap.
                rank.set(self._position % self._share)
                large.set(isinstance(fetch, FetchGroup))
                self._position += requests_of((fetch,))
                await self._guarded(self.client, fetch)
        finally:
            self._workers -= 1
            if not self._workers:
                self.overall.members -= 1

    async def _guarded(self, client: LexerClient, item: Unit | FetchGroup) -> None:
        """Run ``item``, recording how each of its units ended. A checkpoint that can no
        longer be written stops the whole backfill: nothing after that could be recorded."""
        try:
            if isinstance(item, FetchGroup):
                await self._recorded_group(client, item)
            else:
                await self._recorded(client, item)
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

    async def _recorded_group(self, client: LexerClient, group: FetchGroup) -> None:
        """One request for the group's windows, then each window's slice written and
        recorded on its own: a failed request fails every window, a file that cannot be
        written fails its window alone."""
        if self.unauthorized is not None:
            for unit in group.units:
                self._fail(unit, f"not attempted: {self.unauthorized}")
            return
        for unit in group.units:
            self.emit(UnitStarted(unit))
        failure: str | None = None
        try:
            result, _ = await self._fetch(client, group.name, group.date_from, group.fetch_to)
        except exc.UnauthorizedError as error:
            self.unauthorized = f"token {self.source.label!r} unauthorized ({error.message})"
            failure = _describe(error)
        except exc.LexerError as error:
            failure = _describe(error)
        if failure is not None:
            for unit in group.units:
                self._fail(unit, failure)
            return
        staged = []
        window_of = Slicer(result)
        for unit in group.units:
            try:
                staged.append((unit, self._stage(unit, result, None, window_of)))
            except exc.OutputError as error:
                self._fail(unit, _describe(error))
        del result, window_of  # no window waiting for its batch holds the whole result
        # Committed together, so the windows join one batch (one thread hop, one fsync).
        outcomes = await self.writer.commit_all([entry for _, entry in staged])
        fatal: CheckpointError | None = None
        for (unit, _), outcome in zip(staged, outcomes, strict=True):
            if isinstance(outcome, CheckpointError):
                fatal = outcome
            elif isinstance(outcome, exc.LexerError):
                self._fail(unit, _describe(outcome))
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                self.emit(UnitFinished(unit, DONE, size=outcome))
        if fatal is not None:
            raise fatal

    async def _fetch(
        self, client: LexerClient, name: str, date_from: datetime, date_to: datetime
    ) -> tuple[ReportResult, bytes | None]:
        """A report's typed result, and its response body if the sink needs it."""
        nps = report_kind(self.spec, name).needs_form
        form = self.spec.nps_form if nps else None
        category = self.spec.nps_category if nps else None
        if self.writer.needs_body:
            raw = await client.report_raw(
                name, date_from, date_to, form=form, nps_category=category
            )
            return raw.result, raw.body
        result = await client.report(name, date_from, date_to, form=form, nps_category=category)
        return result, None

    def _stage(
        self,
        unit: Unit,
        result: ReportResult,
        body: bytes | None,
        window_of: Slicer | None = None,
    ) -> PendingUnit:
        """Stage ``unit``'s data: its window's slice of ``result`` (made by ``window_of``,
        the group's slicer, when given; the raw format keeps the body as it came, and its
        windows are never joined)."""
        sliced = (
            window_of(unit.date_from, unit.date_to)
            if window_of is not None
            else slice_series(result, unit.date_from, unit.date_to)
        )
        return self.writer.stage(
            unit.id,
            report_slot(self.spec, unit),
            cast(ReportResult, sliced),
            body,
            final=not self.plan.is_provisional(unit),
        )

    async def _run_unit(self, client: LexerClient, unit: Unit) -> int:
        path = unit.path(self.spec.output)
        final = not self.plan.is_provisional(unit)
        if not unit.is_export:
            # No local holds the result: it is freed before the wait for the commit.
            entry = self._stage(
                unit, *await self._fetch(client, unit.name, unit.date_from, unit.fetch_to)
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
                    extra=log_fields(unit.label, None, unit.name),
                )
            # The intent before the request and the token right after it: a stop in
            # between can leave a job started that no rerun knows of (see the README).
            self.checkpoint.record_intent(unit.id)
            job = await exports.start_export(
                client,
                spec.kind,
                unit.date_from,
                unit.fetch_to,
                form=spec.form,
                nps_category=spec.nps_category,
                restart_dropped=True,
            )
            self.checkpoint.record_job(unit.id, job.token)
            done = await exports.wait_for_export(client, job, kind=unit.name, poll=self.spec.poll)
        csv_path = unit.csv_path(self.spec.output)
        try:
            size = await exports.download(
                client,
                done,
                csv_path,
                kind=unit.name,
                policy=self.spec.download_policy,
                poll=self.spec.poll,
            )
        except OSError as error:  # the download removed its part file
            raise output_error(csv_path, error) from None
        if path != csv_path:
            size = await self._to_parquet(unit, csv_path, path)
        fetched_at = self.now().timestamp() if self.now is not None else None
        self.checkpoint.mark_done(unit.id, size, final=final, fetched_at=fetched_at)
        return size

    async def _to_parquet(self, unit: Unit, csv_path: Path, path: Path) -> int:
        """Convert the unit's CSV to its Parquet file; the CSV is removed unless the spec
        keeps it. The Parquet file's size."""
        from ..csv_parquet import convert_export  # the [tables] extra, checked by the spec
        from ..tables import export_schema_for

        converted = await convert_export(
            csv_path,
            path,
            export_schema_for(unit.name),
            label=unit.label,
            window_start=unit.date_from,
            window_end=unit.date_to,
            keep_source=self.spec.keep_csv,
        )
        return converted.bytes


def open_checkpoint(
    spec: BackfillSpec, *, read_only: bool = False, application_name: str = "lexer-activity"
) -> CheckpointStore:
    """The spec's checkpoint: PostgreSQL at its ``checkpoint_url`` (refusing a database
    that holds another spec's backfill), else the SQLite file in its output folder."""
    if spec.checkpoint_url is None:
        return Checkpoint(spec.output / CHECKPOINT_NAME)
    from ..checkpoint_pg import PostgresCheckpoint

    return PostgresCheckpoint(
        spec.checkpoint_url,
        run_identity(spec),
        read_only=read_only,
        application_name=application_name,
    )


@attrs.frozen
class Selection:
    """A run's units by what the checkpoint says of them, per label: to run, skipped
    (done, or failed before without ``retry_failed``) and, of those, failed before."""

    todo: dict[str, list[Unit]]
    skipped: dict[str, list[Unit]]
    failed_before: dict[str, list[tuple[Unit, str]]]


def select_units(
    the_plan: Plan,
    sink: ReportSink,
    records: Mapping[str, UnitRecord],
    *,
    retry_failed: bool = False,
    refresh: tuple[datetime, datetime] | None = None,
) -> Selection:
    """Which units a run does (see `run_backfill` for the rules)."""
    selection = Selection({}, {}, {})
    for source in the_plan.spec.tokens:
        label = source.label
        token = select_token_units(
            the_plan, sink, records, label, retry_failed=retry_failed, refresh=refresh
        )
        selection.todo[label], selection.skipped[label], selection.failed_before[label] = token
    return selection


def select_token_units(
    the_plan: Plan,
    sink: ReportSink,
    records: Mapping[str, UnitRecord],
    label: str,
    *,
    retry_failed: bool = False,
    refresh: tuple[datetime, datetime] | None = None,
) -> tuple[list[Unit], list[Unit], list[tuple[Unit, str]]]:
    """`select_units` for token ``label``: its units to run, skipped, failed before."""
    todo: list[Unit] = []
    skipped: list[Unit] = []
    failed: list[tuple[Unit, str]] = []
    for unit in the_plan.iter_units(label):
        record = records.get(unit.id)
        state = record.state if record is not None else None
        if state == FAILED and not retry_failed:
            failed.append((unit, record.error or "" if record else ""))
        # A rerun does every unit not done, except that failed ones need
        # --retry-failed; units a crash left unfinished always run.
        keep = state == DONE and record is not None
        if keep and record is not None:
            keep = not _needs_refetch(the_plan, sink, unit, record, refresh)
        if keep or (state == FAILED and not retry_failed):
            skipped.append(unit)
        else:
            todo.append(unit)
    return todo, skipped, failed


def is_final(the_plan: Plan, unit: Unit, record: UnitRecord) -> bool:
    """Whether a done unit's file is final. A checkpoint from before provisional windows
    does not say: then final if its window had settled when it was fetched."""
    if record.final is not None:
        return record.final
    fetched = record.fetched_at
    settled_by = (unit.date_to + the_plan.spec.settle_period).timestamp()
    return fetched is not None and fetched >= settled_by


def _needs_refetch(
    the_plan: Plan,
    sink: ReportSink,
    unit: Unit,
    record: UnitRecord,
    refresh: tuple[datetime, datetime] | None,
) -> bool:
    """Whether a done unit is fetched again (see `run_backfill`)."""
    if refresh is not None and unit.date_from < refresh[1] and refresh[0] < unit.date_to:
        return True
    if not is_final(the_plan, unit, record) or the_plan.in_lookback(unit):
        return True
    if not unit_present(the_plan.spec, sink, unit, record):
        log.warning(
            "backfill unit %s: its data is missing or truncated; fetching it again",
            unit.id,
            extra=log_fields(unit.label, None, unit.name),
        )
        return True
    return False


def unit_present(spec: BackfillSpec, sink: ReportSink, unit: Unit, record: UnitRecord) -> bool:
    """Whether a done unit's data is in place: its export file, or its report in
    ``sink`` (files: there with the size recorded)."""
    if unit.is_export:
        return file_matches(unit.path(spec.output), record)
    return sink.has(report_slot(spec, unit), record.bytes)


def file_matches(path: Path, record: UnitRecord) -> bool:
    """Whether a done unit's file is there with the size the checkpoint recorded."""
    try:
        return path.stat().st_size == record.bytes
    except OSError:
        return False


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
    refresh: tuple[datetime, datetime] | None = None,
    now: Callable[[], datetime] | None = None,
    instrumentation: InstrumentationOption = "auto",
    join: bool = True,
) -> BackfillSummary:
    """Run (or resume) a backfill.

    Units done and final, whose files are in place, are skipped; so are failed units
    (reported as failed again) unless ``retry_failed``, which reruns them along with any
    unit a crash left unfinished. Refetched: provisional units (their window ends within
    the spec's ``settle`` of now), units whose window ended within its ``lookback``,
    units whose file is missing or not the size recorded, and units whose window
    overlaps ``refresh`` (``[from, to)``). ``now`` is the wall clock (for tests; default
    the system's). Adjacent windows of a series report that are all to be fetched are
    fetched in one request and sliced per window (`fetch_groups`; not with the ``raw``
    format, whose files are response bodies); ``join=False`` fetches every window alone
    (the same files, more requests). ``tune_gc`` raises the cyclic garbage collector's
    thresholds for the run (see `gc_tuned`); pass False to leave them. ``instrumentation``
    is given to every token's client and counts each unit's final state (done,
    provisional, failed, skipped); as in `LexerClient`, ``"auto"`` is OpenTelemetry when
    configured."""
    if refresh is not None and (
        any(moment.tzinfo is None for moment in refresh) or refresh[0] >= refresh[1]
    ):
        raise exc.ValidationError("refresh needs (from, to) with UTC offsets, from before to")
    hooks = resolve_instrumentation(instrumentation)
    # The spec checked proxy and CA bundle; this reads the environment's, before any request.
    net = network(proxy=spec.proxy, ca_bundle=spec.ca_bundle)
    the_plan = plan(spec, now=now() if now is not None else None)
    for notice in the_plan.notices:
        log.warning("backfill: %s", notice, extra=log_fields())
    if spec.redis_url is not None and registry is None:
        from ..limits_redis import check_redis

        await check_redis(spec.redis_url)  # fail the whole run early, clearly
    store = spec.limit_store
    if store is not None and store != "memory" and registry is None:
        from ..limits_sqlite import store_registry
        from ..transport import DEFAULT_TIMEOUT

        # opened (and validated) now: an unusable store fails the run before any request
        registry = store_registry(store, lease_timeout=DEFAULT_TIMEOUT + 5.0)
    done: dict[str, int] = {s.label: 0 for s in spec.tokens}
    skipped: dict[str, int] = {s.label: 0 for s in spec.tokens}
    provisional: dict[str, int] = {s.label: 0 for s in spec.tokens}
    failed: dict[str, list[tuple[str, str]]] = {s.label: [] for s in spec.tokens}
    totals = {"bytes": 0, "files": 0}

    def emit(event: BackfillEvent) -> None:
        if isinstance(event, UnitFinished):
            if event.state == DONE:
                done[event.unit.label] += 1
                if the_plan.is_provisional(event.unit):
                    provisional[event.unit.label] += 1
                totals["bytes"] += event.size
                totals["files"] += 1
            elif event.state == FAILED:
                failed[event.unit.label].append((event.unit.id, event.error or ""))
            if hooks is not None:
                provisional_done = event.state == DONE and the_plan.is_provisional(event.unit)
                state = "provisional" if provisional_done else event.state
                hooks.unit_finished(event.unit.label, event.unit.name, state)
        if on_event is not None:
            on_event(event)

    sink = make_sink(spec.format, spec.output)
    # Checked before any request: the extra, schema versions, a database held elsewhere.
    sink.open(report_kinds(spec))
    with (
        contextlib.closing(sink),
        gc_tuned() if tune_gc else nullcontext(),
        closing(open_checkpoint(spec)) as checkpoint,
    ):
        records = checkpoint.records()
        overall = RankedCapacity(spec.total_concurrency)
        writer = ReportWriter(checkpoint, sink, now)
        runs = []
        for source in spec.tokens:  # token by token: no list of every token's units
            todo, skipped_units, failed_before = select_token_units(
                the_plan, sink, records, source.label, retry_failed=retry_failed, refresh=refresh
            )
            for unit, error in failed_before:
                failed[source.label].append((unit.id, error))
            for unit in skipped_units:
                skipped[source.label] += 1
                emit(UnitFinished(unit, "skipped"))
            runs.append(
                TokenRun(
                    spec,
                    source,
                    todo,
                    checkpoint,
                    writer,
                    overall,
                    emit,
                    registry,
                    the_plan,
                    now,
                    instrumentation=hooks,
                    join=join and spec.format != "raw",
                )
            )
        # One session for all tokens: connections are shared, not one pool per token.
        # Both go through the spec's proxy, with its CAs (the file session: no token).
        async with (
            api_session(connections=spec.total_concurrency, network=net) as session,
            files_session(net) as file_session,
            AsyncExitStack() as clients,
        ):
            opened = [run for run in runs if await run.open(clients, session, file_session)]
            # One worker per token to begin with, each token growing its own as its
            # requests go out. The overall cap admits by place in the token's rate
            # window, then in order, so requests leave round-robin across tokens, every
            # token's first requests of a window (the ones its last window waits on)
            # before any token's later ones, even when the client's CPU is the
            # bottleneck; each later window keeps that order (slots free in completion
            # order).
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
        provisional=provisional,
        bytes=totals["bytes"],
        files=totals["files"],
        requests=sum(r.stats[0] for r in runs),
        rate_limited=sum(r.stats[1] for r in runs),
        retries=sum(r.stats[2] for r in runs),
    )
