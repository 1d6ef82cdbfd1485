"""The sandbox's three aiohttp origins: API, export status, and file host.

Request pipeline on the API and status origins, in the real service's order:
auth -> rate limit (arrival counted) -> latency -> injected faults -> routing/validation.
The file host takes no token: a request carrying ``Auth-Api-Token`` is refused (403) and
counted as a leak, as a storage host would.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import attrs
from aiohttp import web

from .. import reports
from ..exceptions import PortUnavailableError
from ..limits import token_key
from ..wire import TOKEN_HEADER
from . import _data
from ._exports import ExportStore, parse_range
from ._state import Faults, FileRequest, SandboxConfig, SandboxStats

__all__ = ["Sandbox"]

API_PREFIX = "/v1"
STATUS_PREFIX = "/api/public/v1"
STATUS_PATH = STATUS_PREFIX + "/activity/reports/status"
CHUNK = 256 * 1024


class Pacer:
    """Holds one response to ``rate`` bytes per second (`SandboxConfig.file_bandwidth`):
    before each piece of at most 1/20 s worth of bytes, `wait` sleeps until the bytes sent
    so far are due, so the cap holds on short spans too."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.began = clock()
        self.piece = max(1, min(CHUNK, int(rate / 20)))

    async def wait(self, sent: int) -> None:
        ahead = self.began + sent / self.rate - self.clock()
        if ahead > 0:
            await self.sleep(ahead)


ANSWER_CACHE_SIZE = 256
"""Recent report answers kept (bodies of at most `ANSWER_CACHE_MAX_BYTES`): at most 16 MiB."""
ANSWER_CACHE_MAX_BYTES = 64 * 1024

MSG_MISSING = "Unauthorized"
MSG_MISMATCH = "Unauthorized - api token not matching"
MSG_RATE = "Rate limited exceeded"
MSG_NOT_FOUND = "Not found"
MSG_TYPE = "Invalid report - invalid type"
MSG_TOO_LONG = "Invalid report - date range is too long"
MSG_FUTURE = "Invalid report - starting date is a future date"

_PLAIN_FAILURES = {
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Time-out",
}
"""Statuses a proxy in front of the API would answer, with an HTML page."""
_JSON_FAILURES = {500: "Internal Server Error", 408: "Request Timeout", 429: MSG_RATE}


def _json(payload: Any, status: int = 200) -> web.Response:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return web.Response(status=status, body=body, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


async def _listen(
    runner: web.AppRunner, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> None:
    """Bind ``host:port``; a port out of range, in use or not permitted is a
    `PortUnavailableError` naming it, not a bare `OSError`."""
    if not 0 <= port <= 65535:
        raise PortUnavailableError(host, port, "ports go from 0 to 65535")
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except OSError as error:
        # asyncio's message repeats the address; the errno's own text says why.
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise PortUnavailableError(host, port, reason) from None


class _NotFound(Exception):
    """The reference's "general error for malformed request" (404)."""


class _BadReport(Exception):
    """A documented 400."""


def _date(body: dict[str, Any], name: str) -> datetime:
    value = body.get(name)
    if not isinstance(value, str):
        raise _NotFound
    try:
        return reports.parse_datetime(value).replace(microsecond=0)
    except ValueError:
        raise _NotFound from None


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Sandbox:
    """A local simulator of the Activity API on three loopback origins.

    ``async with Sandbox(max_requests=5) as sb:`` then use ``sb.api_url``,
    ``sb.status_url``, ``sb.files_url``; inspect ``sb.stats``; turn ``sb.faults``.
    """

    def __init__(self, config: SandboxConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else SandboxConfig()
        self.config: SandboxConfig = attrs.evolve(base, **overrides) if overrides else base
        self.stats = SandboxStats()
        self.faults = Faults()
        self._store = ExportStore(
            self.config.export_rows, self.config.export_size_bytes, self.config.daily_volume
        )
        self._windows: dict[str, deque[float]] = {}
        self._answers: OrderedDict[tuple[str, ...], bytes] = OrderedDict()
        self._runners: list[web.AppRunner] = []
        self._urls: tuple[str, str, str] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """``http://host:P1/v1`` (https with ``ssl``): users, groups, forms and reports."""
        return self._started()[0]

    @property
    def status_url(self) -> str:
        """``http://host:P2/api/public/v1``: export status polls."""
        return self._started()[1]

    @property
    def files_url(self) -> str:
        """``http://host:P3``: finished export files (never send the token here)."""
        return self._started()[2]

    def _started(self) -> tuple[str, str, str]:
        if self._urls is None:
            raise RuntimeError("the sandbox is not started (use `async with` or start())")
        return self._urls

    async def start(self) -> None:
        """Bind the three origins and create the temp dir for export files.

        Raises `PortUnavailableError` (naming the port) when one cannot be bound."""
        if self._urls is not None:
            return
        self._store.open()
        cfg = self.config
        try:
            ports = []
            for handler, port in (
                (self._api, cfg.api_port),
                (self._status, cfg.status_port),
                (self._file, cfg.files_port),
            ):
                app = web.Application()
                app.router.add_route("*", "/{tail:.*}", self._counted(handler))
                runner = web.AppRunner(app, access_log=None, handle_signals=False)
                await runner.setup()
                self._runners.append(runner)
                await _listen(runner, cfg.host, port, cfg.ssl)
                ports.append(runner.addresses[0][1])
        except BaseException:
            await self.close()
            raise
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        scheme = "https" if cfg.ssl is not None else "http"
        api, status, files = (f"{scheme}://{host}:{p}" for p in ports)
        self._urls = (api + API_PREFIX, status + STATUS_PREFIX, files)

    def _counted(self, handler: _Handler) -> _Handler:
        """Wrap a handler to track how many API/status/file requests are in progress."""

        async def counted(request: web.Request) -> web.StreamResponse:
            stats = self.stats
            stats.in_progress += 1
            stats.max_in_progress = max(stats.max_in_progress, stats.in_progress)
            try:
                return await handler(request)
            finally:
                stats.in_progress -= 1

        return counted

    async def close(self) -> None:
        """Stop serving and delete the export files."""
        self._urls = None
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        await self._store.close()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- helpers for tests -------------------------------------------------------------

    @staticmethod
    def key(token: str) -> str:
        """The stats key of ``token`` (`limits.token_key`)."""
        return token_key(token)

    @staticmethod
    def nps_form_ids() -> frozenset[int]:
        """Form ids that NPS reports accept (the account is the same for every token)."""
        return _data.NPS_FORM_IDS

    def _clock(self) -> float:
        if self.config.clock is not None:
            return self.config.clock()
        return asyncio.get_running_loop().time()

    def _now(self) -> datetime:
        return self.config.now() if self.config.now is not None else datetime.now(timezone.utc)

    # -- the gate: auth, rate limit, latency, faults -------------------------------------

    def _admit(self, key: str, path: str = "") -> bool:
        """Sliding window on arrival: admit and count, or refuse without counting."""
        now = self._clock()
        window = self._windows.setdefault(key, deque())
        while window and window[0] <= now - self.config.window:
            window.popleft()
        if len(window) >= self.config.max_requests:
            return False
        window.append(now)
        self.stats.arrivals.setdefault(key, []).append(now)
        self.stats.paths.setdefault(key, []).append(path)
        self.stats.requests[key] = self.stats.requests.get(key, 0) + 1
        return True

    async def _gate(self, request: web.Request) -> tuple[str, web.StreamResponse | None]:
        """Auth, rate limit, latency and injected faults; a response when they answer."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer is not None:
            self.stats.peers.add(tuple(peer))
        token = request.headers.get(TOKEN_HEADER, "").strip()
        answer: web.StreamResponse | None = None
        key = ""
        if not token:
            self.stats.unauthorized += 1
            answer = _error(401, MSG_MISSING)
        elif self.config.tokens is not None and token not in self.config.tokens:
            self.stats.unauthorized += 1
            answer = _error(401, MSG_MISMATCH)
        else:
            key = token_key(token)
            if not self._admit(key, request.path):
                self.stats.rate_limited += 1
                by_token = self.stats.rate_limited_by_token
                by_token[key] = by_token.get(key, 0) + 1
                answer = _error(429, MSG_RATE)
        if self.config.latency > 0:
            await asyncio.sleep(self.config.latency)
        if answer is not None:
            return key, answer
        path = request.path
        if self.faults.take_drop(path):
            self.stats.errors_injected += 1
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError
        malformed = self.faults.take_malformed(path)
        if malformed is not None:
            self.stats.errors_injected += 1
            return key, web.Response(body=malformed.body, content_type="application/json")
        fail = self.faults.take_fail(path)
        if fail is not None:
            self.stats.errors_injected += 1
            headers = {"Retry-After": fail.retry_after} if fail.retry_after is not None else None
            if fail.status in _PLAIN_FAILURES:
                title = f"{fail.status} {_PLAIN_FAILURES[fail.status]}"
                return key, web.Response(
                    status=fail.status,
                    text=f"<html><head><title>{title}</title></head>"
                    f"<body><h1>{title}</h1></body></html>",
                    content_type="text/html",
                    headers=headers,
                )
            message = _JSON_FAILURES.get(fail.status, f"Error {fail.status}")
            response = _error(fail.status, message)
            if headers:
                response.headers.update(headers)
            return key, response
        return key, None

    # -- API origin --------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        key, answer = await self._gate(request)
        if answer is not None:
            return answer
        path = request.path.rstrip("/")
        try:
            if request.method == "GET" and path == API_PREFIX + "/users":
                return _json(list(_data.USERS))
            if request.method == "GET" and path == API_PREFIX + "/groups":
                return _json(list(_data.GROUPS))
            if request.method == "GET" and path == API_PREFIX + "/forms":
                return _json(list(_data.FORMS))
            if request.method == "POST" and path == API_PREFIX + "/activity/reports":
                return await self._report(request, key)
            raise _NotFound
        except _NotFound:
            return _error(404, MSG_NOT_FOUND)
        except _BadReport as bad:
            return _error(400, str(bad))

    def _report_kind(self, name: str) -> reports.ReportType | reports.ExportKind:
        if name == self.config.workflow_states_type:
            return reports.ReportType.WORKFLOW_STATES
        if name == reports.ReportType.WORKFLOW_STATES.value:
            raise _BadReport(MSG_TYPE)
        for enum in (reports.ReportType, reports.ExportKind):
            try:
                return enum(name)
            except ValueError:
                continue
        raise _BadReport(MSG_TYPE)

    async def _report(self, request: web.Request, key: str) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise _NotFound from None
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            raise _NotFound
        kind = self._report_kind(body["type"])
        start, end = _date(body, "date_from"), _date(body, "date_to")
        if start >= end:
            raise _NotFound
        if reports.range_too_long(start, end):
            raise _BadReport(MSG_TOO_LONG)
        if start > self._now():
            raise _BadReport(MSG_FUTURE)
        params = {k: v for k, v in body.items() if k not in ("type", "date_from", "date_to")}
        try:
            _data.filters_from(params)
        except ValueError:
            raise _NotFound from None
        if kind.needs_form:
            form, category = params.get("form"), params.setdefault("nps_category", "all")
            if (
                not isinstance(form, int)
                or isinstance(form, bool)
                or form not in _data.NPS_FORM_IDS
            ):
                raise _NotFound
            if category not in {c.value for c in reports.NpsCategory}:
                raise _NotFound
        if isinstance(kind, reports.ExportKind):
            job = self._store.start(
                key,
                kind.value,
                start,
                end,
                params,
                self._clock(),
                self.faults.take_job_failure(),
                self._now(),
            )
            self.stats.exports_started += 1
            return _json({"status": "pending", "url": None, "token": job.report_token})
        return self._answer(kind, key, start, end, params)

    def _answer(
        self,
        kind: reports.ReportType,
        key: str,
        start: datetime,
        end: datetime,
        params: dict[str, Any],
    ) -> web.Response:
        """The report's JSON, from a small LRU of recent answers: the same request in the
        same second of "now" gets the same bytes (clients repeat requests; a benchmark
        measures the HTTP path, not the arithmetic)."""
        now = self._now().replace(microsecond=0)
        cache_key = (
            kind.value,
            key,
            start.isoformat(),
            end.isoformat(),
            json.dumps(params, sort_keys=True, default=str),
            now.isoformat(),
        )
        body = self._answers.get(cache_key)
        if body is None:
            body = _data.report_body(
                kind, key, start, end, params, now=now, volume=self.config.daily_volume
            )
            if len(body) <= ANSWER_CACHE_MAX_BYTES:
                self._answers[cache_key] = body
                if len(self._answers) > ANSWER_CACHE_SIZE:
                    self._answers.popitem(last=False)
        else:
            self._answers.move_to_end(cache_key)
        return web.Response(body=body, content_type="application/json")

    # -- status origin -----------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.StreamResponse:
        key, answer = await self._gate(request)
        if answer is not None:
            return answer
        if request.method != "GET" or request.path.rstrip("/") != STATUS_PATH:
            return _error(404, MSG_NOT_FOUND)
        report_token = request.query.get("token", "")
        polls = self.stats.status_polls
        polls[report_token] = polls.get(report_token, 0) + 1
        job = self._store.jobs.get(report_token)
        if job is None or job.owner != key:
            return _error(404, MSG_NOT_FOUND)
        return _json(
            self._store.status(
                job,
                self._clock(),
                self.config.export_pending_seconds,
                self.faults.never_complete,
                self.files_url,
            )
        )

    # -- file origin -------------------------------------------------------------------

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.stats.file_requests += 1
        if TOKEN_HEADER in request.headers:
            self.stats.leaks += 1
            return web.Response(status=403, text="Forbidden: this host takes no API token\n")
        parts = request.path.strip("/").split("/")
        if request.method not in ("GET", "HEAD") or len(parts) != 3 or parts[0] != "files":
            return web.Response(status=404, text="Not Found\n")
        url_id, name = parts[1], parts[2]
        export = self._store.lookup(url_id, name)
        if export is None:
            return web.Response(status=404, text="Not Found\n")
        if self._store.expired(url_id) or self.faults.take_expire():
            if not self._store.expired(url_id):
                self.stats.errors_injected += 1
                self._store.expire(url_id)
            return web.Response(status=410, text="Gone: this link has expired\n")
        first, stop, status = 0, export.size, 200
        headers = {"Content-Type": "text/csv", "ETag": export.etag}
        wanted = request.headers.get("Range")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.stats.file_log.append(
            FileRequest(request.path, wanted, tuple(peer) if peer is not None else None)
        )
        if_range = request.headers.get("If-Range")
        if self.faults.ranges:
            headers["Accept-Ranges"] = "bytes"
            if wanted is not None and (if_range is None or if_range == export.etag):
                parsed = parse_range(wanted, export.size)
                if parsed == "unsatisfiable":
                    return web.Response(
                        status=416, headers={"Content-Range": f"bytes */{export.size}"}
                    )
                if parsed is not None:
                    first, stop = parsed
                    status = 206
                    headers["Content-Range"] = f"bytes {first}-{stop - 1}/{export.size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = stop - first
        cut = self.faults.take_download_cut()
        if cut is not None:
            self.stats.errors_injected += 1
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        await self._stream(request, response, export.path, first, stop, cut)
        return response

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        path: os.PathLike[str],
        first: int,
        stop: int,
        cut: int | None,
    ) -> None:
        """Send bytes [first, stop) of ``path`` in chunks; close the connection after
        ``cut`` bytes when a download fault is armed."""
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        rate = self.config.file_bandwidth
        pacer = None if rate is None else Pacer(rate, asyncio.get_running_loop().time)
        piece = CHUNK if pacer is None else pacer.piece
        try:
            offset, sent = first, 0
            while offset < stop:
                if pacer is not None:
                    await pacer.wait(sent)
                size = min(piece, stop - offset)
                if cut is not None:
                    size = min(size, cut - sent)
                if size <= 0:
                    break
                data = await asyncio.to_thread(os.pread, fd, size, offset)
                if not data:
                    break
                await response.write(data)
                offset += len(data)
                sent += len(data)
                self.stats.bytes_served += len(data)
        finally:
            os.close(fd)
        if cut is not None and offset < stop:
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError
        await response.write_eof()
