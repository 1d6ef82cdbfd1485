"""A dlt source for the Activity API: ``lexer_source(tokens=..., reports=..., exports=...)``.

One dlt resource per report kind, each yielding the tidy rows of
`lexer_activity_async.tables`, and one per export kind asked for in ``exports``, each
yielding the export's CSV as typed Arrow batches (`csv_parquet`); typed columns and
primary keys come from the table schemas. Every request goes through `LexerClient` and
its limiter, so a dlt pipeline never exceeds a token's budget, across runs too: the
default limiter is the local limit store the CLI uses.

Loading is incremental per token: each resource remembers, in dlt's resource state, up
to when it fetched each token, and the next run fetches from that moment minus
``lookback`` (rounded down to the window grid) to now. Windows are replaced whole in the
destination (dlt's ``delete-insert`` merge on ``label`` + ``window_start``), so a refetched
window never leaves a duplicate or a stale row. Needs the ``[dlt]`` extra, and for
exports the ``[tables]`` extra too.
"""

from __future__ import annotations

import enum
import importlib
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import attrs

from . import exceptions as exc
from . import tables
from .client import LexerClient
from .exports import PollPolicy
from .kinds import report_kind
from .limits import DEFAULT_MAX_REQUESTS, DEFAULT_WINDOW
from .limits_sqlite import default_store_path
from .reports import (
    MAX_RANGE_MONTHS,
    ExportKind,
    NpsCategory,
    ReportType,
    add_months,
    format_datetime,
    parse_datetime,
    validate_nps,
)

try:
    import dlt
    from dlt.extract.source import DltSource
except ImportError as error:  # without the extra: say which one to install
    raise ImportError(
        "lexer_activity_async.dlt needs dlt: pip install 'lexer-activity-async[dlt]'"
    ) from error

__all__ = ["lexer_source", "dlt_columns", "DEFAULT_LOOKBACK", "ALL_REPORTS", "ALL_EXPORTS"]

ALL_REPORTS: tuple[str, ...] = tuple(kind.value for kind in ReportType)
"""Every report kind, the default of ``reports``."""
ALL_EXPORTS: tuple[str, ...] = tuple(kind.value for kind in ExportKind)
"""Every export kind (``exports`` is opt-in: none by default)."""

DEFAULT_LOOKBACK = timedelta(days=3)
"""How far before the last run's end each run fetches again: late data lands there."""

_NPS_REPORTS = frozenset({ReportType.NPS_SUMMARY.value, ReportType.NPS_VOLUME.value})
_WINDOW_DISPOSITION: Any = {"disposition": "merge", "strategy": "delete-insert"}


@attrs.frozen
class _Settings:
    """The source's checked options (see `lexer_source`)."""

    tokens: tuple[tuple[str, str], ...]
    date_from: datetime
    date_to: datetime | None
    reports: tuple[str, ...]
    exports: tuple[str, ...]
    window_months: int
    lookback: timedelta
    nps_form: int | None
    nps_category: str
    concurrency: int
    poll: PollPolicy | None
    client_options: Mapping[str, Any]
    now: Callable[[], datetime]

    def current(self) -> datetime:
        return min(self.now(), self.date_to) if self.date_to is not None else self.now()

    def windows_since(self, through: datetime | None) -> list[tuple[datetime, datetime]]:
        """The grid windows to fetch this run: all of them the first time, else those
        ending after ``through - lookback``. The last may reach past now."""
        end = self.current()
        resume = None if through is None else through - self.lookback
        windows = []
        lo, step = self.date_from, 1
        while lo < end:
            hi = add_months(self.date_from, self.window_months * step)
            if self.date_to is not None:
                hi = min(hi, self.date_to)
            if resume is None or hi > resume:
                windows.append((lo, hi))
            lo, step = hi, step + 1
        return windows


def _checked(
    tokens: Mapping[str, str] | Iterable[tuple[str, str]],
    date_from: datetime,
    date_to: datetime | None,
    reports: Sequence[str | ReportType],
    exports: Sequence[str | ExportKind],
    window_months: int,
    lookback: timedelta,
    nps_form: int | None,
    nps_category: str | NpsCategory,
    concurrency: int,
) -> dict[str, Any]:
    """Every option checked before any request: a `ValidationError` or
    `ConfigurationError` naming the option."""
    pairs = tuple(tokens.items() if isinstance(tokens, Mapping) else tokens)
    if not pairs:
        raise exc.ConfigurationError("tokens: give at least one label -> token pair")
    labels = [label for label, _ in pairs]
    for label, token in pairs:
        if not isinstance(label, str) or not label.strip():
            raise exc.ConfigurationError("tokens: every label must be a non-empty string")
        if not isinstance(token, str) or not token.strip():
            raise exc.ConfigurationError(f"tokens: the token of {label!r} is empty")
    if len(set(labels)) != len(labels):
        raise exc.ConfigurationError("tokens: labels must be unique")
    for name, moment in (("date_from", date_from), ("date_to", date_to)):
        if moment is not None and (not isinstance(moment, datetime) or moment.tzinfo is None):
            raise exc.ValidationError(f"{name} must be a timezone-aware datetime")
    if date_to is not None and date_to <= date_from:
        raise exc.ValidationError("date_from must be before date_to")
    report_names = _kind_names("reports", "report", reports, ReportType, ALL_REPORTS)
    export_names = _kind_names("exports", "export", exports, ExportKind, ALL_EXPORTS)
    if not report_names and not export_names:
        raise exc.ValidationError("reports: give at least one report (or export)")
    if export_names:
        try:  # typed export rows need pyarrow: say so now, not in the first window
            importlib.import_module("lexer_activity_async.csv_parquet")
        except ImportError as error:
            raise exc.ConfigurationError(f"exports: {error}") from None
    needs_form = _NPS_REPORTS.intersection(report_names) or (
        ExportKind.NPS_SUBMISSIONS.value in export_names
    )
    category = NpsCategory(nps_category).value if nps_category in set(NpsCategory) else None
    if needs_form:
        nps_form, category = validate_nps(nps_form, nps_category)
    elif category is None:
        raise exc.ValidationError(f"nps_category: unknown category {nps_category!r}")
    if isinstance(window_months, bool) or not 1 <= window_months <= MAX_RANGE_MONTHS:
        raise exc.ValidationError(f"window_months must be 1 to {MAX_RANGE_MONTHS}")
    if not isinstance(lookback, timedelta) or lookback < timedelta(0):
        raise exc.ValidationError("lookback must be a timedelta of zero or more")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise exc.ValidationError("concurrency must be an integer of at least 1")
    return {
        "tokens": pairs,
        "reports": tuple(report_names),
        "exports": tuple(export_names),
        "nps_form": nps_form,
        "nps_category": category,
    }


def _kind_names(
    option: str, noun: str, given: Iterable[str], kinds: type[enum.Enum], known: Iterable[str]
) -> list[str]:
    """The names of ``given`` kinds, each known and none repeated, else `ValidationError`."""
    names = []
    for item in given:
        try:
            names.append(kinds(item).value)
        except ValueError:
            raise exc.ValidationError(
                f"{option}: unknown {noun} {item!r} (known: {', '.join(known)})"
            ) from None
    if len(set(names)) != len(names):
        raise exc.ValidationError(f"{option} must not repeat a kind")
    return names


def lexer_source(
    tokens: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    date_from: datetime,
    date_to: datetime | None = None,
    reports: Sequence[str | ReportType] = ALL_REPORTS,
    exports: Sequence[str | ExportKind] = (),
    window_months: int = 1,
    lookback: timedelta = DEFAULT_LOOKBACK,
    nps_form: int | None = None,
    nps_category: str | NpsCategory = NpsCategory.ALL,
    concurrency: int = 8,
    poll: PollPolicy | None = None,
    api_url: str | None = None,
    status_url: str | None = None,
    limit_store: str | Path | None = None,
    redis_url: str | None = None,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    window: float = DEFAULT_WINDOW,
    timeout: float | None = None,
    now: Callable[[], datetime] | None = None,
) -> DltSource:
    """A dlt source over ``tokens`` (label -> API token): one resource per report kind
    in ``reports`` and per export kind in ``exports`` (none by default; they need the
    ``[tables]`` extra), from ``date_from`` to ``date_to`` (None: now) in windows of
    ``window_months`` on ``date_from``'s grid. NPS reports and ``nps_submissions`` take
    ``nps_form`` and ``nps_category``; export jobs are polled by ``poll``.

    Each run after the first fetches, per token, from where the last one ended minus
    ``lookback``. ``concurrency`` caps each token's requests in flight per resource.
    The rate limit is shared through the local limit store (``limit_store``, default as
    the CLI's) or Redis (``redis_url``); ``max_requests``/``window`` as in `LexerClient`.
    Options are checked here, before any request.
    """
    checked = _checked(
        tokens,
        date_from,
        date_to,
        reports,
        exports,
        window_months,
        lookback,
        nps_form,
        nps_category,
        concurrency,
    )
    options: dict[str, Any] = {
        "api_url": api_url,
        "status_url": status_url,
        "max_requests": max_requests,
        "window": window,
    }
    if timeout is not None:
        options["timeout"] = timeout
    if redis_url is not None:
        if limit_store is not None:
            raise exc.ConfigurationError("pass either limit_store or redis_url, not both")
        options["redis_url"] = redis_url
    else:
        options["limit_store"] = limit_store if limit_store is not None else default_store_path()
    settings = _Settings(
        date_from=date_from.astimezone(timezone.utc),
        date_to=None if date_to is None else date_to.astimezone(timezone.utc),
        window_months=window_months,
        lookback=lookback,
        concurrency=concurrency,
        poll=poll,
        client_options=options,
        now=now or (lambda: datetime.now(timezone.utc)),
        **checked,
    )
    # Fail here, not in the first request, on an option the client refuses.
    for label, token in settings.tokens:
        LexerClient(token, label=label, **options)

    @dlt.source(name="lexer_activity")
    def source() -> Iterable[Any]:
        for name in settings.reports:
            yield _report_resource(settings, name)
        for name in settings.exports:
            yield _export_resource(settings, ExportKind(name))

    result: DltSource = source()
    return result


_DLT_TYPES = {
    tables.ColumnType.STRING: "text",
    tables.ColumnType.INT64: "bigint",
    tables.ColumnType.FLOAT64: "double",
    tables.ColumnType.BOOL: "bool",
    tables.ColumnType.TIMESTAMP: "timestamp",
}


def dlt_columns(schema: tables.TableSchema) -> dict[str, Any]:
    """dlt column hints of a `tables` schema: typed columns, no inference."""
    return {
        column.name: {
            "data_type": _DLT_TYPES[column.type],
            "nullable": column.nullable,
            "description": column.description,
            **({"timezone": True} if column.type is tables.ColumnType.TIMESTAMP else {}),
        }
        for column in schema.columns
    }


def _report_resource(settings: _Settings, name: str) -> Any:
    kind = ReportType(name)
    schema = tables.schema_for(kind)

    async def chunk(
        client: LexerClient, windows: Sequence[tuple[datetime, datetime]], end: datetime
    ) -> AsyncIterator[list[tables.Row]]:
        for batch in await _fetch_all(settings, client, kind, windows, end):
            if batch:
                yield batch

    async def rows() -> AsyncIterator[list[tables.Row]]:
        async for batch in _incremental(settings, chunk):
            yield batch

    return _resource(rows, schema)


def _resource(rows: Callable[[], AsyncIterator[Any]], schema: tables.TableSchema) -> Any:
    """A resource of ``schema``'s table, each window replaced whole on reload."""
    return dlt.resource(
        rows,
        name=schema.table,
        write_disposition=_WINDOW_DISPOSITION,
        primary_key=list(schema.primary_key),
        merge_key=["label", "window_start"],
        columns=dlt_columns(schema),
    )


def _export_resource(settings: _Settings, kind: ExportKind) -> Any:
    """A resource of export ``kind``: per window due, the export's CSV as typed Arrow
    tables (a batch at a time, so memory stays bounded whatever the file's size)."""
    import pyarrow  # the [tables] extra, checked in `lexer_source`

    from . import csv_parquet

    schema = tables.export_schema_for(kind)
    form = settings.nps_form if kind.needs_form else None
    category = settings.nps_category if kind.needs_form else None

    async def chunk(
        client: LexerClient, windows: Sequence[tuple[datetime, datetime]], end: datetime
    ) -> AsyncIterator[Any]:
        # The chunk's jobs run concurrently, each file to disk; then read one at a time.
        with tempfile.TemporaryDirectory(prefix="lexer-dlt-") as folder:
            paths = [Path(folder) / f"{index}.csv" for index in range(len(windows))]

            async def download(index: int) -> None:
                lo, hi = windows[index]
                await client.export(
                    kind,
                    lo,
                    min(hi, end),
                    paths[index],
                    form=form,
                    nps_category=category,
                    poll=settings.poll,
                )

            async with anyio.create_task_group() as group:
                for index in range(len(windows)):
                    group.start_soon(download, index)
            for (lo, hi), path in zip(windows, paths, strict=True):
                batches = csv_parquet.read_batches(
                    path, schema, label=client.label, window_start=lo, window_end=hi
                )
                while (batch := await anyio.to_thread.run_sync(next, batches, None)) is not None:
                    if batch.num_rows:
                        yield pyarrow.Table.from_batches([batch])

    async def rows() -> AsyncIterator[Any]:
        async for batch in _incremental(settings, chunk):
            yield batch

    return _resource(rows, schema)


async def _fetch(
    settings: _Settings,
    client: LexerClient,
    kind: ReportType,
    window: tuple[datetime, datetime],
    end: datetime,
) -> list[tables.Row]:
    """The rows of one token's window; a window reaching past now is asked up to now
    but keeps its full bounds in the rows (its key stays the same from run to run)."""
    lo, hi = window
    form = settings.nps_form if kind.needs_form else None
    result = await client.report(
        report_kind(kind),
        lo,
        min(hi, end),
        form=form,
        nps_category=settings.nps_category if kind.needs_form else None,
    )
    return tables.to_rows(
        kind, result, label=client.label, window_start=lo, window_end=hi, form=form
    )


_Chunk = Callable[[LexerClient, Sequence[tuple[datetime, datetime]], datetime], AsyncIterator[Any]]
"""The batches of some windows of one token, given its client and this run's end."""


async def _incremental(settings: _Settings, chunk: _Chunk) -> AsyncIterator[Any]:
    """The batches of every token's windows due this run, ``settings.concurrency``
    windows at a time, and the state that the next run resumes from (which dlt stores
    only once the load succeeds)."""
    state = dlt.current.resource_state()
    through: dict[str, str] = state.setdefault("fetched_through", {})
    for label, token in settings.tokens:
        end = settings.current()
        last = through.get(label)
        windows = settings.windows_since(None if last is None else parse_datetime(last))
        async with LexerClient(token, label=label, **settings.client_options) as client:
            for first in range(0, len(windows), settings.concurrency):
                some = windows[first : first + settings.concurrency]
                async for batch in chunk(client, some, end):
                    yield batch
        through[label] = format_datetime(end)


async def _fetch_all(
    settings: _Settings,
    client: LexerClient,
    kind: ReportType,
    windows: Sequence[tuple[datetime, datetime]],
    end: datetime,
) -> list[list[tables.Row]]:
    """The rows of ``windows``, fetched concurrently in a task group, in window order."""
    results: list[list[tables.Row]] = [[] for _ in windows]

    async def run(index: int) -> None:
        results[index] = await _fetch(settings, client, kind, windows[index], end)

    async with anyio.create_task_group() as group:
        for index in range(len(windows)):
            group.start_soon(run, index)
    return results
