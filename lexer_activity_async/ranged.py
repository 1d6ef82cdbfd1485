"""Parallel ranged downloads: one export file fetched as N concurrent byte ranges.

A file whose host answers a ``Range`` probe with 206, its whole length and a strong
validator (``ETag``, else ``Last-Modified``) is split into N ranges, each fetched on its
own connection with ``If-Range`` (so a file changed meanwhile comes back whole, 200, and
the download restarts) and written at its offset into ``<dest>.part`` (``os.pwrite`` in
a worker thread, about a MiB at a time: memory stays N x 1 MiB whatever the size).

Resumable per range: every `CHECKPOINT_BYTES` of a range (at most every
`CHECKPOINT_SECONDS`), and when it ends or fails,
the part file is fsynced and then the ranges' progress is written atomically to the
sidecar ``<dest>.part.ranges`` (JSON: size, validator, ``[start, stop, done]`` per
range; never the URL, which may be signed). A later call with the same destination
and the same file (size and validator) carries on from there; anything else starts
afresh. Verified: every 206 must name the requested span and the probed length and
validator, and the part file must have the probed length before it is renamed onto
``dest``; a failure or cancellation leaves ``dest`` untouched (and the part and sidecar
for the next call). The file host gets no credential: requests go through the caller's
``open_file`` (the channel's credential-free file transport).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import anyio
import attrs

from . import exceptions as exc
from .backoff import exponential
from .destinations import output_error
from .durable import WRITE_BATCH, part_path, sync_folder
from .transport import HttpResponse

if sys.version_info < (3, 11):  # pragma: no cover - anyio depends on the backport there
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "CHECKPOINT_BYTES",
    "CHECKPOINT_SECONDS",
    "RANGE_WRITE",
    "FileExpired",
    "FileUnavailable",
    "OpenFile",
    "Probe",
    "download_ranged",
    "ranges_path",
    "split",
]

CHECKPOINT_BYTES = 16 << 20
"""Bytes of one range fetched between two durable progress records ..."""

CHECKPOINT_SECONDS = 2.0
"""... and seconds, at least, between two records of the download (each fsyncs the part
file: on a fast link, a record per 16 MiB would cost more than the extra connections
gain)."""

RANGE_WRITE = WRITE_BATCH
"""Bytes of one range gathered before one write in a worker thread."""

SIDECAR_VERSION = 1


class FileExpired(Exception):
    """The file host says the URL is no longer valid (403/404/410)."""


class FileUnavailable(Exception):
    """The file host answered 5xx or 408: worth retrying."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Changed(Exception):
    """The file is not the one probed (If-Range answered 200, or another validator)."""


OpenFile = Callable[[str, Mapping[str, str], float], Awaitable[HttpResponse]]
"""``open_file(url, headers, remaining_seconds)``: GET the file with these headers and
no credential; raises `FileExpired`, `FileUnavailable`, a `TransportError` or
`DownloadError`."""


@attrs.frozen
class Probe:
    """What the host said of the file: its length and strong validator."""

    size: int
    validator: str


def ranges_path(dest: Path) -> Path:
    """The progress sidecar of a ranged download to ``dest``."""
    return dest.with_name(dest.name + ".part.ranges")


def split(size: int, parts: int) -> list[list[int]]:
    """``[start, stop, done]`` for ``parts`` near-equal ranges covering ``[0, size)``."""
    bounds = [size * i // parts for i in range(parts + 1)]
    return [[lo, hi, lo] for lo, hi in itertools.pairwise(bounds) if hi > lo]


def header(response: HttpResponse, name: str) -> str | None:
    lowered = name.lower()
    return next((v for k, v in response.headers.items() if k.lower() == lowered), None)


def _validator(response: HttpResponse) -> str | None:
    etag = header(response, "ETag")
    if etag and not etag.startswith("W/"):  # If-Range takes only a strong validator
        return etag
    return header(response, "Last-Modified")


def _content_range(response: HttpResponse) -> tuple[int, int, int] | None:
    """(first, last, total) of a ``bytes first-last/total`` Content-Range."""
    unit, _, spec = (header(response, "Content-Range") or "").partition(" ")
    span, _, total = spec.partition("/")
    first, _, last = span.partition("-")
    if unit != "bytes" or not (first.isdigit() and last.isdigit() and total.isdigit()):
        return None
    return int(first), int(last), int(total)


async def _probe(open_file: OpenFile, url: str, remaining: float) -> Probe | None:
    """Ask for the first byte; None when the host offers no usable ranges."""
    response = await open_file(url, {"Range": "bytes=0-0"}, remaining)
    try:
        found = _content_range(response)
        validator = _validator(response)
        if response.status != 206 or found is None or found[:2] != (0, 0) or not validator:
            return None
        async for _ in response.aiter_bytes():  # the one byte: the connection stays reusable
            pass
        return Probe(found[2], validator)
    finally:
        await response.aclose()


@attrs.define
class _State:
    """One ranged download in progress (shared by its range workers)."""

    dest: Path
    probe: Probe
    ranges: list[list[int]]
    fd: int
    url: str
    refreshes: int = 0
    received: int = 0
    recorded_at: float = attrs.Factory(anyio.current_time)
    lock: anyio.Lock = attrs.Factory(anyio.Lock)

    def record(self) -> None:
        """fsync the data, then write the progress (blocking: run in a thread)."""
        os.fsync(self.fd)
        body = {
            "version": SIDECAR_VERSION,
            "size": self.probe.size,
            "validator": self.probe.validator,
            "ranges": self.ranges,
        }
        sidecar = ranges_path(self.dest)
        temporary = sidecar.with_name(sidecar.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, sidecar)


def _resumable(dest: Path, probe: Probe) -> list[list[int]] | None:
    """The recorded ranges when the sidecar describes this very file and the part file
    is still there with its length; else None."""
    try:
        recorded = json.loads(ranges_path(dest).read_text(encoding="utf-8"))
        if part_path(dest).stat().st_size != probe.size:
            return None
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or (
        recorded.get("version"),
        recorded.get("size"),
        recorded.get("validator"),
    ) != (SIDECAR_VERSION, probe.size, probe.validator):
        return None
    ranges = recorded.get("ranges")
    if not isinstance(ranges, list) or not all(
        isinstance(r, list)
        and len(r) == 3
        and all(type(x) is int for x in r)
        and 0 <= r[0] <= r[2] <= r[1] <= probe.size
        for r in ranges
    ):
        return None
    covered = sorted((r[0], r[1]) for r in ranges)
    if [lo for lo, _ in covered] != [0, *(hi for _, hi in covered[:-1])] or (
        covered and covered[-1][1] != probe.size
    ):
        return None
    return ranges


def _open_part(dest: Path, probe: Probe, ranges: list[list[int]] | None) -> int:
    """The part file's descriptor: the existing one to resume, or a fresh one of the
    file's length (sparse until written)."""
    part = part_path(dest)
    if ranges is not None:
        return os.open(part, os.O_RDWR)
    ranges_path(dest).unlink(missing_ok=True)
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, probe.size)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def download_ranged(
    *,
    open_file: OpenFile,
    url: str,
    dest: Path,
    connections: int,
    refresh_url: Callable[[], Awaitable[str]] | None,
    max_resumes: int,
    max_url_refreshes: int,
    deadline: float,
    on_progress: Callable[[int, int], None],
) -> int | None:
    """Fetch ``url`` into ``dest`` as ``connections`` concurrent ranges (see the module
    docstring); its size in bytes, or None when the host offers no ranges (nothing was
    written: the caller streams the file instead). ``deadline`` is on anyio's clock."""
    for restart in range(3):
        try:
            probe = await _probe(open_file, url, deadline - anyio.current_time())
        except (FileExpired, FileUnavailable, exc.TransportError, exc.DownloadError):
            # The single stream retries, refreshes URLs and reports errors its own way
            # (and an empty file answers a range probe 416).
            probe = None
        if probe is None:
            return None
        try:
            return await _fetch(
                open_file,
                url,
                dest,
                probe,
                connections,
                refresh_url,
                max_resumes,
                max_url_refreshes,
                deadline,
                on_progress,
            )
        except _Changed:
            if restart == 2:
                break
            ranges_path(dest).unlink(missing_ok=True)
    raise exc.DownloadError("the export file kept changing while it was downloaded")


async def _fetch(
    open_file: OpenFile,
    url: str,
    dest: Path,
    probe: Probe,
    connections: int,
    refresh_url: Callable[[], Awaitable[str]] | None,
    max_resumes: int,
    max_url_refreshes: int,
    deadline: float,
    on_progress: Callable[[int, int], None],
) -> int:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        ranges = await anyio.to_thread.run_sync(_resumable, dest, probe)
        fd = await anyio.to_thread.run_sync(_open_part, dest, probe, ranges)
    except OSError as error:
        raise output_error(dest, error) from None
    if ranges is None:
        ranges = split(probe.size, max(1, min(connections, math.ceil(probe.size / RANGE_WRITE))))
    state = _State(dest, probe, ranges, fd, url, received=sum(r[2] - r[0] for r in ranges))
    finished = False
    try:
        try:
            async with anyio.create_task_group() as group:
                for index, span in enumerate(ranges):
                    if span[2] < span[1]:
                        group.start_soon(
                            _range_worker,
                            state,
                            index,
                            open_file,
                            refresh_url,
                            max_resumes,
                            max_url_refreshes,
                            deadline,
                            on_progress,
                        )
        except BaseExceptionGroup as group_error:
            raise _first(group_error) from None
        if any(span[2] != span[1] for span in ranges) or os.fstat(fd).st_size != probe.size:
            raise exc.DownloadError("ranged download ended with bytes missing")
        await _on_disk(dest, lambda: _commit(state))
        finished = True
        return probe.size
    finally:
        if not finished:
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await anyio.to_thread.run_sync(state.record)
            with contextlib.suppress(OSError):
                os.close(fd)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first range's own error (anyio wraps even one in a group)."""
    first: BaseException = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _commit(state: _State) -> None:
    os.fsync(state.fd)
    os.close(state.fd)
    os.replace(part_path(state.dest), state.dest)
    ranges_path(state.dest).unlink(missing_ok=True)
    sync_folder(state.dest.parent)


async def _on_disk(dest: Path, work: Callable[[], object]) -> None:
    try:
        await anyio.to_thread.run_sync(work)
    except OSError as error:
        raise output_error(dest, error) from None


async def _range_worker(
    state: _State,
    index: int,
    open_file: OpenFile,
    refresh_url: Callable[[], Awaitable[str]] | None,
    max_resumes: int,
    max_url_refreshes: int,
    deadline: float,
    on_progress: Callable[[int, int], None],
) -> None:
    """Fetch range ``index`` to its end, resuming from its last byte on disk."""
    span = state.ranges[index]
    resumes = 0
    problem = ""
    while span[2] < span[1]:
        if problem:
            resumes += 1
            if resumes > max_resumes:
                raise exc.DownloadError(f"ranged download failed: {problem}")
            await anyio.sleep(exponential(resumes, base=0.25, cap=5.0))
        url = state.url
        headers = {"Range": f"bytes={span[2]}-{span[1] - 1}", "If-Range": state.probe.validator}
        try:
            response = await open_file(url, headers, deadline - anyio.current_time())
        except FileExpired:
            await _refresh(state, url, refresh_url, max_url_refreshes)
            problem = ""
            continue
        except (exc.TransportError, FileUnavailable) as error:
            problem = _brief(error)
            continue
        try:
            _check_range(response, state.probe, span)
            problem = await _copy(state, span, response, on_progress)
        except exc.TransportError as error:
            problem = _brief(error)
        finally:
            await response.aclose()
        if problem:
            await _record(state)
    await _record(state)


def _check_range(response: HttpResponse, probe: Probe, span: list[int]) -> None:
    if response.status == 200:
        raise _Changed
    found = _content_range(response)
    if found is None or found[0] != span[2] or found[1] != span[1] - 1:
        raise exc.DownloadError(
            f"file host sent a wrong Content-Range {header(response, 'Content-Range')!r}"
        )
    if found[2] != probe.size or _validator(response) not in (None, probe.validator):
        raise _Changed


async def _copy(
    state: _State, span: list[int], response: HttpResponse, on_progress: Callable[[int, int], None]
) -> str:
    """Write the body at its offsets; "" when the range is complete, else what went wrong."""
    batch: list[bytes] = []
    batched = since_record = 0
    async for chunk in response.aiter_bytes():
        room = span[1] - span[2] - batched
        if len(chunk) > room:
            chunk = chunk[:room]
        batch.append(chunk)
        batched += len(chunk)
        if batched >= RANGE_WRITE or span[2] + batched >= span[1]:
            await _write(state, span, batch, batched)
            since_record += batched
            batch, batched = [], 0
            on_progress(state.received, state.probe.size)
            if (
                since_record >= CHECKPOINT_BYTES
                and anyio.current_time() - state.recorded_at >= CHECKPOINT_SECONDS
            ):
                since_record = 0
                await _record(state)
        if span[2] >= span[1]:
            return ""
    if batch:
        await _write(state, span, batch, batched)
        on_progress(state.received, state.probe.size)
    return "" if span[2] >= span[1] else "body ended early"


async def _write(state: _State, span: list[int], batch: list[bytes], size: int) -> None:
    offset = span[2]
    await _on_disk(state.dest, lambda: _write_at(state.fd, batch, offset))
    span[2] += size
    state.received += size


_SEEK_LOCK = threading.Lock()


def _write_at(fd: int, batch: list[bytes], offset: int) -> None:
    """Write ``batch`` at ``offset`` (blocking): ``os.pwritev`` with no copy, else
    ``os.pwrite``, else (Windows) a seek and write under a lock."""
    if len(batch) > 512:  # within every system's IOV_MAX
        batch = [b"".join(batch)]
    if hasattr(os, "pwritev"):
        written = os.pwritev(fd, batch, offset)
        if written == sum(len(part) for part in batch):
            return
        batch, offset = [b"".join(batch)[written:]], offset + written  # a short write
    view = memoryview(b"".join(batch) if len(batch) > 1 else batch[0])
    while view:
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, view, offset)
        else:  # pragma: no cover - Windows
            with _SEEK_LOCK:
                os.lseek(fd, offset, os.SEEK_SET)
                written = os.write(fd, view)
        view, offset = view[written:], offset + written


async def _record(state: _State) -> None:
    async with state.lock:
        await _on_disk(state.dest, state.record)
        state.recorded_at = anyio.current_time()


async def _refresh(
    state: _State,
    stale: str,
    refresh_url: Callable[[], Awaitable[str]] | None,
    max_url_refreshes: int,
) -> None:
    """A fresh URL for every worker, fetched once however many saw the old one expire."""
    async with state.lock:
        if state.url != stale:
            return
        if refresh_url is None or state.refreshes >= max_url_refreshes:
            raise exc.DownloadError(
                f"export file URL expired and {state.refreshes} fresh URLs did not help"
            )
        state.refreshes += 1
        state.url = await refresh_url()


def _brief(error: BaseException) -> str:
    if isinstance(error, FileUnavailable):
        return f"file host answered HTTP {error.status}"
    return str(error)
