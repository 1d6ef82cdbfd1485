"""A blocking twin of `LexerClient`, for scripts and notebooks.

``with sync.LexerClient(token) as client: client.summary(...)``. Every sync client of the
process runs its calls on one event loop in a background thread (an anyio blocking
portal), so it works in a plain script and inside a running loop (Jupyter) alike. The
thread starts with the first open sync client and stops with the last one closed.

Limits: sync clients of one token share one limiter: the process-wide registry keeps one
table per event loop (anyio primitives belong to the loop that made them), and every sync
client runs on the same background loop. An async
client on another loop does not share it; to hold N per W across sync and async clients,
give both the same ``limit_store=`` or ``redis_url=``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import ssl as ssl_module
import threading
import types
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, cast, overload

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from . import exceptions as exc
from .client import LexerClient as AsyncLexerClient
from .events import EventHook
from .instrumentation import InstrumentationOption
from .kinds import ReportKind, ReportResult, Reports
from .limits import (
    DEFAULT_MAX_REQUESTS,
    DEFAULT_WINDOW,
    LimiterRegistry,
    LimiterStats,
    Priority,
)
from .reports import DEFAULT_WORKFLOW_STATES_TYPE, NpsCategory, ReportType
from .retry import RetryPolicy
from .transport import DEFAULT_TIMEOUT, Transport

__all__ = ["LexerClient"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
C = TypeVar("C")
R = TypeVar("R")
P = ParamSpec("P")

_CANCELLED = object()


class _Runtime:
    """The shared background loop: started by the first open client, stopped (thread
    joined) when the last one closes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._stack: contextlib.ExitStack | None = None
        self.portal: BlockingPortal | None = None

    def acquire(self) -> BlockingPortal:
        with self._lock:
            if self.portal is None:
                stack = contextlib.ExitStack()
                self.portal = stack.enter_context(start_blocking_portal())
                self._stack = stack
            self._users += 1
            return self.portal

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._stack is not None:
                stack, portal = self._stack, self.portal
                self._stack = self.portal = None
                try:
                    if portal is not None:
                        # A task left behind (a call interrupted before it could be
                        # cancelled) must not keep the thread alive: cancel it.
                        portal.call(portal.stop, True)
                finally:
                    stack.close()

    @property
    def running(self) -> bool:
        return self.portal is not None


_runtime = _Runtime()


def _blocking(name: str) -> Callable[..., Any]:
    """The blocking twin of ``AsyncLexerClient.<name>``; `inspect.signature` shows the
    async method's (through ``__wrapped__``)."""
    target = getattr(AsyncLexerClient, name)

    @functools.wraps(target)
    def method(self: LexerClient, *args: Any, **kwargs: Any) -> Any:
        return self._call(getattr(self._client, name), *args, **kwargs)

    method.__doc__ = f"Blocking `lexer_activity_async.LexerClient.{name}`."
    return method


class _Twin(Generic[C]):
    """A blocking method, typed ``C`` on an instance (what mypy checks calls against)."""

    def __init__(self, expected: str | None = None) -> None:
        self._expected = expected
        self._method: Callable[..., Any] | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        if self._expected not in (None, name):
            raise TypeError(f"{name} is the twin of {self._expected}")
        self._method = _blocking(name)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Callable[..., Any]: ...
    @overload
    def __get__(self, obj: LexerClient, owner: type | None = None) -> C: ...
    def __get__(self, obj: LexerClient | None, owner: type | None = None) -> C | Callable[..., Any]:
        assert self._method is not None
        if obj is None:
            return self._method
        return cast(C, types.MethodType(self._method, obj))


def _twin(target: Callable[Concatenate[Any, P], Awaitable[R]]) -> _Twin[Callable[P, R]]:
    """The twin of the async method ``target``: same parameters, its awaited result."""
    return _Twin(target.__name__)


class SyncPlainReport(Protocol[T_co]):
    """A blocking typed report method (as `lexer_activity_async.client.PlainReport`)."""

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
    ) -> T_co: ...


class SyncNpsReport(Protocol[T_co]):
    """A blocking typed NPS report method (as `lexer_activity_async.client.NpsReport`)."""

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
    ) -> T_co: ...


def _plain(kind: ReportKind[T]) -> _Twin[SyncPlainReport[T]]:
    """The twin of the report method of ``kind`` (which types its result)."""
    return _Twin()


def _nps(kind: ReportKind[T]) -> _Twin[SyncNpsReport[T]]:
    return _Twin()


class LexerClient:
    """Blocking client for the Activity API: the methods of the async `LexerClient`
    (same arguments, same typed results), run on a background event loop.

    Use as ``with LexerClient(token) as client:`` or call `close` (idempotent; a closed
    client raises `ClientClosedError`). Arguments are those of the async client but
    ``session`` and ``file_session`` (an aiohttp session belongs to the loop that made it;
    this client makes its own on its loop); ``on_event`` is called on the background
    thread. Without ``registry``, ``redis_url`` or ``limit_store`` the token's limiter is
    shared by the process's sync clients only (see the module docstring). Ctrl-C during a
    call cancels it on the loop (its rate-limit slot released, its connection closed, no
    half-written file) and raises KeyboardInterrupt.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        label: str | None = None,
        api_url: str | None = None,
        status_url: str | None = None,
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
        instrumentation: InstrumentationOption = "auto",
    ) -> None:
        self._portal: BlockingPortal | None = None
        self._closed = False
        # Validates every option now, before any thread starts.
        self._client = AsyncLexerClient(
            token,
            label=label,
            api_url=api_url,
            status_url=status_url,
            timeout=timeout,
            retry=retry,
            max_requests=max_requests,
            window=window,
            priority=priority,
            reserve=reserve,
            registry=registry,
            redis_url=redis_url,
            limit_store=limit_store,
            max_in_flight=max_in_flight,
            workflow_states_type=workflow_states_type,
            on_event=on_event,
            now=now,
            transport=transport,
            files_transport=files_transport,
            proxy=proxy,
            ssl=ssl,
            ca_bundle=ca_bundle,
            trust_env=trust_env,
            instrumentation=instrumentation,
        )
        self.label = self._client.label

    def __repr__(self) -> str:
        return repr(self._client).replace("LexerClient(", "sync.LexerClient(", 1)

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> LexerClient:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Start (or join) the background loop and open the client. Idempotent."""
        if self._closed:
            raise exc.ClientClosedError("this LexerClient is closed; create a new one")
        if self._portal is not None:
            return
        portal = _runtime.acquire()
        try:
            portal.call(self._client.open)
        except BaseException:
            _runtime.release()
            raise
        self._portal = portal

    def close(self) -> None:
        """Close the client; the background thread ends with the last open sync client."""
        if self._closed:
            return
        self._closed = True
        portal, self._portal = self._portal, None
        if portal is None:
            return
        try:
            portal.call(self._client.aclose)
        finally:
            _runtime.release()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> LimiterStats:
        """A snapshot of this token's counters."""
        return self._call_sync(lambda: self._client.stats)

    def _ensure_portal(self) -> BlockingPortal:
        if self._closed:
            raise exc.ClientClosedError("this LexerClient is closed; create a new one")
        if self._portal is None:
            self.open()
        assert self._portal is not None
        return self._portal

    def _call_sync(self, fn: Callable[[], T]) -> T:
        return self._ensure_portal().call(fn)

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the loop; on KeyboardInterrupt (or any exception while waiting)
        cancel it there, wait until it has unwound, and re-raise. The interrupt may come
        at any point, even before the task starts: it then cancels itself at once."""
        portal = self._ensure_portal()
        abandoned = threading.Event()
        scopes: list[anyio.CancelScope] = []

        async def run() -> Any:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                if abandoned.is_set():
                    scope.cancel()
                return await fn(*args, **kwargs)
            return _CANCELLED

        future: concurrent.futures.Future[Any] | None = None
        try:
            future = portal.start_task_soon(run)
            result = future.result()
        except BaseException:
            abandoned.set()  # before reading ``scopes``: one side or the other cancels
            if future is not None and not future.done():
                if scopes:
                    portal.call(scopes[0].cancel)
                else:
                    future.cancel()
                concurrent.futures.wait([future])
            raise
        if result is _CANCELLED:  # cancelled on the loop by something other than us
            raise exc.ClientClosedError("the call was cancelled: the client is closing")
        return result  # type: ignore[no-any-return]

    # -- the API -----------------------------------------------------------------------

    users = _twin(AsyncLexerClient.users)
    groups = _twin(AsyncLexerClient.groups)
    forms = _twin(AsyncLexerClient.forms)
    send = _twin(AsyncLexerClient.send)
    report_raw = _twin(AsyncLexerClient.report_raw)
    summary = _plain(Reports.SUMMARY)
    states_volume = _plain(Reports.STATES_VOLUME)
    workflow_states = _plain(Reports.WORKFLOW_STATES)
    classifications = _plain(Reports.CLASSIFICATIONS)
    response_volume = _plain(Reports.RESPONSE_VOLUME)
    user_summary = _plain(Reports.USER_SUMMARY)
    user_volume = _plain(Reports.USER_VOLUME)
    case_summary = _plain(Reports.CASE_SUMMARY)
    case_volume = _plain(Reports.CASE_VOLUME)
    case_classifications = _plain(Reports.CASE_CLASSIFICATIONS)
    nps_summary = _nps(Reports.NPS_SUMMARY)
    nps_volume = _nps(Reports.NPS_VOLUME)
    start_export = _twin(AsyncLexerClient.start_export)
    export_status = _twin(AsyncLexerClient.export_status)
    wait_for_export = _twin(AsyncLexerClient.wait_for_export)
    download_export = _twin(AsyncLexerClient.download_export)
    export = _twin(AsyncLexerClient.export)

    @overload
    def report(
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
    def report(
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
    def report(self, *args: Any, **kwargs: Any) -> Any:
        """Blocking `lexer_activity_async.LexerClient.report`."""
        return self._call(self._client.report, *args, **kwargs)

    @functools.wraps(AsyncLexerClient.resolve_report_type)
    def resolve_report_type(self, report_type: Any) -> Any:
        """As `lexer_activity_async.LexerClient.resolve_report_type` (no I/O)."""
        return self._client.resolve_report_type(report_type)

    def export_rows(self, *args: Any, **kwargs: Any) -> Generator[dict[str, str], None, None]:
        """``for row in client.export_rows(...)``: the export's rows as its CSV streams;
        breaking out early (or closing the iterator) stops and cleans up the download."""
        rows = self._call_sync(lambda: self._client.export_rows(*args, **kwargs))
        return self._iterate(rows)

    def _iterate(self, rows: Any) -> Generator[dict[str, str], None, None]:
        try:
            while True:
                try:
                    row: dict[str, str] = self._call(rows.__anext__)
                except StopAsyncIteration:
                    return
                yield row
        finally:
            aclose = getattr(rows, "aclose", None)
            if aclose is not None and self._portal is not None:
                self._call(aclose)


# Same signatures as the async methods (inspect follows __wrapped__).
LexerClient.export_rows.__wrapped__ = AsyncLexerClient.export_rows  # type: ignore[attr-defined]
LexerClient.report.__wrapped__ = AsyncLexerClient.report  # type: ignore[attr-defined]
