"""`LexerClient`: the façade over one token's `Channel` (transport, limiter, retries).

It validates its configuration, opens and closes the sessions, and turns each endpoint
into a `wire.Request` and a decoder (the report kinds come from `kinds`). Sending lives
in `transport`, the export pipeline in `exports`; neither imports this module.
"""

from __future__ import annotations

import contextlib
import os
import ssl as ssl_module
import types
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, cast, overload
from urllib.parse import urlsplit

import aiohttp
import anyio
import attrs

from . import exceptions as exc
from . import exports, wire
from . import models as m
from .events import EventHook
from .instrumentation import InstrumentationOption
from .instrumentation import resolve as resolve_instrumentation
from .kinds import REPORT_KINDS, RawReport, ReportKind, ReportResult, Reports
from .limits import (
    DEFAULT_MAX_REQUESTS,
    DEFAULT_WINDOW,
    Limiter,
    LimiterRegistry,
    LimiterStats,
    Priority,
    check_limit,
    check_priority,
    default_registry,
    token_key,
)
from .network import Network, network
from .reports import (
    DEFAULT_WORKFLOW_STATES_TYPE,
    ExportKind,
    NpsCategory,
    ReportType,
    build_report_body,
)
from .retry import RetryPolicy
from .transport import (
    DEFAULT_TIMEOUT,
    LEASE_MARGIN,
    AiohttpTransport,
    Channel,
    Decoder,
    Transport,
    api_session,
    files_session,
    no_silent_resend,
)
from .transport import Secret as _Secret

__all__ = ["LexerClient", "api_session", "files_session", "DEFAULT_API_URL", "DEFAULT_STATUS_URL"]

DEFAULT_API_URL = "https://api.lexer.io/v1"
DEFAULT_STATUS_URL = "https://clients.lexer.io/api/public/v1"
TOKEN_ENV = "LEXER_API_TOKEN"
API_URL_ENV = "LEXER_API_URL"
STATUS_URL_ENV = "LEXER_STATUS_URL"

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
C = TypeVar("C")


# -- the typed report methods, one per row of the report-kind table -----------------------


class PlainReport(Protocol[T_co]):
    """The signature of a typed report method; a misspelt filter is a TypeError."""

    def __call__(
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
        priority: Priority | None = None,
    ) -> Awaitable[T_co]: ...


class NpsReport(Protocol[T_co]):
    """The signature of a typed NPS report method: one survey as ``form``."""

    def __call__(
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
        priority: Priority | None = None,
    ) -> Awaitable[T_co]: ...


class _ReportMethod(Generic[C]):
    """A method of `LexerClient` made from a row of the report-kind table: read on an
    instance it is the bound call (typed ``C``); on the class, the plain function (so
    ``help()`` and `inspect.signature` show its parameters)."""

    def __init__(self, function: Callable[..., Awaitable[object]]) -> None:
        self._function = function
        self.__doc__ = function.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._function.__name__ = name
        self._function.__qualname__ = f"{owner.__name__}.{name}"

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Callable[..., Awaitable[object]]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> C: ...
    def __get__(
        self, obj: object, owner: type | None = None
    ) -> C | Callable[..., Awaitable[object]]:
        if obj is None:
            return self._function
        return cast(C, types.MethodType(self._function, obj))


def _plain(kind: ReportKind[T], doc: str) -> _ReportMethod[PlainReport[T]]:
    async def method(
        self: LexerClient,
        date_from: datetime,
        date_to: datetime,
        *,
        users: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
        forms: Sequence[int] | None = None,
        extra_filters: Mapping[str, object] | None = None,
        max_retries: int | None = None,
        deadline: float | None = None,
        priority: Priority | None = None,
    ) -> T:
        request, decode = self._report_call(
            kind, date_from, date_to, users, groups, forms, None, None, extra_filters
        )
        result = await self.channel.send(
            request, decode, max_retries=max_retries, deadline=deadline, priority=priority
        )
        return cast(T, result)

    method.__doc__ = f"{doc} Filters as in `report`."
    return _ReportMethod(method)


def _nps(kind: ReportKind[T], doc: str) -> _ReportMethod[NpsReport[T]]:
    async def method(
        self: LexerClient,
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
        priority: Priority | None = None,
    ) -> T:
        request, decode = self._report_call(
            kind, date_from, date_to, users, groups, None, form, nps_category, extra_filters
        )
        result = await self.channel.send(
            request, decode, max_retries=max_retries, deadline=deadline, priority=priority
        )
        return cast(T, result)

    method.__doc__ = f"{doc} Filters as in `report`."
    return _ReportMethod(method)


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
        priority: ``"interactive"`` (default) or ``"bulk"``: the priority of this
            client's calls unless a call says otherwise (``priority=`` on every method).
        reserve: slots of each window that bulk calls of this token never take, so
            interactive ones need not wait behind them (default 10 % of
            ``max_requests``, rounded down; 0 to 1 less than ``max_requests``).
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
        transport, files_transport: carry the exchanges instead of aiohttp sessions (a
            `MockTransport` in tests); ``files_transport`` defaults to ``transport``.
        proxy: an ``http://`` forward proxy for the API, status and file sessions (https
            goes through a CONNECT tunnel); else ``$HTTPS_PROXY`` etc. with ``trust_env``.
        ssl: an `ssl.SSLContext` to verify the hosts with, or ``False`` (no verification,
            tests only; warns). ca_bundle: a PEM file of CAs to trust instead.
        trust_env: honour ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` and
            ``SSL_CERT_FILE`` as curl does (default on).
        file_session: an aiohttp session for export files instead of one the client makes
            (never closed by it). It must carry no credential: the client adds none to it.
        instrumentation: hooks told of every call, download and retry (`instrumentation`;
            `otel.OpenTelemetry` for spans and metrics); ``"auto"`` (default): OpenTelemetry
            if the application has configured it, else none; None: none.
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
        priority: Priority = "interactive",
        reserve: int | None = None,
        registry: LimiterRegistry | None = None,
        redis_url: str | None = None,
        limit_store: str | os.PathLike[str] | None = None,
        max_in_flight: int | contextlib.AbstractAsyncContextManager[object] | None = None,
        workflow_states_type: str = DEFAULT_WORKFLOW_STATES_TYPE,
        on_event: EventHook | None = None,
        now: Callable[[], datetime] | None = None,
        transport: Transport | None = None,
        files_transport: Transport | None = None,
        proxy: str | None = None,
        ssl: ssl_module.SSLContext | bool | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        trust_env: bool = True,
        file_session: aiohttp.ClientSession | None = None,
        instrumentation: InstrumentationOption = "auto",
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
        self.reserve = check_limit(max_requests, window, reserve)
        self.priority = check_priority(priority)
        if transport is not None and session is not None:
            raise exc.ConfigurationError("pass either session or transport, not both")
        if files_transport is not None and file_session is not None:
            raise exc.ConfigurationError("pass either file_session or files_transport, not both")
        self.network: Network = network(
            proxy=proxy, ssl=ssl, ca_bundle=ca_bundle, trust_env=trust_env
        )
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
        if isinstance(max_in_flight, int):
            max_in_flight = anyio.CapacityLimiter(max_in_flight)
        self._session = session
        self._owns_session = session is None
        self._files_session: aiohttp.ClientSession | None = file_session
        self._owns_files_session = file_session is None
        self._transport = transport
        self._files_transport = files_transport or transport
        self._closed = False
        self.channel = Channel(
            token=self._token,
            label=self.label,
            api_url=self.api_url,
            status_url=self.status_url,
            timeout=timeout,
            retry=self.retry,
            window=window,
            priority=self.priority,
            on_event=on_event,
            now=now,
            in_flight=max_in_flight,
            opener=self.open,
            instrumentation=resolve_instrumentation(instrumentation),
        )

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
        """Create the sessions (unless given a session or transports) and bind the
        token's limiter. Idempotent."""
        if self._closed:
            raise exc.ClientClosedError("this LexerClient is closed; create a new one")
        if self.channel.bound:
            return
        opened: list[aiohttp.ClientSession] = []
        try:
            api, files = self._transport, self._files_transport
            if api is None:
                if self._session is None:
                    self._session = api_session(timeout=self.timeout, network=self.network)
                    opened.append(self._session)
                no_silent_resend(self._session)  # a caller's session too
                api = AiohttpTransport(self._session, owns_session=False)
            if files is None:
                if self._files_session is None:
                    self._files_session = files_session(self.network)
                    opened.append(self._files_session)
                files = AiohttpTransport(self._files_session, owns_session=False)
            if self.redis_url is not None:
                from .limits_redis import check_redis, shared_registry

                await check_redis(self.redis_url)  # unreachable: a clear error, no fall-back
                # A slot's lease must outlive the longest attempt, or it could free too early.
                self._registry = shared_registry(
                    self.redis_url, lease_timeout=self.timeout + LEASE_MARGIN
                )
            elif self.limit_store is not None:
                from .limits_sqlite import store_registry

                self._registry = store_registry(
                    self.limit_store, lease_timeout=self.timeout + LEASE_MARGIN
                )
            limiter = self._registry.get(
                self._token.reveal(),
                max_requests=self.max_requests,
                window=self.window,
                reserve=self.reserve,
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
        self.channel.bind(api, files, limiter)

    async def aclose(self) -> None:
        """Close the owned sessions. A closed client cannot be used again; transports
        passed in are the caller's to close."""
        self._closed = True
        self.channel.close()
        if self._owns_session and self._session is not None:
            await self._session.close()
        if self._owns_files_session and self._files_session is not None:
            await self._files_session.close()
        self._session = self._files_session = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def limiter(self) -> Limiter:
        if not self.channel.bound:
            raise exc.ClientClosedError("this LexerClient is not open; use `async with`")
        return self.channel.limiter

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

    @property
    def max_retry_after(self) -> float:
        """The longest pause a 429's Retry-After may impose (`RetryPolicy.max_retry_after`,
        else the window)."""
        return self.channel.max_retry_after

    async def send(
        self,
        request: wire.Request,
        decode: Decoder[T],
        *,
        idempotent: bool = True,
        max_retries: int | None = None,
        deadline: float | None = None,
        priority: Priority | None = None,
    ) -> T:
        """Send ``request`` through the token's `Channel` (limiter, retries, typed errors)
        and decode its answer; ``max_retries`` and ``deadline`` override the client's
        `RetryPolicy` for this call, ``priority`` the client's."""
        if self._closed:
            raise exc.ClientClosedError("this LexerClient is closed; create a new one")
        return await self.channel.send(
            request,
            decode,
            idempotent=idempotent,
            max_retries=max_retries,
            deadline=deadline,
            priority=priority,
        )

    # -- lists -------------------------------------------------------------------------

    async def users(
        self,
        *,
        max_retries: int | None = None,
        deadline: float | None = None,
        priority: Priority | None = None,
    ) -> list[m.User]:
        """``GET /v1/users``: the account's users (their ids filter reports: ``users=``)."""
        return await self.send(
            wire.users_request(),
            _list_decoder(m.User),
            max_retries=max_retries,
            deadline=deadline,
            priority=priority,
        )

    async def groups(
        self,
        *,
        max_retries: int | None = None,
        deadline: float | None = None,
        priority: Priority | None = None,
    ) -> list[m.Group]:
        """``GET /v1/groups``: the account's groups (their ids filter reports: ``groups=``)."""
        return await self.send(
            wire.groups_request(),
            _list_decoder(m.Group),
            max_retries=max_retries,
            deadline=deadline,
            priority=priority,
        )

    async def forms(
        self,
        *,
        max_retries: int | None = None,
        deadline: float | None = None,
        priority: Priority | None = None,
    ) -> list[m.Form]:
        """``GET /v1/forms``: the account's forms; those with ``nps`` set are the NPS
        surveys that NPS reports and exports take as ``form=``."""
        return await self.send(
            wire.forms_request(),
            _list_decoder(m.Form),
            max_retries=max_retries,
            deadline=deadline,
            priority=priority,
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
        # ``_value_``: the member's value without the enum property's lookup (hot path)
        name = self.workflow_states_type if kind is ReportType.WORKFLOW_STATES else kind._value_
        return kind, name

    @overload
    async def report(
        self,
        report_type: ReportKind[T],
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
        priority: Priority | None = None,
    ) -> T: ...

    @overload
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
        priority: Priority | None = None,
    ) -> ReportResult: ...

    async def report(
        self,
        report_type: ReportKind[T] | ReportType | str,
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
        priority: Priority | None = None,
    ) -> T | ReportResult:
        """Fetch any report; the typed methods below all come through here.

        Input is validated before anything is sent or any rate-limit slot is taken.

        Args:
            report_type: a `ReportKind` (``Reports.SUMMARY``: the result is typed), a
                `ReportType` or its name (``summary``, ``nps_volume``, ...).
            date_from, date_to: timezone-aware; at most 12 months apart.
            users, groups: only these user / group ids (from `users` / `groups`).
            forms: only these form ids (from `forms`); not for NPS reports.
            form: NPS reports only, and required there: the NPS survey's id.
            nps_category: NPS reports only: all (default), promoters, passives or
                detractors.
            extra_filters: further body fields, sent verbatim (strict JSON values). The
                names above, and type/date_from/date_to, are refused here.
            max_retries, deadline: override the client's `RetryPolicy` for this call.
            priority: ``"interactive"`` or ``"bulk"`` for this call (default: the
                client's); bulk never takes the rate limit's reserve.
        """
        request, decode = self._report_call(
            report_type, date_from, date_to, users, groups, forms, form, nps_category, extra_filters
        )
        result = await self.channel.send(
            request, decode, max_retries=max_retries, deadline=deadline, priority=priority
        )
        return cast("T | ReportResult", result)

    @overload
    async def report_raw(
        self,
        report_type: ReportKind[T],
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
        priority: Priority | None = None,
    ) -> RawReport[T]: ...

    @overload
    async def report_raw(
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
        priority: Priority | None = None,
    ) -> RawReport[ReportResult]: ...

    async def report_raw(
        self,
        report_type: ReportKind[T] | ReportType | str,
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
        priority: Priority | None = None,
    ) -> RawReport[T] | RawReport[ReportResult]:
        """`report`, also keeping the response body byte for byte (`RawReport.body`, for
        audits and raw archives): the same arguments, validation and decoding."""
        request, decode = self._report_call(
            report_type,
            date_from,
            date_to,
            users,
            groups,
            forms,
            form,
            nps_category,
            extra_filters,
            raw=True,
        )
        result = await self.channel.send(
            request, decode, max_retries=max_retries, deadline=deadline, priority=priority
        )
        return cast("RawReport[T] | RawReport[ReportResult]", result)

    def _report_call(
        self,
        report_type: ReportKind[Any] | ReportType | str,
        date_from: datetime,
        date_to: datetime,
        users: Sequence[int] | None,
        groups: Sequence[int] | None,
        forms: Sequence[int] | None,
        form: int | None,
        nps_category: NpsCategory | str | None,
        extra_filters: Mapping[str, object] | None,
        *,
        raw: bool = False,
    ) -> tuple[wire.Request, Decoder[Any]]:
        """A report call's request, validated (before anything is sent or any slot is
        taken), and its decoder (``raw``: to a `RawReport`). The typed methods, `report`
        and `report_raw` all send through the channel with these."""
        if isinstance(report_type, ReportKind):
            kind, name = self.resolve_report_type(report_type.report_type)
            row: ReportKind[Any] = report_type
        else:
            kind, name = self.resolve_report_type(report_type)
            row = REPORT_KINDS[kind]
        now = self.channel.now()
        if users is None and groups is None and forms is None and extra_filters is None:
            request = _range_request(
                name, row.needs_form, date_from, date_to, form, nps_category, now
            )
        else:
            body = build_report_body(
                name,
                date_from,
                date_to,
                needs_form=row.needs_form,
                form=form,
                nps_category=nps_category,
                users=users,
                groups=groups,
                forms=forms,
                extra_filters=extra_filters,
                now=now,
            )
            request = wire.report_request(body)
        tz = date_from.tzinfo or timezone.utc
        decode_report = wire.decode_report
        if raw:

            def decode_raw(status: int, body: bytes) -> RawReport[Any]:
                return RawReport(decode_report(row, status, body, tz=tz, report_type=name), body)

            return request, decode_raw

        def decode(status: int, body: bytes) -> object:
            return decode_report(row, status, body, tz=tz, report_type=name)

        return request, decode

    # The typed methods, one per row of the table in `kinds`, share one keyword-only
    # signature (NPS ones add form and nps_category) so a misspelt filter is a TypeError,
    # never an unfiltered answer.
    summary = _plain(Reports.SUMMARY, "``summary``: team-wide handling metrics.")
    states_volume = _plain(
        Reports.STATES_VOLUME,
        "``states_volume``: messages per workflow state per day (hourly under 4 days).",
    )
    workflow_states = _plain(
        Reports.WORKFLOW_STATES,
        "Workflow-state totals (type name: ``workflow_states_type``, default ``states``).",
    )
    classifications = _plain(
        Reports.CLASSIFICATIONS,
        "``classifications``: messages per classification and workflow state.",
    )
    response_volume = _plain(
        Reports.RESPONSE_VOLUME,
        "``response_volume``: average response time per day (hourly for 3 days or less).",
    )
    user_summary = _plain(
        Reports.USER_SUMMARY, "``user_summary`` (Team Summary): each agent's metrics."
    )
    user_volume = _plain(
        Reports.USER_VOLUME,
        "``user_volume`` (Team Volume): each agent's messages by workflow state.",
    )
    case_summary = _plain(Reports.CASE_SUMMARY, "``case_summary``: case handling metrics.")
    case_volume = _plain(Reports.CASE_VOLUME, "``case_volume``: open cases per day.")
    case_classifications = _plain(
        Reports.CASE_CLASSIFICATIONS,
        "``case_classifications``: classifications counted once per case.",
    )
    nps_summary = _nps(
        Reports.NPS_SUMMARY, "``nps_summary`` for the NPS survey ``form`` (an id from `forms`)."
    )
    nps_volume = _nps(
        Reports.NPS_VOLUME,
        "``nps_volume``: NPS counts per local day for the NPS survey ``form`` (an id from "
        "`forms`).",
    )

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
        restart_dropped: bool = False,
        priority: Priority | None = None,
    ) -> m.ExportJob:
        """Start an export job (at most 12 months); returns it with its report token.
        ``form`` (required for nps_submissions) and the filters are as in `report`;
        ``restart_dropped`` as in `exports.start_export`."""
        with self.channel.prioritized(priority):
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
                restart_dropped=restart_dropped,
            )

    async def export_status(
        self, report_token: str, *, priority: Priority | None = None
    ) -> m.ExportJob:
        """Poll an export job once (status host)."""
        with self.channel.prioritized(priority):
            return await exports.export_status(self, report_token)

    async def wait_for_export(
        self,
        job: m.ExportJob,
        *,
        poll: exports.PollPolicy | None = None,
        priority: Priority | None = None,
    ) -> m.ExportJob:
        """Poll until the job is complete (with backoff); raises on failure or timeout."""
        with self.channel.prioritized(priority):
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
        priority: Priority | None = None,
    ) -> exports.ExportResult:
        """Start, wait for and download an export to ``dest``; past 12 months the range is
        split into windows of ``window_months``, merged into ``dest`` (``merge=True``) or
        written one file per window. ``form`` and the filters are as in `report`."""
        with self.channel.prioritized(priority):
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
        priority: Priority | None = None,
    ) -> AsyncIterator[dict[str, str]]:
        """``async for row in client.export_rows(...)``: an export (at most 12 months)
        parsed as its CSV streams, nothing written to disk. Arguments as in `export`."""
        rows = exports.export_rows(
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
        if priority is None:
            return rows
        return _prioritized(self.channel, check_priority(priority), rows)


async def _prioritized(
    channel: Channel, priority: Priority, rows: AsyncIterator[T]
) -> AsyncIterator[T]:
    """``rows``, each step taken under ``priority`` (an async generator's steps run in
    its consumer's context, so the block is entered around each one)."""
    try:
        while True:
            with channel.prioritized(priority):
                try:
                    row = await rows.__anext__()
                except StopAsyncIteration:
                    return
            yield row
    finally:
        close = getattr(rows, "aclose", None)
        if close is not None:
            await close()


_RANGE_REQUESTS: dict[tuple[object, ...], tuple[datetime, wire.Request]] = {}
"""Validated report requests that carry no filter but the NPS form, by type name, range
and form: every token of a backfill asks for the same windows, and a dashboard for the
same range again and again. Only whether the range starts in the future is checked
anew. Shared by the process's clients (the requests are frozen, their bodies never
changed after they are built) and bounded."""

_RANGE_REQUESTS_MAX = 512


def _range_request(
    name: str,
    needs_form: bool,
    date_from: datetime,
    date_to: datetime,
    form: int | None,
    nps_category: NpsCategory | str | None,
    now: datetime,
) -> wire.Request:
    """`build_report_body` with no id filters nor extra filters, as a `wire.Request`,
    made once per distinct arguments (`_RANGE_REQUESTS`)."""
    key: tuple[object, ...] | None = None
    if type(date_from) is datetime and type(date_to) is datetime:
        # The types and folds too: True == 1 (a bool form is refused, an int is not), and
        # the zone and fold set the offset sent, yet aware datetimes compare by instant.
        key = (
            name,
            needs_form,
            form,
            type(form),
            nps_category,
            type(nps_category),
            date_from,
            date_from.tzinfo,
            date_from.fold,
            date_to,
            date_to.tzinfo,
            date_to.fold,
        )
        try:
            found = _RANGE_REQUESTS.get(key)
        except TypeError:  # an unhashable form or zone: not kept (and likely refused)
            found, key = None, None
        if found is not None and not found[0] > now:
            return found[1]
    body = build_report_body(
        name,
        date_from,
        date_to,
        needs_form=needs_form,
        form=form,
        nps_category=nps_category,
        now=now,
    )
    request = wire.report_request(body)
    if key is not None:
        if len(_RANGE_REQUESTS) >= _RANGE_REQUESTS_MAX:
            _RANGE_REQUESTS.clear()
        start = date_from.replace(microsecond=0) if date_from.microsecond else date_from
        _RANGE_REQUESTS[key] = (start, request)
    return request


def _list_decoder(cls: type[T]) -> Decoder[list[T]]:
    def decode(status: int, body: bytes) -> list[T]:
        return wire.decode_list(cls, status, body)

    return decode
