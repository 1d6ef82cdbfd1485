"""`LexerClient`: one aiohttp session, one rate limiter per token, every endpoint.

The I/O lives here; what to send and how to read the answer live in `wire` and `reports`.
Every request of a token goes through that token's limiter (shared in the process via a
`LimiterRegistry`) and the retry loop in `LexerClient.send`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import unicodedata
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import anyio
import attrs
from aiohttp.http_exceptions import HttpProcessingError

from . import exceptions as exc
from . import exports, wire
from . import models as m
from ._version import __version__
from .events import Event, EventHook, RateLimited, RateLimitWait, RequestSent, Retrying
from .limits import (
    DEFAULT_MAX_REQUESTS,
    DEFAULT_WINDOW,
    Limiter,
    LimiterRegistry,
    LimiterStats,
    default_registry,
    token_key,
)
from .reports import (
    DEFAULT_WORKFLOW_STATES_TYPE,
    ExportKind,
    NpsCategory,
    ReportType,
    build_report_body,
)
from .retry import RetryPolicy, is_retryable

__all__ = ["LexerClient", "api_session", "DEFAULT_API_URL", "DEFAULT_STATUS_URL"]

log = logging.getLogger("lexer_activity_async")

DEFAULT_API_URL = "https://api.lexer.io/v1"
DEFAULT_STATUS_URL = "https://clients.lexer.io/api/public/v1"
DEFAULT_TIMEOUT = 60.0
TOKEN_ENV = "LEXER_API_TOKEN"
API_URL_ENV = "LEXER_API_URL"
STATUS_URL_ENV = "LEXER_STATUS_URL"

REDACTED_TEXT = "<redacted>"
REDACTED = REDACTED_TEXT.encode()

T = TypeVar("T")
Decoder = Callable[[int, bytes], T]


class _Secret:
    """Holds the API token; its repr and str never show it, and `redact` removes it from
    whatever a server sends back (a body or header that echoes it)."""

    __slots__ = ("_forms", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        raw = value.encode()
        escaped = json.dumps(value)[1:-1].encode()  # as it appears inside a JSON string
        self._forms = (raw,) if escaped == raw else (raw, escaped)

    def reveal(self) -> str:
        return self._value

    def redact(self, data: bytes) -> bytes:
        """``data`` with every occurrence of the token replaced by ``<redacted>``."""
        for form in self._forms:
            if form in data:
                data = data.replace(form, REDACTED)
        return data

    def redact_text(self, text: str) -> str:
        return text.replace(self._value, REDACTED_TEXT) if self._value in text else text

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


def api_session(
    *, connections: int = 100, timeout: float = DEFAULT_TIMEOUT
) -> aiohttp.ClientSession:
    """A session for the API and status hosts, as a client makes for itself: up to
    ``connections`` kept-alive connections, no cookies (the token authenticates each
    request, so nothing of one token's should ride along with another's), and
    aiohttp's silent resend of a GET switched off (see `LexerClient.open`). Pass one to
    many clients (``session=``) to share connections between tokens, as backfills do."""
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout),
        connector=aiohttp.TCPConnector(limit=connections, ttl_dns_cache=300),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": f"lexer-activity-async/{__version__}"},
    )
    _no_silent_resend(session)
    return session


def files_session() -> aiohttp.ClientSession:
    """The session for export files, which live on a storage host: no default headers, no
    cookies (per-request deadlines come from `exports.DownloadPolicy`)."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",)
    )


def _no_silent_resend(session: aiohttp.ClientSession) -> None:
    """Switch off aiohttp's silent resend of a GET when a kept-alive connection drops (the
    server would see two requests for one limiter slot). Its only switch is private, so a
    release without it is refused rather than run without the guarantee."""
    if not isinstance(session, aiohttp.ClientSession):
        return  # a stand-in for aiohttp's session: it has no resend of its own
    if not hasattr(session, "_retry_connection"):
        raise exc.ConfigurationError(
            f"aiohttp {aiohttp.__version__} has no switch for its silent resend of a"
            " request on a dropped connection, so the rate limit could not be kept;"
            " install aiohttp>=3.11"
        )
    session._retry_connection = False


class LexerClient:
    """Async client for the Activity API, for one API token.

    Use as ``async with LexerClient(token) as client:`` (or call `aclose`). It owns an
    aiohttp session unless one is passed in, which it then never closes. Many calls may
    run concurrently; all requests of the token share one limiter with every other client
    of the same token in the process, so the server never sees more than ``max_requests``
    of them in any ``window`` seconds.

    Args:
        token: the API token; else ``$LEXER_API_TOKEN``.
        label: a name for the token in logs, events and stats (never the token itself);
            default ``token-<first 8 hex of its SHA-256>``.
        api_url, status_url: base URLs; else ``$LEXER_API_URL`` / ``$LEXER_STATUS_URL``
            or the published hosts.
        session: an aiohttp session to use instead of creating one.
        timeout: seconds for one attempt (connect, send and read).
        retry: retries and the per-call deadline (`RetryPolicy`).
        max_requests, window: the rate limit (100 per 300 s).
        registry: where the per-token limiters live (default: process-wide).
        max_in_flight: at most this many requests of this client on the wire at once; pass
            one `anyio.CapacityLimiter` (or any async context manager entered around each
            attempt) to several clients to cap them together. Waiting on the rate limit
            does not hold one.
        redis_url: share the token's limit with every process and host using this Redis
            (see `limits_redis`); unreachable Redis raises `LimiterBackendError`.
        limit_store: keep the token's limit in this local SQLite file (see `limits_sqlite`),
            so it survives restarts and is shared by the host's processes; an unusable
            file raises `LimitStoreError` when the client opens.
        workflow_states_type: the report type name used for workflow-state totals
            (unpublished; see the README's "Known API ambiguities").
        on_event: called with `events` (rate-limit waits, 429s, retries, exports).
        now: wall clock used to validate ``date_from`` (not in the future).
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        label: str | None = None,
        api_url: str | None = None,
        status_url: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        window: float = DEFAULT_WINDOW,
        registry: LimiterRegistry | None = None,
        redis_url: str | None = None,
        limit_store: str | os.PathLike[str] | None = None,
        max_in_flight: int | contextlib.AbstractAsyncContextManager[object] | None = None,
        workflow_states_type: str = DEFAULT_WORKFLOW_STATES_TYPE,
        on_event: EventHook | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not token or not token.strip():
            raise exc.ConfigurationError(
                f"no API token: pass token=... to LexerClient or set ${TOKEN_ENV}"
            )
        token = token.strip()
        if any(unicodedata.category(char) == "Cc" for char in token):
            # Never echo it: the message says what is wrong, not what the token is.
            raise exc.ConfigurationError(
                "the API token contains a control character (a line break, tab or similar): "
                "check how it was pasted or stored"
            )
        if not timeout > 0:
            raise exc.ConfigurationError("timeout must be positive")
        if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
            raise exc.ConfigurationError("max_requests must be an integer of at least 1")
        if not 0 < window < math.inf:
            raise exc.ConfigurationError("window must be a positive number of seconds")
        self._token = _Secret(token)
        self.label = label or f"token-{token_key(self._token.reveal())[:8]}"
        self.api_url = (api_url or os.environ.get(API_URL_ENV) or DEFAULT_API_URL).rstrip("/")
        self.status_url = (
            status_url or os.environ.get(STATUS_URL_ENV) or DEFAULT_STATUS_URL
        ).rstrip("/")
        for name, url in (("api_url", self.api_url), ("status_url", self.status_url)):
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
                raise exc.ConfigurationError(f"{name} must be an http(s) URL, got {url!r}")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_requests = max_requests
        self.window = window
        self.workflow_states_type = workflow_states_type
        if redis_url is not None and registry is not None:
            raise exc.ConfigurationError("pass either redis_url or registry, not both")
        if limit_store is not None and (redis_url is not None or registry is not None):
            raise exc.ConfigurationError("pass one of limit_store, redis_url and registry")
        self.redis_url = redis_url
        self.limit_store = limit_store
        self._registry = registry or default_registry
        self._on_event = on_event
        if isinstance(max_in_flight, int):
            max_in_flight = anyio.CapacityLimiter(max_in_flight)
        # Taken after the rate-limit slot, so waiting on the rate limit never holds one.
        self._in_flight: contextlib.AbstractAsyncContextManager[object] = (
            max_in_flight if max_in_flight is not None else contextlib.nullcontext()
        )
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._session = session
        self._owns_session = session is None
        self._files_session: aiohttp.ClientSession | None = None
        self._limiter: Limiter | None = None
        self._closed = False
        self._warned_retry_after = False

    def __repr__(self) -> str:
        return (
            f"LexerClient(label={self.label!r}, api_url={self.api_url!r}, "
            f"status_url={self.status_url!r}, token=<redacted>)"
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> LexerClient:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Create the session (if not given) and bind the token's limiter. Idempotent."""
        if self._closed:
            raise exc.ClientClosedError("this LexerClient is closed; create a new one")
        if self._limiter is not None:
            return
        opened: list[aiohttp.ClientSession] = []
        try:
            if self._session is None:
                self._session = api_session(timeout=self.timeout)
                opened.append(self._session)
            _no_silent_resend(self._session)  # a caller's session too
            if self._files_session is None:
                self._files_session = files_session()
                opened.append(self._files_session)
            if self.redis_url is not None:
                from .limits_redis import check_redis, shared_registry

                await check_redis(self.redis_url)  # unreachable: a clear error, no fall-back
                # A slot's lease must outlive the longest attempt, or it could free too early.
                self._registry = shared_registry(self.redis_url, lease_timeout=self.timeout + 5.0)
            elif self.limit_store is not None:
                from .limits_sqlite import store_registry

                self._registry = store_registry(self.limit_store, lease_timeout=self.timeout + 5.0)
            self._limiter = self._registry.get(
                self._token.reveal(), max_requests=self.max_requests, window=self.window
            )
        except BaseException:
            # Nothing half-open is left behind (a failed `async with` never calls aexit).
            for session in opened:
                await session.close()
            if self._session in opened:
                self._session = None
            if self._files_session in opened:
                self._files_session = None
            raise

    async def aclose(self) -> None:
        """Close the owned session. A closed client cannot be used again."""
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()
        if self._files_session is not None:
            await self._files_session.close()
        self._session = self._files_session = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def limiter(self) -> Limiter:
        if self._limiter is None:
            raise exc.ClientClosedError("this LexerClient is not open; use `async with`")
        return self._limiter

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise exc.ClientClosedError("this LexerClient is not open; use `async with`")
        return self._session

    @property
    def files_session(self) -> aiohttp.ClientSession:
        """The credential-free session used only for export files."""
        if self._files_session is None:
            raise exc.ClientClosedError("this LexerClient is not open; use `async with`")
        return self._files_session

    @property
    def stats(self) -> LimiterStats:
        """A snapshot of this token's counters (shared by its clients in the process)."""
        return attrs.evolve(self.limiter.stats)

    # -- the one request path ----------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def _on_wait(self, seconds: float) -> None:
        until = datetime.now(timezone.utc) + timedelta(seconds=seconds)
        self._emit(RateLimitWait(self.label, seconds, until))

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """A rate-limit slot; a `RequestSent` event once it is taken."""
        async with self.limiter.slot(self._on_wait):
            self._emit(RequestSent(self.label))
            yield

    def _url(self, request: wire.Request) -> str:
        base = self.api_url if request.origin == "api" else self.status_url
        return base + request.path

    @property
    def max_retry_after(self) -> float:
        """The longest pause a 429's Retry-After may impose (`RetryPolicy.max_retry_after`,
        else the window)."""
        limit = self.retry.max_retry_after
        return self.window if limit is None else limit

    def _check_retry_after(self, error: exc.RateLimitedError, headers: dict[str, str]) -> None:
        """Warn, once per client, of a Retry-After that was sent but is unusable."""
        unusable = error.retry_after is None and wire.retry_after_header(headers) is not None
        if unusable and not self._warned_retry_after:
            self._warned_retry_after = True
            log.warning(
                "429 for token %s came with an unusable Retry-After (not a delay in "
                "seconds or an HTTP date); treating it as absent",
                self.label,
            )

    def _headers(self, request: wire.Request) -> dict[str, str]:
        headers = {wire.TOKEN_HEADER: self._token.reveal(), "Accept": "application/json"}
        if request.json is not None:
            headers["Content-Type"] = "application/json"
        return headers

    async def _exchange(self, request: wire.Request) -> tuple[int, dict[str, str], bytes]:
        """One HTTP exchange inside a limiter slot (`_http` returns before the slot is
        released, so a failing release never has the response in its frames)."""
        async with self._slot(), self._in_flight:
            return await self._http(request)

    async def _http(self, request: wire.Request) -> tuple[int, dict[str, str], bytes]:
        """Send ``request`` and read the whole answer. Redirects are not followed, so the
        token is never carried to another host. Whatever the server echoes of the token
        (in the body or a header) is redacted here, before anything reads it."""
        async with self.session.request(
            request.method,
            self._url(request),
            data=None if request.json is None else json.dumps(request.json).encode(),
            params=request.params,
            headers=self._headers(request),
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        ) as response:
            body = await response.read()
            headers = {
                key: self._token.redact_text(value) for key, value in response.headers.items()
            }
            return response.status, headers, self._token.redact(body)

    async def _attempt(self, request: wire.Request) -> tuple[int, dict[str, str], bytes]:
        """`_exchange`, with every aiohttp and OS error mapped to a `TransportError`.

        aiohttp's errors hold the request's headers, token included (``request_info``),
        so none is kept as a cause or context: the typed error is raised outside the
        handler, and no frame in its traceback holds the request or the response."""
        failure: exc.LexerError
        origin = request.origin
        try:
            return await self._exchange(request)
        except exc.LexerError as error:  # e.g. the limiter's backend failed meanwhile
            if _cut_transport_context(error):
                # The frames it passed (the slot's exit) hold the aiohttp error too.
                raise error.with_traceback(None)  # noqa: B904 - the cause is cut on purpose
            raise
        except asyncio.TimeoutError:  # aiohttp's connect/read timeouts included
            failure = exc.LexerTimeoutError(
                f"no complete answer from the {origin} host within {self.timeout:g}s",
                report_type=request.report_type,
            )
        except aiohttp.ClientConnectorError as error:
            failure = exc.LexerConnectionError(
                f"cannot connect to {origin} host: "
                + self._token.redact_text(str(error.os_error or error)),
                report_type=request.report_type,
                request_sent=False,
            )
        except (aiohttp.ClientResponseError, HttpProcessingError) as error:
            failure = exc.MalformedResponseError(
                f"malformed HTTP response from the {origin} host: "
                + self._token.redact_text(_parser_complaint(error)),
                report_type=request.report_type,
            )
        except (aiohttp.ClientError, OSError) as error:
            failure = exc.LexerConnectionError(
                f"connection to the {origin} host failed: {type(error).__name__}",
                report_type=request.report_type,
            )
        raise failure

    async def send(
        self,
        request: wire.Request,
        decode: Decoder[T],
        *,
        idempotent: bool = True,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> T:
        """Send ``request`` under the limiter with retries, and decode its answer.

        ``max_retries`` and ``deadline`` override the client's `RetryPolicy` for this call.
        """
        if self._closed:
            raise exc.ClientClosedError("this LexerClient is closed; create a new one")
        await self.open()
        policy = self.retry
        retries = policy.max_retries if max_retries is None else max_retries
        limit = policy.deadline if deadline is None else deadline
        if limit is None:  # no deadline: skip the cancel scope (it costs ~10% per call)
            return await self._send_with_retries(request, decode, idempotent, retries)
        try:
            with anyio.fail_after(limit):
                return await self._send_with_retries(request, decode, idempotent, retries)
        except TimeoutError:
            pass
        # Raised outside the handler: the cancelled attempt is no part of its context.
        raise exc.LexerTimeoutError(
            f"call exceeded its deadline of {limit:g}s", report_type=request.report_type
        )

    async def _send_with_retries(
        self, request: wire.Request, decode: Decoder[T], idempotent: bool, retries: int
    ) -> T:
        attempt = rate_limited = 0
        while True:
            error: exc.LexerError
            try:
                status, headers, body = await self._attempt(request)
            except (exc.LexerConnectionError, exc.LexerTimeoutError) as transport_error:
                error = transport_error
            else:
                if 200 <= status < 300:
                    return decode(status, body)
                error = wire.map_error(
                    status,
                    body,
                    headers,
                    report_type=request.report_type,
                    now=self._now,
                    max_retry_after=self.max_retry_after,
                )
            if isinstance(error, exc.RateLimitedError):
                self._check_retry_after(error, headers)
                await self.limiter.penalize(error.retry_after)
                self.limiter.stats.rate_limited += 1
                log.warning(
                    "429 rate limited for token %s; holding its requests for %s",
                    self.label,
                    f"{error.retry_after:g}s (Retry-After)"
                    if error.retry_after is not None
                    else f"a full window ({self.window:g}s)",
                )
                self._emit(RateLimited(self.label, error.retry_after))
                rate_limited += 1
                if rate_limited > self.retry.max_rate_limited:
                    raise error
                continue
            if attempt >= retries or not is_retryable(error, idempotent=idempotent):
                raise error
            attempt += 1
            self.limiter.stats.retries += 1
            delay = self.retry.backoff(attempt)
            log.info(
                "retrying %s for token %s after %s (attempt %d, in %.2fs)",
                request.report_type or request.path,
                self.label,
                type(error).__name__,
                attempt,
                delay,
            )
            self._emit(Retrying(self.label, attempt, delay, type(error).__name__))
            await anyio.sleep(delay)

    # -- lists -------------------------------------------------------------------------

    async def users(
        self, *, max_retries: int | None = None, deadline: float | None = None
    ) -> list[m.User]:
        """``GET /v1/users``: the account's users (their ids filter reports: ``users=``)."""
        return await self.send(
            wire.users_request(),
            _list_decoder(m.User),
            max_retries=max_retries,
            deadline=deadline,
        )

    async def groups(
        self, *, max_retries: int | None = None, deadline: float | None = None
    ) -> list[m.Group]:
        """``GET /v1/groups``: the account's groups (their ids filter reports: ``groups=``)."""
        return await self.send(
            wire.groups_request(),
            _list_decoder(m.Group),
            max_retries=max_retries,
            deadline=deadline,
        )

    async def forms(
        self, *, max_retries: int | None = None, deadline: float | None = None
    ) -> list[m.Form]:
        """``GET /v1/forms``: the account's forms; those with ``nps`` set are the NPS
        surveys that NPS reports and exports take as ``form=``."""
        return await self.send(
            wire.forms_request(),
            _list_decoder(m.Form),
            max_retries=max_retries,
            deadline=deadline,
        )

    # -- reports -----------------------------------------------------------------------

    def resolve_report_type(self, report_type: ReportType | str) -> tuple[ReportType, str]:
        """The decoding kind and the wire name of a report type, or `ValidationError`."""
        if isinstance(report_type, ReportType):
            kind = report_type
        elif report_type == self.workflow_states_type:
            kind = ReportType.WORKFLOW_STATES
        elif report_type in {k.value for k in ExportKind}:
            raise exc.ValidationError(
                f"{report_type!r} is an export; use client.export() or start_export()"
            )
        else:
            try:
                kind = ReportType(report_type)
            except ValueError:
                known = sorted(
                    {k.value for k in ReportType} - {DEFAULT_WORKFLOW_STATES_TYPE}
                    | {self.workflow_states_type}
                )
                raise exc.ValidationError(
                    f"unknown report type {report_type!r}; known: {', '.join(known)}"
                ) from None
            if kind is ReportType.WORKFLOW_STATES:  # "states" while overridden elsewhere
                raise exc.ValidationError(
                    f"workflow-state totals use the type {self.workflow_states_type!r} "
                    "on this client"
                )
        name = self.workflow_states_type if kind is ReportType.WORKFLOW_STATES else kind.value
        return kind, name

    async def report(
        self,
        report_type: ReportType | str,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        form: int | None = None,
        nps_category: NpsCategory | str | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> Any:
        """Fetch any report; the typed methods below all come through here.

        Input is validated before anything is sent or any rate-limit slot is taken.

        Args:
            report_type: a `ReportType` or its name (``summary``, ``nps_volume``, ...).
            date_from, date_to: timezone-aware; at most 12 months apart.
            users, groups: only these user / group ids (from `users` / `groups`).
            forms: only these form ids (from `forms`); not for NPS reports.
            form: NPS reports only, and required there: the NPS survey's id.
            nps_category: NPS reports only: all (default), promoters, passives or
                detractors.
            extra_filters: further body fields, sent verbatim (strict JSON values). The
                names above, and type/date_from/date_to, are refused here.
            max_retries, deadline: override the client's `RetryPolicy` for this call.
        """
        kind, name = self.resolve_report_type(report_type)
        body = build_report_body(
            name,
            date_from,
            date_to,
            needs_form=kind.needs_form,
            form=form,
            nps_category=nps_category,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            now=self._now(),
        )
        tz = date_from.tzinfo or timezone.utc

        def decode(status: int, raw: bytes) -> Any:
            return wire.decode_report(kind, status, raw, tz=tz, report_type=name)

        return await self.send(
            wire.report_request(body), decode, max_retries=max_retries, deadline=deadline
        )

    # The typed methods share one keyword-only signature (NPS ones add form and
    # nps_category) so a misspelt filter is a TypeError, never an unfiltered answer.

    async def summary(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> m.Summary:
        """``summary``: team-wide handling metrics. Filters as in `report`."""
        result: m.Summary = await self.report(
            ReportType.SUMMARY,
            date_from,
            date_to,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def states_volume(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> m.StatesVolume:
        """``states_volume``: messages per workflow state per day (hourly under 4 days).
        Filters as in `report`."""
        result: m.StatesVolume = await self.report(
            ReportType.STATES_VOLUME,
            date_from,
            date_to,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def workflow_states(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> list[m.WorkflowState]:
        """Workflow-state totals (type name: ``workflow_states_type``, default ``states``).
        Filters as in `report`."""
        result: list[m.WorkflowState] = await self.report(
            ReportType.WORKFLOW_STATES,
            date_from,
            date_to,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def classifications(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> list[m.Classification]:
        """``classifications``: messages per classification and workflow state. Filters as
        in `report`."""
        result: list[m.Classification] = await self.report(
            ReportType.CLASSIFICATIONS,
            date_from,
            date_to,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def response_volume(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> m.ResponseVolume:
        """``response_volume``: average response time per day (hourly for 3 days or less).
        Filters as in `report`."""
        result: m.ResponseVolume = await self.report(
            ReportType.RESPONSE_VOLUME,
            date_from,
            date_to,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def user_summary(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> list[m.UserSummary]:
        """``user_summary`` (Team Summary): each agent's metrics. Filters as in `report`."""
        result: list[m.UserSummary] = await self.report(
            ReportType.USER_SUMMARY,
            date_from,
            date_to,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def user_volume(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> list[m.UserVolume]:
        """``user_volume`` (Team Volume): each agent's messages by workflow state. Filters
        as in `report`."""
        result: list[m.UserVolume] = await self.report(
            ReportType.USER_VOLUME,
            date_from,
            date_to,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def case_summary(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> m.CaseSummary:
        """``case_summary``: case handling metrics. Filters as in `report`."""
        result: m.CaseSummary = await self.report(
            ReportType.CASE_SUMMARY,
            date_from,
            date_to,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def case_volume(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> m.CaseVolume:
        """``case_volume``: open cases per day. Filters as in `report`."""
        result: m.CaseVolume = await self.report(
            ReportType.CASE_VOLUME,
            date_from,
            date_to,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def case_classifications(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> list[m.CaseClassification]:
        """``case_classifications``: classifications counted once per case. Filters as in
        `report`."""
        result: list[m.CaseClassification] = await self.report(
            ReportType.CASE_CLASSIFICATIONS,
            date_from,
            date_to,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def nps_summary(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        form: int,
        nps_category: NpsCategory | str = NpsCategory.ALL,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> m.NpsSummary:
        """``nps_summary`` for the NPS survey ``form`` (an id from `forms`). Filters as in
        `report`."""
        result: m.NpsSummary = await self.report(
            ReportType.NPS_SUMMARY,
            date_from,
            date_to,
            form=form,
            nps_category=nps_category,
            users=users,
            groups=groups,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    async def nps_volume(
        self,
        date_from: datetime,
        date_to: datetime,
        *,
        form: int,
        nps_category: NpsCategory | str = NpsCategory.ALL,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
    ) -> list[m.NpsDay]:
        """``nps_volume``: NPS counts per local day for the NPS survey ``form`` (an id
        from `forms`). Filters as in `report`."""
        result: list[m.NpsDay] = await self.report(
            ReportType.NPS_VOLUME,
            date_from,
            date_to,
            form=form,
            nps_category=nps_category,
            users=users,
            groups=groups,
            extra_filters=extra_filters,
            max_retries=max_retries,
            deadline=deadline,
        )
        return result

    # -- exports (see `exports` for the pipeline) ------------------------------------------

    async def start_export(
        self,
        kind: ExportKind | str,
        date_from: datetime,
        date_to: datetime,
        *,
        form: int | None = None,
        nps_category: NpsCategory | str | None = None,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
    ) -> m.ExportJob:
        """Start an export job (at most 12 months); returns it with its report token.
        ``form`` (required for nps_submissions) and the filters are as in `report`."""
        return await exports.start_export(
            self,
            kind,
            date_from,
            date_to,
            form=form,
            nps_category=nps_category,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
        )

    async def export_status(self, report_token: str) -> m.ExportJob:
        """Poll an export job once (status host)."""
        return await exports.export_status(self, report_token)

    async def wait_for_export(
        self, job: m.ExportJob, *, poll: exports.PollPolicy | None = None
    ) -> m.ExportJob:
        """Poll until the job is complete (with backoff); raises on failure or timeout."""
        return await exports.wait_for_export(self, job, poll=poll)

    async def download_export(
        self,
        job: m.ExportJob,
        dest: str | os.PathLike[str],
        *,
        policy: exports.DownloadPolicy | None = None,
    ) -> int:
        """Stream a complete job's CSV to ``dest`` atomically; returns its size."""
        return await exports.download(self, job, dest, policy=policy)

    async def export(
        self,
        kind: ExportKind | str,
        date_from: datetime,
        date_to: datetime,
        dest: str | os.PathLike[str],
        *,
        form: int | None = None,
        nps_category: NpsCategory | str | None = None,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        window_months: int = 1,
        merge: bool = True,
        poll: exports.PollPolicy | None = None,
        policy: exports.DownloadPolicy | None = None,
    ) -> exports.ExportResult:
        """Start, wait for and download an export to ``dest``; past 12 months the range is
        split into windows of ``window_months``, merged into ``dest`` (``merge=True``) or
        written one file per window. ``form`` and the filters are as in `report`."""
        return await exports.export(
            self,
            kind,
            date_from,
            date_to,
            dest,
            form=form,
            nps_category=nps_category,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            window_months=window_months,
            merge=merge,
            poll=poll,
            policy=policy,
        )

    def export_rows(
        self,
        kind: ExportKind | str,
        date_from: datetime,
        date_to: datetime,
        *,
        form: int | None = None,
        nps_category: NpsCategory | str | None = None,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        poll: exports.PollPolicy | None = None,
        policy: exports.DownloadPolicy | None = None,
    ) -> AsyncIterator[dict[str, str]]:
        """``async for row in client.export_rows(...)``: an export (at most 12 months)
        parsed as its CSV streams, nothing written to disk. Arguments as in `export`."""
        return exports.export_rows(
            self,
            kind,
            date_from,
            date_to,
            form=form,
            nps_category=nps_category,
            users=users,
            groups=groups,
            forms=forms,
            extra_filters=extra_filters,
            poll=poll,
            policy=policy,
        )


def _cut_transport_context(error: BaseException) -> bool:
    """Detach any aiohttp error (it holds the request's headers) from ``error``'s chain;
    True when there was one."""
    cut = False
    link: BaseException | None = error
    seen: list[BaseException] = []
    while link is not None and not any(link is s for s in seen):
        seen.append(link)
        for attr in ("__cause__", "__context__"):
            if isinstance(getattr(link, attr), (aiohttp.ClientError, HttpProcessingError)):
                setattr(link, attr, None)
                cut = True
        link = link.__cause__ or link.__context__
    return cut


def _parser_complaint(error: BaseException) -> str:
    """What aiohttp's parser objected to ("Bad status line", "Invalid character in
    Content-Length", ...): the text before its quote of the offending bytes."""
    message = getattr(error, "message", None)
    text = message if isinstance(message, str) and message else type(error).__name__
    return text.splitlines()[0].partition(":")[0].strip()[:100] or type(error).__name__


def _list_decoder(cls: type[T]) -> Decoder[list[T]]:
    def decode(status: int, body: bytes) -> list[T]:
        return wire.decode_list(cls, status, body)

    return decode
