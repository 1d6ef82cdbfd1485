"""Per-token rate limiting: a sliding-window limiter keyed by a hash of the token.

The API allows 100 requests per 5 minutes per token and counts requests as they *arrive*.
A client cannot know when the server saw a request, only that it was no later than the
moment its response completed. So each request holds a slot from before it is sent until
``window`` seconds after its response completed (or failed, or was cancelled). With at
most ``max_requests`` slots held at once, no ``window``-second span can contain more than
``max_requests`` arrivals, whatever the latency.

Why not aiolimiter: ``AsyncLimiter(100, 300)`` is a leaky bucket that drains continuously
(one unit per 3 s), so after an initial burst of 100 it admits a further acquisition every
3 s: 199 acquisitions fit in one sliding 300 s span (``tests/test_limits.py`` shows it).
It also counts at send time, not completion. It cannot meet the contract above, so the
small sliding-window piece is written here.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import math
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, runtime_checkable

import anyio
import attrs

from .exceptions import ConfigurationError

__all__ = [
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_WINDOW",
    "Clock",
    "WaitCallback",
    "LimiterStats",
    "Lease",
    "Limiter",
    "SlidingWindowLimiter",
    "LimiterFactory",
    "LimiterRegistry",
    "default_registry",
    "token_key",
]

DEFAULT_MAX_REQUESTS = 100
DEFAULT_WINDOW = 300.0

Clock = Callable[[], float]
"""Seconds on a monotonic scale that agrees with the event loop's timers."""

WaitCallback = Callable[[float], None]
"""Called once per acquisition that must wait, with the number of seconds it expects."""


def token_key(token: str) -> str:
    """A stable, non-reversible key for a token (registry keys, Redis keys, file names)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def wait_behind(
    now: float, rank: int, frees_at: list[float], window: float, blocked_until: float
) -> float:
    """Seconds until the ``rank``-th of the slots still to free is free (``rank < 0``: one
    is free now; past the known release times, one window), and no penalty blocks it.
    Shared by the in-process and the Redis limiter's wait estimates."""
    if rank < 0:
        at = now
    elif rank < len(frees_at):
        at = frees_at[rank]
    else:
        at = now + window
    return max(at, blocked_until) - now


@attrs.define
class LimiterStats:
    """Counters for one token, shared by every client that uses it in this process."""

    requests: int = 0
    rate_limited: int = 0
    retries: int = 0
    wait_seconds: float = 0.0
    waits: int = 0


@attrs.frozen
class Lease:
    """A held slot. ``ident`` identifies it to a shared backend; ``acquired_at`` is the
    limiter clock's reading when it was granted."""

    ident: str
    acquired_at: float


@runtime_checkable
class Limiter(Protocol):
    """What a per-token limiter does; `SlidingWindowLimiter`, the Redis backend and the
    local limit store (`limits_sqlite`) implement it.

    Guarantee: the server never sees more than ``max_requests`` requests in any
    ``window``-second span, provided every request is made inside `slot`.
    """

    max_requests: int
    window: float
    stats: LimiterStats

    async def acquire(self, on_wait: WaitCallback | None = None) -> Lease:
        """Wait (FIFO) for a free slot and take it."""
        ...

    async def release(self, lease: Lease) -> None:
        """The request's response completed, failed or was cancelled: free its slot
        ``window`` seconds from now."""
        ...

    async def penalize(self, retry_after: float | None = None) -> None:
        """The server answered 429: treat the window as full for ``retry_after`` seconds,
        or for a whole window when the server did not say."""
        ...

    def slot(self, on_wait: WaitCallback | None = None) -> AbstractAsyncContextManager[Lease]:
        """``async with limiter.slot(): send the request and read its response``."""
        ...


class _SlotMixin:
    """`slot` on top of acquire/release; the release is shielded from cancellation so a
    cancelled request still holds its slot for a window (the server may have seen it)."""

    async def acquire(self, on_wait: WaitCallback | None = None) -> Lease:
        raise NotImplementedError

    async def release(self, lease: Lease) -> None:
        raise NotImplementedError

    @asynccontextmanager
    async def slot(self, on_wait: WaitCallback | None = None) -> AsyncIterator[Lease]:
        lease = await self.acquire(on_wait)
        try:
            yield lease
        finally:
            with anyio.CancelScope(shield=True):
                await self.release(lease)


class SlidingWindowLimiter(_SlotMixin):
    """In-process sliding-window limiter for one token.

    Guarantee: the server never sees more than ``max_requests`` requests of this token in
    any ``window``-second span, whatever the network latency, because a slot is held from
    before sending until ``window`` seconds after the response completed.

    Bursts: with an empty window, ``max_requests`` acquisitions succeed at once; the next
    one waits exactly until the earliest slot frees. Waiters are served first come, first
    served (one gate, FIFO); a task cancelled while waiting takes no slot.
    """

    def __init__(
        self,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        window: float = DEFAULT_WINDOW,
        *,
        clock: Clock | None = None,
    ) -> None:
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        if not window > 0:
            raise ValueError("window must be positive")
        self.max_requests = max_requests
        self.window = float(window)
        self.stats = LimiterStats()
        self._clock = clock
        self._frees_at: list[float] = []  # ascending times at which released slots free up
        self._in_flight = 0
        self._blocked_until = -math.inf
        self._gate = asyncio.Lock()
        self._changed = asyncio.Event()
        self._serial = 0
        self._pending = 0  # acquisitions not yet granted: the one at the gate and its queue

    def _now(self) -> float:
        if self._clock is None:  # the running loop's clock, looked up once (a limiter
            self._clock = asyncio.get_running_loop().time  # serves one loop, as its lock)
        return self._clock()

    def _delay(self, now: float) -> float | None:
        """0 when a slot is free now; else seconds until one may be; None if every slot is
        held by a request still in flight."""
        cut = bisect.bisect_right(self._frees_at, now)
        if cut:
            del self._frees_at[:cut]
        if now < self._blocked_until:
            return self._blocked_until - now
        if self._in_flight + len(self._frees_at) < self.max_requests:
            return 0.0
        return self._frees_at[0] - now if self._frees_at else None

    @property
    def in_use(self) -> int:
        """Slots held now: requests in flight plus those released less than a window ago."""
        self._delay(self._now())
        return self._in_flight + len(self._frees_at)

    def _expected_wait(self, now: float, ahead: int) -> float:
        """Seconds until the slot of an acquisition queued behind ``ahead`` others frees:
        the ``ahead``-th slot to free (one window when that one is not known yet)."""
        self._delay(now)
        free_now = self.max_requests - self._in_flight - len(self._frees_at)
        return wait_behind(now, ahead - free_now, self._frees_at, self.window, self._blocked_until)

    async def acquire(self, on_wait: WaitCallback | None = None) -> Lease:
        # Arrival and the wait notice come before the gate: a task queued behind the one
        # waiting at the gate waits as well, and is counted and told like it.
        started = self._now()
        told = waited = False
        if self._pending:
            expected = self._expected_wait(started, self._pending)
            if expected > 0:
                waited = told = True
                if on_wait is not None:
                    on_wait(expected)
        self._pending += 1
        try:
            async with self._gate:
                while True:
                    delay = self._delay(self._now())
                    if delay == 0.0:
                        break
                    waited = True
                    if on_wait is not None and not told:
                        told = True
                        on_wait(delay if delay is not None else self.window)
                    self._changed.clear()
                    with anyio.move_on_after(math.inf if delay is None else delay):
                        await self._changed.wait()
                self._in_flight += 1
                self._serial += 1
                now = self._now()
                self.stats.requests += 1
                if waited:  # merely passing through an uncontended gate is not a wait
                    self.stats.waits += 1
                    self.stats.wait_seconds += now - started
                return Lease(str(self._serial), now)
        finally:
            self._pending -= 1

    async def release(self, lease: Lease) -> None:
        self._release(lease)

    def _release(self, lease: Lease) -> None:
        self._in_flight -= 1
        bisect.insort(self._frees_at, self._now() + self.window)
        self._changed.set()

    def slot(  # type: ignore[override]  # the mixin's is a generator-based manager
        self, on_wait: WaitCallback | None = None
    ) -> AbstractAsyncContextManager[Lease]:
        """As `Limiter.slot`, without a shielded scope: the release never suspends, so
        no cancellation can come between the request and it (a third of the slot's cost).
        A subclass with its own `release` gets the shielded slot, which calls it."""
        if type(self).release is not SlidingWindowLimiter.release:
            return super().slot(on_wait)
        return _InProcessSlot(self, on_wait)

    async def penalize(self, retry_after: float | None = None) -> None:
        hold = self.window if retry_after is None else retry_after
        self._blocked_until = max(self._blocked_until, self._now() + hold)
        self._changed.set()


class _InProcessSlot:
    """`SlidingWindowLimiter.slot`: acquire on entry, release synchronously on exit."""

    __slots__ = ("_lease", "_limiter", "_on_wait")

    def __init__(self, limiter: SlidingWindowLimiter, on_wait: WaitCallback | None) -> None:
        self._limiter, self._on_wait = limiter, on_wait
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._limiter.acquire(self._on_wait)
        return self._lease

    async def __aexit__(self, *exc_info: object) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._limiter._release(lease)


class LimiterFactory(Protocol):
    def __call__(self, key: str, max_requests: int, window: float) -> Limiter: ...


def _in_process(key: str, max_requests: int, window: float) -> Limiter:
    return SlidingWindowLimiter(max_requests, window)


class LimiterRegistry:
    """One limiter per token (keyed by `token_key`, never the token) per event loop.

    Every `LexerClient` using the same token in the same loop shares its limiter. Asyncio
    primitives belong to one loop, hence one table per loop (weakly keyed, so a finished
    loop's limiters go with it).
    """

    def __init__(self, factory: LimiterFactory = _in_process) -> None:
        self._factory = factory
        self._tables: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Limiter]] = (
            weakref.WeakKeyDictionary()
        )

    def get(
        self,
        token: str,
        *,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        window: float = DEFAULT_WINDOW,
    ) -> Limiter:
        key = token_key(token)
        table = self._tables.setdefault(asyncio.get_running_loop(), {})
        limiter = table.get(key)
        if limiter is None:
            limiter = table[key] = self._factory(key, max_requests, window)
        elif (limiter.max_requests, limiter.window) != (max_requests, float(window)):
            raise ConfigurationError(
                "this token already has a limiter with a different limit "
                f"({limiter.max_requests} per {limiter.window:g}s); one token, one limit"
            )
        return limiter

    def limiters(self) -> dict[str, Limiter]:
        """This loop's limiters by token key."""
        return dict(self._tables.get(asyncio.get_running_loop(), {}))


default_registry = LimiterRegistry()
"""The process-wide registry that clients use unless given another."""
