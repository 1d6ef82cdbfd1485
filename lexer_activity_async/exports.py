"""The export pipeline: start a job, poll its status economically, stream the CSV.

Every request goes through the token's `Channel` (it receives one, or a client that
has one). The file lives on a third origin (a storage URL) and is fetched through the
channel's credential-free file transport: no ``Auth-Api-Token``, none of the client's
default headers, no cookies, and redirects followed by hand so plain-http hops are
refused too. Files are written by `durable.write_atomically`.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import math
import os
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import anyio
import attrs

from . import exceptions as exc
from . import models as m
from . import wire
from .backoff import exponential
from .destinations import check_file_destination
from .durable import write_atomically as _write_atomically
from .events import DownloadProgress, ExportState
from .instrumentation import observe_download
from .logs import fields as log_fields
from .ranged import FileExpired as _Expired
from .ranged import FileUnavailable as _Transient
from .ranged import download_ranged, ranges_path
from .reports import (
    ExportKind,
    build_report_body,
    range_too_long,
    split_range,
    validate_range,
    window_stamp,
)
from .retry import is_retryable
from .transport import ChannelOwner, HttpRequest, HttpResponse, Timeouts, raise_detached
from .wire import is_loopback_url

if sys.version_info < (3, 11):  # pragma: no cover - anyio depends on the backport there
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "PollPolicy",
    "DownloadPolicy",
    "MAX_CONNECTIONS",
    "ExportResult",
    "FAILED_STATUSES",
    "start_export",
    "export_status",
    "wait_for_export",
    "download",
    "export",
    "export_rows",
    "iter_csv_records",
    "stream_file",
    "window_path",
]

log = logging.getLogger("lexer_activity_async")

FAILED_STATUSES = frozenset({"failed", "failure", "error", "errored", "expired", "cancelled"})
"""Terminal failure statuses (the reference documents only pending and complete)."""

_EXPIRED = frozenset({403, 404, 410})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@attrs.frozen
class PollPolicy:
    """How export status is polled: the first poll ``first_delay`` s after the start,
    then delays growing by ``factor`` up to ``cap`` s, each times uniform(0.75, 1); at
    most ``timeout`` s in all. Every poll takes a slot of the token's limiter."""

    first_delay: float = 2.0
    factor: float = 1.6
    cap: float = 30.0
    jitter_low: float = 0.75
    timeout: float = 3600.0

    def delay(self, poll: int, rng: random.Random | None = None) -> float:
        """Seconds before poll number ``poll`` (0-based)."""
        return exponential(
            poll,
            base=self.first_delay,
            factor=self.factor,
            cap=self.cap,
            jitter_low=self.jitter_low,
            rng=rng,
        )


V = TypeVar("V")


def _positive(_: object, attribute: attrs.Attribute[V], value: V) -> None:
    if value is None and attribute.name == "timeout":  # the one deadline that may be off
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise exc.ConfigurationError(f"DownloadPolicy.{attribute.name} must be a positive number")


MAX_CONNECTIONS = 32
"""Most concurrent ranges `DownloadPolicy.connections` allows for one file."""


def _connections(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONNECTIONS:
        raise exc.ConfigurationError(
            f"DownloadPolicy.connections must be an integer from 1 to {MAX_CONNECTIONS}"
        )


@attrs.frozen
class DownloadPolicy:
    """How the file is fetched: ``chunk_size`` bytes per write; up to ``max_resumes``
    resumptions after a dropped connection, a timeout or a 5xx; up to
    ``max_url_refreshes`` fresh URLs after the file host says the URL expired
    (403/404/410).

    Deadlines, in seconds: ``connect_timeout`` for each connection to the file host
    (TCP and TLS handshakes), ``read_timeout`` of silence while reading, ``timeout`` for
    the whole download, resumptions included (None: no bound). Past one of them the
    download raises `DownloadTimeoutError`.

    ``connections`` (1-32): with more than one, a file whose host serves byte ranges
    with a strong validator is fetched as that many concurrent ranges, each resumed on
    its own (``max_resumes`` per range), and resumable after a crash or cancellation
    from ``<dest>.part`` and its progress record ``<dest>.part.ranges`` (`ranged`).
    Other hosts get one stream, as with 1."""

    chunk_size: int = 1 << 20
    max_resumes: int = 5
    max_url_refreshes: int = 3
    read_timeout: float = attrs.field(default=60.0, validator=_positive)
    connect_timeout: float = attrs.field(default=30.0, validator=_positive)
    timeout: float | None = attrs.field(default=3600.0, validator=_positive)
    connections: int = attrs.field(default=1, validator=_connections)


@attrs.frozen
class ExportResult:
    """What an export wrote: its files (one, or one per window), bytes and jobs."""

    kind: str
    paths: tuple[Path, ...]
    bytes: int
    jobs: tuple[m.ExportJob, ...]
    polls: int


def _kind(kind: ExportKind | str) -> ExportKind:
    try:
        return ExportKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in ExportKind)
        raise exc.ValidationError(f"unknown export kind {kind!r}; known: {known}") from None


@attrs.frozen
class _Params:
    """An export's body fields besides its kind and range (see `build_report_body`)."""

    form: int | None = None
    nps_category: str | None = None
    users: Sequence[int] | None = None
    groups: Sequence[int] | None = None
    forms: Sequence[int] | None = None
    extra_filters: Mapping[str, object] | None = None


def _export_body(
    client: ChannelOwner,
    kind: ExportKind,
    date_from: datetime,
    date_to: datetime,
    params: _Params,
) -> dict[str, object]:
    return build_report_body(
        kind.value,
        date_from,
        date_to,
        needs_form=kind.needs_form,
        form=params.form,
        nps_category=params.nps_category,
        users=params.users,
        groups=params.groups,
        forms=params.forms,
        extra_filters=params.extra_filters,
        now=client.channel.now(),
    )


async def start_export(
    client: ChannelOwner,
    kind: ExportKind | str,
    date_from: datetime,
    date_to: datetime,
    *,
    form: int | None = None,
    nps_category: str | None = None,
    users: Sequence[int] | None = None,
    groups: Sequence[int] | None = None,
    forms: Sequence[int] | None = None,
    extra_filters: Mapping[str, object] | None = None,
    restart_dropped: bool = False,
) -> m.ExportJob:
    """Start an export job (one request). Not retried on 5xx or after a dropped
    connection, since the job may already exist; retried on 429 and failed connects.

    ``form`` (required for nps_submissions, refused otherwise) and ``nps_category``
    name the NPS survey; ``users``, ``groups`` and ``forms`` filter by id, and
    ``extra_filters`` adds body fields verbatim, as for reports (`build_report_body`).

    ``restart_dropped=True`` starts the job once more when the connection dropped with
    no answer (a warning is logged): proxies and servers close idle keep-alive
    connections without notice, and the request then meets a dead pooled connection.
    The first job may exist unused on the server; the pipeline and backfills accept
    that cost (one request) rather than fail the export."""
    which = _kind(kind)
    params = _Params(form, nps_category, users, groups, forms, extra_filters)
    body = _export_body(client, which, date_from, date_to, params)

    def decode(status: int, raw: bytes) -> m.ExportJob:
        return wire.decode_export_job(status, raw, which.value)

    channel = client.channel
    request = wire.report_request(body)
    try:
        job = await channel.send(request, decode, idempotent=False)
    except exc.LexerConnectionError as error:
        if not restart_dropped or not _dropped_unanswered(error):
            raise
        log.warning(
            "starting the %s export: the connection dropped before an answer; starting it"
            " once more (a job may have been started unused)",
            which.value,
            extra=log_fields(channel.label, None, which.value),
        )
    else:
        channel.emit(ExportState(channel.label, which.value, job.token, job.status))
        return job
    job = await channel.send(request, decode, idempotent=False)  # outside the handler
    channel.emit(ExportState(channel.label, which.value, job.token, job.status))
    return job


def _dropped_unanswered(error: exc.LexerConnectionError) -> bool:
    """A connection that dropped after the request may have left, with no answer read:
    not a malformed answer (the server spoke), not a proxy's refusal."""
    return type(error) is exc.LexerConnectionError and error.request_sent


async def _start(
    client: ChannelOwner,
    kind: ExportKind | str,
    date_from: datetime,
    date_to: datetime,
    params: _Params,
) -> m.ExportJob:
    return await start_export(
        client,
        kind,
        date_from,
        date_to,
        form=params.form,
        nps_category=params.nps_category,
        users=params.users,
        groups=params.groups,
        forms=params.forms,
        extra_filters=params.extra_filters,
        restart_dropped=True,
    )


async def export_status(client: ChannelOwner, report_token: str) -> m.ExportJob:
    """One status poll, on the status host (it takes a limiter slot)."""
    if not report_token:
        raise exc.ValidationError("report_token must be a non-empty string")

    def decode(status: int, raw: bytes) -> m.ExportJob:
        return wire.decode_export_job(status, raw)

    return await client.channel.send(wire.status_request(report_token), decode)


async def wait_for_export(
    client: ChannelOwner,
    job: m.ExportJob,
    *,
    kind: str = "export",
    poll: PollPolicy | None = None,
    on_poll: Callable[[m.ExportJob], None] | None = None,
) -> m.ExportJob:
    """Poll until the job is ``complete`` with a url; `ExportFailedError` on a failure
    status, `ExportTimeoutError` after ``poll.timeout`` s. An unknown status is logged
    once and polled on."""
    policy = poll or PollPolicy()
    seen_unknown: set[str] = set()
    status = job.status
    try:
        with anyio.fail_after(policy.timeout):
            n = 0
            while True:
                if job.status == "complete" and job.url:
                    return job
                await anyio.sleep(policy.delay(n))
                n += 1
                job = await export_status(client, job.token)
                if on_poll is not None:
                    on_poll(job)
                if job.status != status:
                    status = job.status
                    client.channel.emit(
                        ExportState(client.channel.label, kind, job.token, job.status)
                    )
                lowered = job.status.lower()
                if lowered in FAILED_STATUSES:
                    raise exc.ExportFailedError(
                        f"export job ended with status {job.status!r}", status=job.status, kind=kind
                    )
                if lowered not in ("pending", "complete") and lowered not in seen_unknown:
                    seen_unknown.add(lowered)
                    log.warning(
                        "export job of token %s has undocumented status %r; polling on",
                        client.channel.label,
                        job.status,
                        extra=log_fields(client.channel.label, None, kind),
                    )
    except TimeoutError:
        pass
    # Raised outside the handler: the cancelled poll is no part of its context.
    raise exc.ExportTimeoutError(
        f"export job not complete after {policy.timeout:g}s (last status {status!r})",
        report_type=kind,
    )


def _check_file_url(client: ChannelOwner, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback_url(url) and is_loopback_url(client.channel.api_url):
        return
    raise exc.DownloadError(
        f"refusing export file URL with scheme {parts.scheme!r} on host {parts.hostname!r}: "
        "only https is allowed (plain http only for a loopback sandbox)"
    )


async def _open_file(
    client: ChannelOwner,
    url: str,
    offset: int,
    policy: DownloadPolicy,
    remaining: float,
    ranged: Mapping[str, str] | None = None,
) -> HttpResponse:
    """GET the file with no credentials, following redirects by hand (checked each hop).
    ``ranged``: the headers of one range of a parallel download (a 206 is then due)."""
    headers = dict(ranged) if ranged else {"Range": f"bytes={offset}-"} if offset else {}
    partial = bool(offset or ranged)
    timeout = Timeouts(
        total=None if remaining == math.inf else remaining,
        connect=policy.connect_timeout,
        read=policy.read_timeout,
    )
    files = client.channel.files
    for _ in range(10):
        _check_file_url(client, url)
        request = HttpRequest(
            "GET", url, headers=headers, timeout=timeout, stream=True, origin="file"
        )
        response = await files.handle(request)
        if response.status in _REDIRECTS and "Location" in response.headers:
            url = urljoin(url, response.headers["Location"])
            await response.aclose()
            continue
        if response.status not in (200, 206) or (response.status == 206 and not partial):
            await response.aclose()
            if response.status in _EXPIRED:
                raise _Expired(response.status)
            if response.status >= 500 or response.status == 408:
                raise _Transient(response.status)
            raise exc.DownloadError(f"file host answered HTTP {response.status}")
        return response
    raise exc.DownloadError("too many redirects from the file host")


def _total_size(response: HttpResponse, offset: int) -> int | None:
    """The whole file's size, from Content-Range (206) or Content-Length (200)."""
    if response.status == 206:
        content_range = _header(response, "Content-Range") or ""
        unit, _, spec = content_range.partition(" ")
        span, _, total = spec.partition("/")
        start = span.partition("-")[0]
        if unit != "bytes" or not start.isdigit() or int(start) != offset:
            raise exc.DownloadError(f"file host sent a wrong Content-Range {content_range!r}")
        return int(total) if total.isdigit() else None
    length = _header(response, "Content-Length")
    return int(length) if length and length.isdigit() else None


def _header(response: HttpResponse, name: str) -> str | None:
    lowered = name.lower()
    return next((v for k, v in response.headers.items() if k.lower() == lowered), None)


async def stream_file(
    client: ChannelOwner,
    url: str,
    *,
    refresh_url: Callable[[], Awaitable[str]] | None = None,
    policy: DownloadPolicy | None = None,
    kind: str = "export",
) -> AsyncIterator[bytes]:
    """Yield the file's bytes in order, exactly once each, resuming dropped connections
    with ``Range`` (or, when the host ignores Range, re-reading and skipping what was
    already yielded), refreshing an expired URL through ``refresh_url``, and verifying
    the size against Content-Length/Content-Range."""
    policy = policy or DownloadPolicy()
    channel = client.channel
    received = resumes = refreshes = 0
    total: int | None = None
    deadline = math.inf if policy.timeout is None else anyio.current_time() + policy.timeout
    # Failures are summarised, never kept: nothing of aiohttp's (request info, URL) rides
    # along as the context of the error finally raised.
    problem = ""
    timed_out = expired = False
    while True:
        if problem:
            resumes += 1
            if resumes > policy.max_resumes:
                break
            pause = exponential(resumes, base=0.25, cap=5.0)
            await anyio.sleep(min(pause, max(0.0, deadline - anyio.current_time())))
            problem = ""
        if expired:
            if refresh_url is None or refreshes >= policy.max_url_refreshes:
                raise exc.DownloadError(
                    f"export file URL expired and {refreshes} fresh URLs did not help"
                )
            refreshes += 1
            expired = False
            url = await refresh_url()
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            timed_out, problem = True, "the whole-download deadline passed"
            break
        try:
            response = await _open_file(client, url, received, policy, remaining)
        except _Expired:
            expired = True
            continue
        except (exc.TransportError, _Transient) as e:
            if isinstance(e, exc.TransportError) and not is_retryable(e):
                timed_out, problem = False, _brief(e)  # TLS, a proxy's 407: resuming cannot help
                break
            timed_out, problem = isinstance(e, exc.LexerTimeoutError), _brief(e)
            continue
        try:
            size = _total_size(response, received)
            if total is not None and size is not None and size != total:
                raise exc.DownloadError(f"file size changed from {total} to {size} bytes")
            total = size if size is not None else total
            skip = received if response.status == 200 else 0
            async for chunk in _rechunked(response, policy.chunk_size):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                received += len(chunk)
                yield chunk
                channel.emit(DownloadProgress(channel.label, kind, received, total))
            if skip or (total is not None and received < total):
                timed_out, problem = False, "body ended early"
                continue
        except exc.TransportError as e:
            timed_out, problem = isinstance(e, exc.LexerTimeoutError), _brief(e)
            continue
        finally:
            await response.aclose()
        if total is not None and received != total:
            raise exc.DownloadError(f"got {received} bytes, Content-Length said {total}")
        return
    if timed_out:
        raise_detached(
            exc.DownloadTimeoutError(
                f"file download timed out ({problem}; connect {policy.connect_timeout:g}s, "
                f"read {policy.read_timeout:g}s, whole download "
                + ("unbounded" if policy.timeout is None else f"{policy.timeout:g}s")
                + ")",
                report_type=kind,
            )
        )
    raise_detached(exc.DownloadError(f"file download failed: {problem}"))


async def _rechunked(response: HttpResponse, size: int) -> AsyncIterator[bytes]:
    """The body in chunks of at most ``size`` bytes."""
    async for chunk in response.aiter_bytes():
        for start in range(0, len(chunk), size):
            yield chunk[start : start + size]


def _brief(error: BaseException) -> str:
    """What went wrong, in the transport's words (they never quote the URL: it may be
    signed), or the file host's status."""
    if isinstance(error, _Transient):
        return f"file host answered HTTP {error.status}"
    return str(error)


def _url_refresher(
    client: ChannelOwner, report_token: str, kind: str, poll: PollPolicy | None
) -> Callable[[], Awaitable[str]]:
    """A fresh file URL for an expired one: poll the job's status again."""

    async def refresh() -> str:
        fresh = await wait_for_export(
            client, await export_status(client, report_token), kind=kind, poll=poll
        )
        assert fresh.url is not None  # wait_for_export returns only complete jobs with a url
        return fresh.url

    return refresh


async def download(
    client: ChannelOwner,
    job: m.ExportJob,
    dest: str | os.PathLike[str],
    *,
    kind: str = "export",
    policy: DownloadPolicy | None = None,
    poll: PollPolicy | None = None,
) -> int:
    """Stream a complete job's file to ``dest`` atomically; return its size in bytes."""
    if not job.url:
        raise exc.ValidationError("the export job has no url yet; wait_for_export() first")

    refresh = _url_refresher(client, job.token, kind, poll)
    policy = policy or DownloadPolicy()
    target = Path(dest)
    if policy.connections > 1:
        size = await _download_ranged(client, job.url, target, refresh, policy, kind)
        if size is not None:
            return size
        ranges_path(target).unlink(missing_ok=True)  # an old record of another file
    chunks = stream_file(client, job.url, refresh_url=refresh, policy=policy, kind=kind)
    chunks = observe_download(client.channel.instrumentation, client.channel.label, kind, chunks)
    return await _write_atomically(target, chunks)


async def _download_ranged(
    client: ChannelOwner,
    url: str,
    dest: Path,
    refresh: Callable[[], Awaitable[str]],
    policy: DownloadPolicy,
    kind: str,
) -> int | None:
    """`ranged.download_ranged` through the credential-free file transport."""
    channel = client.channel

    async def open_file(at: str, headers: Mapping[str, str], remaining: float) -> HttpResponse:
        if remaining <= 0:
            raise exc.LexerTimeoutError("the whole-download deadline passed")
        return await _open_file(client, at, 0, policy, remaining, headers)

    def progress(received: int, total: int) -> None:
        channel.emit(DownloadProgress(channel.label, kind, received, total))

    limit = math.inf if policy.timeout is None else policy.timeout
    try:
        with anyio.fail_after(limit):
            return await download_ranged(
                open_file=open_file,
                url=url,
                dest=dest,
                connections=policy.connections,
                refresh_url=refresh,
                max_resumes=policy.max_resumes,
                max_url_refreshes=policy.max_url_refreshes,
                deadline=anyio.current_time() + limit,
                on_progress=progress,
            )
    except (TimeoutError, exc.LexerTimeoutError):
        pass  # raised below, outside the handler
    raise_detached(
        exc.DownloadTimeoutError(
            f"ranged file download timed out (connect {policy.connect_timeout:g}s, read "
            f"{policy.read_timeout:g}s, whole download "
            + ("unbounded" if policy.timeout is None else f"{policy.timeout:g}s")
            + ")",
            report_type=kind,
        )
    )


async def _run_one(
    client: ChannelOwner,
    kind: ExportKind,
    date_from: datetime,
    date_to: datetime,
    dest: Path,
    params: _Params,
    poll: PollPolicy | None,
    policy: DownloadPolicy | None,
) -> tuple[m.ExportJob, int, int]:
    polls = 0

    def count(_: m.ExportJob) -> None:
        nonlocal polls
        polls += 1

    job = await _start(client, kind, date_from, date_to, params)
    done = await wait_for_export(client, job, kind=kind.value, poll=poll, on_poll=count)
    size = await download(client, done, dest, kind=kind.value, policy=policy, poll=poll)
    return done, size, polls


def window_path(dest: Path, start: datetime, end: datetime) -> Path:
    """``cases.csv`` → ``cases.2024-01-01T00-00-00+00-00_2024-02-01T00-00-00+00-00.csv``."""
    return dest.with_name(f"{dest.stem}.{window_stamp(start, end)}{dest.suffix}")


async def export(
    client: ChannelOwner,
    kind: ExportKind | str,
    date_from: datetime,
    date_to: datetime,
    dest: str | os.PathLike[str],
    *,
    form: int | None = None,
    nps_category: str | None = None,
    users: Sequence[int] | None = None,
    groups: Sequence[int] | None = None,
    forms: Sequence[int] | None = None,
    extra_filters: Mapping[str, object] | None = None,
    window_months: int = 1,
    merge: bool = True,
    poll: PollPolicy | None = None,
    policy: DownloadPolicy | None = None,
) -> ExportResult:
    """Export ``kind`` over ``[date_from, date_to)`` to ``dest``.

    Ranges within 12 months run as one job. Longer ranges are split into half-open,
    gap-free windows of ``window_months`` (default one calendar month), run concurrently
    under the token's limiter, and written either merged into ``dest`` with a single
    header (``merge=True``) or as one file per window beside it (`window_path`). Every
    window's job gets the same ``form``, ``nps_category`` and filters (as in
    `start_export`).

    ``dest`` is checked first (`OutputError` if it is a folder or its folder cannot be
    written), so a bad path never starts a job or spends rate budget.
    """
    which = _kind(kind)
    start, end = validate_range(date_from, date_to, now=client.channel.now(), max_months=None)
    params = _Params(form, nps_category, users, groups, forms, extra_filters)
    # Validate every window's body before anything is sent.
    windows = (
        [(start, end)]
        if not range_too_long(start, end)
        else split_range(start, end, months=window_months)
    )
    for lo, hi in windows:
        _export_body(client, which, lo, hi, params)
    target = check_file_destination(dest)
    if len(windows) == 1:
        job, size, polls = await _run_one(client, which, start, end, target, params, poll, policy)
        return ExportResult(which.value, (target,), size, (job,), polls)

    paths = [window_path(target, lo, hi) for lo, hi in windows]
    results: list[tuple[m.ExportJob, int, int] | None] = [None] * len(windows)

    async def one(i: int) -> None:
        lo, hi = windows[i]
        results[i] = await _run_one(client, which, lo, hi, paths[i], params, poll, policy)

    try:
        try:
            async with anyio.create_task_group() as group:
                for i in range(len(windows)):
                    group.start_soon(one, i)
        except BaseExceptionGroup as group_error:
            # anyio wraps even a single failure in a group: raise the (first) window's own
            # error, ExportFailedError, DownloadError, ..., as a one-window export does.
            first = group_error.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        done = [r for r in results if r is not None]
        jobs, polls = tuple(r[0] for r in done), sum(r[2] for r in done)
        if not merge:
            return ExportResult(which.value, tuple(paths), sum(r[1] for r in done), jobs, polls)
        size = await _write_atomically(target, _merged(paths))
        return ExportResult(which.value, (target,), size, jobs, polls)
    finally:
        if merge:
            for path in paths:
                path.unlink(missing_ok=True)


async def _merged(paths: list[Path], chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
    """The window files in order, each one's header record dropped but the first's."""
    for index, path in enumerate(paths):
        with open(path, "rb") as handle:  # noqa: ASYNC230 - local reads of <= 1 MiB
            if index:
                _skip_header(handle)
            while chunk := handle.read(chunk_size):
                yield chunk
                await anyio.lowlevel.checkpoint()


def _skip_header(handle: io.BufferedReader) -> None:
    """Advance past the first CSV record (which may span lines inside quotes)."""
    quotes = 0
    while line := handle.readline():
        quotes += line.count(b'"')
        if quotes % 2 == 0:
            return


async def iter_csv_records(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[str]]:
    """Parse CSV records from a byte stream as it arrives: quoted commas, doubled quotes,
    newlines inside fields and UTF-8 characters split across chunks are all handled."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending = ""
    async for chunk in chunks:
        pending += decoder.decode(chunk)
        cut = _last_record_end(pending)
        if cut:
            for record in csv.reader(io.StringIO(pending[:cut], newline="")):
                yield record
            pending = pending[cut:]
    pending += decoder.decode(b"", final=True)
    if pending.strip():
        for record in csv.reader(io.StringIO(pending, newline="")):
            yield record


def _last_record_end(text: str) -> int:
    """Index just past the last newline that ends a record (outside quotes), or 0."""
    inside = False
    end = 0
    start = 0
    closed = -2  # index of the quote that last closed a quoted field
    while True:
        quote = text.find('"', start)
        newline = text.find("\n", start)
        if newline < 0:
            return end
        if 0 <= quote < newline:
            # As the csv module reads it: a quote opens a quoted field only at a field's
            # start, or right after the quote that closed one (a doubled quote); inside an
            # unquoted field it is a literal character.
            if inside:
                inside, closed = False, quote
            elif quote == 0 or text[quote - 1] in ",\r\n" or closed == quote - 1:
                inside = True
            start = quote + 1
            continue
        if not inside:
            end = newline + 1
        start = newline + 1


async def export_rows(
    client: ChannelOwner,
    kind: ExportKind | str,
    date_from: datetime,
    date_to: datetime,
    *,
    form: int | None = None,
    nps_category: str | None = None,
    users: Sequence[int] | None = None,
    groups: Sequence[int] | None = None,
    forms: Sequence[int] | None = None,
    extra_filters: Mapping[str, object] | None = None,
    poll: PollPolicy | None = None,
    policy: DownloadPolicy | None = None,
) -> AsyncIterator[dict[str, str]]:
    """Start an export (at most 12 months), wait for it, and yield its rows as dicts keyed
    by the header, parsed while the file streams (nothing is written to disk). ``form``
    and the filters are as in `start_export`."""
    params = _Params(form, nps_category, users, groups, forms, extra_filters)
    job = await _start(client, kind, date_from, date_to, params)
    name = _kind(kind).value
    done = await wait_for_export(client, job, kind=name, poll=poll)
    assert done.url is not None

    header: list[str] | None = None
    refresh = _url_refresher(client, job.token, name, poll)
    stream = stream_file(client, done.url, refresh_url=refresh, policy=policy, kind=name)
    stream = observe_download(client.channel.instrumentation, client.channel.label, name, stream)
    records = iter_csv_records(stream)
    try:
        async for record in records:
            if header is None:
                header = record
                continue
            yield dict(zip(header, record, strict=False))
    finally:
        # Closed now, not when collected: a reader that stops early ends the download
        # (its connection, its span) at once, whatever the Python or library versions.
        for source in (records, stream):
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()
