"""Per-token rate limiting: a sliding-window limiter keyed by a hash of the token.

The API allows 100 requests per 5 minutes per token and counts requests as they *arrive*.
A client cannot know when the server saw a request, only that it was no later than the
moment its response completed. So each request holds a slot from before it is sent until
``window`` seconds after its response completed (or failed, or was cancelled). With at
most ``max_requests`` slots held at once, no ``window``-second span can contain more than
``max_requests`` arrivals, whatever the latency.

Priorities: every acquisition is ``"interactive"`` (the default) or ``"bulk"`` (backfills).
Bulk work never holds more than ``max_requests - reserve`` slots, so the last ``reserve``
slots of every window are kept for interactive calls: an interactive call never waits
while fewer than ``reserve`` interactive slots are held, however hard bulk work pushes.
Interactive work may use every slot when bulk work leaves them free.

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
import heapq
import math
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal, Protocol, runtime_checkable

import anyio
import attrs

from .exceptions import ConfigurationError

__all__ = [
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_WINDOW",
    "PRIORITIES",
    "Priority",
    "check_limit",
    "check_priority",
    "default_reserve",
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

Priority = Literal["interactive", "bulk"]
"""``"interactive"`` may take any slot; ``"bulk"`` never takes the window's reserve."""

PRIORITIES: tuple[Priority, ...] = ("interactive", "bulk")


def default_reserve(max_requests: int) -> int:
    """The slots of each window kept from bulk work unless told otherwise: 10 % of
    ``max_requests``, rounded down (none below 10)."""
    return max_requests // 10


def check_limit(max_requests: object, window: object, reserve: object = None) -> int:
    """Validate a rate limit; returns the reserve (`default_reserve` when None). Raises
    `ConfigurationError` naming the bad value, before anything is sent."""
    if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1:
        raise ConfigurationError("max_requests must be an integer of at least 1")
    if (
        isinstance(window, bool)
        or not isinstance(window, (int, float))
        or not 0 < window < math.inf
    ):
        raise ConfigurationError("window must be a positive number of seconds")
    if reserve is None:
        return default_reserve(max_requests)
    if isinstance(reserve, bool) or not isinstance(reserve, int) or not 0 <= reserve < max_requests:
        raise ConfigurationError(
            f"reserve must be an integer from 0 to max_requests - 1 ({max_requests - 1}): "
            f"bulk work needs at least one slot; got {reserve!r}"
        )
    return reserve


def check_priority(priority: object) -> Priority:
    """``priority`` if it is one of `PRIORITIES`, else a `ConfigurationError`."""
    if priority not in PRIORITIES:
        raise ConfigurationError(f"priority must be 'interactive' or 'bulk', got {priority!r}")
    return priority


def _slots_until(now: float, held: int, frees_at: list[float], cap: int) -> float | None:
    """Seconds until fewer than ``cap`` slots are held (0: already), given ``held`` slots
    of which the released ones free at ``frees_at`` (ascending). Released slots free
    before any in-flight one (within a window of now, against at least a window), so
    it is the ``held - cap``-th of them; None when that one is still in flight."""
    if held < cap:
        return 0.0
    rank = held - cap
    return max(0.0, frees_at[rank] - now) if rank < len(frees_at) else None


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
    limiter clock's reading when it was granted; ``priority`` is the work it was taken for."""

    ident: str
    acquired_at: float
    priority: Priority = "interactive"


@runtime_checkable
class Limiter(Protocol):
    """What a per-token limiter does; `SlidingWindowLimiter`, the Redis backend and the
    local limit store (`limits_sqlite`) implement it.

    Guarantee: the server never sees more than ``max_requests`` requests in any
    ``window``-second span, provided every request is made inside `slot`. Bulk
    acquisitions never hold more than ``max_requests - reserve`` slots.
    """

    max_requests: int
    window: float
    reserve: int
    stats: LimiterStats

    async def acquire(
        self, on_wait: WaitCallback | None = None, *, priority: Priority = "interactive"
    ) -> Lease:
        """Wait (FIFO within a priority; interactive first) for a free slot and take it."""
        ...

    async def renew(self, lease: Lease) -> bool:
        """The request is about to be sent (after waiting for an in-flight cap, say):
        make sure its slot is still held, for a whole lease from now. False if the slot
        was lost meanwhile and no other is free: take a new one."""
        ...

    async def release(self, lease: Lease) -> None:
        """The request's response completed, failed or was cancelled: free its slot
        ``window`` seconds from now."""
        ...

    async def penalize(self, retry_after: float | None = None) -> None:
        """The server answered 429: treat the window as full for ``retry_after`` seconds,
        or for a whole window when the server did not say."""
        ...

    def slot(
        self, on_wait: WaitCallback | None = None, *, priority: Priority = "interactive"
    ) -> AbstractAsyncContextManager[Lease]:
        """``async with limiter.slot(): send the request and read its response``."""
        ...


class _SlotMixin:
    """`slot` on top of acquire/release; the release is shielded from cancellation so a
    cancelled request still holds its slot for a window (the server may have seen it)."""

    async def acquire(
        self, on_wait: WaitCallback | None = None, *, priority: Priority = "interactive"
    ) -> Lease:
        raise NotImplementedError

    async def release(self, lease: Lease) -> None:
        raise NotImplementedError

    @asynccontextmanager
    async def slot(
        self, on_wait: WaitCallback | None = None, *, priority: Priority = "interactive"
    ) -> AsyncIterator[Lease]:
        lease = await self.acquire(on_wait, priority=priority)
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
    one waits exactly until the earliest slot frees. Waiters of one priority are served
    first come, first served (one gate each, FIFO); a bulk waiter also gives way to any
    interactive one, and never takes one of the ``reserve`` slots (default
    `default_reserve`). A task cancelled while waiting takes no slot.
    """

    def __init__(
        self,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        window: float = DEFAULT_WINDOW,
        *,
        reserve: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.reserve = check_limit(max_requests, window, reserve)
        self.max_requests = max_requests
        self.window = float(window)
        self.stats = LimiterStats()
        self._clock = clock
        # per priority: ascending times at which released slots free up, and in flight
        self._frees_at: dict[Priority, list[float]] = {p: [] for p in PRIORITIES}
        self._in_flight: dict[Priority, int] = dict.fromkeys(PRIORITIES, 0)
        self._blocked_until = -math.inf
        self._gate = {p: asyncio.Lock() for p in PRIORITIES}
        self._changed = {p: asyncio.Event() for p in PRIORITIES}
        self._serial = 0
        # acquisitions not yet granted, per priority: the one at the gate and its queue
        self._pending: dict[Priority, int] = dict.fromkeys(PRIORITIES, 0)

    def _now(self) -> float:
        if self._clock is None:  # the running loop's clock, looked up once (a limiter
            self._clock = asyncio.get_running_loop().time  # serves one loop, as its lock)
        return self._clock()

    def _purge(self, now: float) -> None:
        for frees in self._frees_at.values():
            cut = bisect.bisect_right(frees, now)
            if cut:
                del frees[:cut]

    @property
    def _all_frees(self) -> list[float]:
        """Every released slot's free time, ascending."""
        return list(heapq.merge(self._frees_at["interactive"], self._frees_at["bulk"]))

    def _held(self, priority: Priority | None = None) -> int:
        if priority is not None:
            return self._in_flight[priority] + len(self._frees_at[priority])
        in_flight, frees = self._in_flight, self._frees_at
        return (
            in_flight["interactive"]
            + in_flight["bulk"]
            + len(frees["interactive"])
            + len(frees["bulk"])
        )

    def _delay(self, now: float, priority: Priority) -> float | None:
        """0 when a slot is free now for ``priority``; else seconds until one may be;
        None if the slot it needs is held by a request still in flight (or, for bulk,
        an interactive acquisition is waiting)."""
        self._purge(now)
        if now < self._blocked_until:
            return self._blocked_until - now
        held = self._held()
        # merging the free times costs O(slots): only when every slot is held
        total = (
            0.0
            if held < self.max_requests
            else _slots_until(now, held, self._all_frees, self.max_requests)
        )
        if priority == "interactive" or total is None:
            return total
        if self._pending["interactive"]:
            return None  # woken when the interactive one is granted
        bulk = _slots_until(
            now, self._held("bulk"), self._frees_at["bulk"], self.max_requests - self.reserve
        )
        return None if bulk is None else max(total, bulk)

    @property
    def in_use(self) -> int:
        """Slots held now: requests in flight plus those released less than a window ago."""
        self._purge(self._now())
        return self._held()

    def _expected_wait(self, now: float, ahead: int, priority: Priority) -> float:
        """Seconds until the slot of an acquisition queued behind ``ahead`` others of its
        priority frees: the ``ahead``-th slot to free (one window when that one is not
        known yet); for bulk, the later of that among all slots and among bulk ones."""
        self._purge(now)
        free_now = self.max_requests - self._held()
        frees = self._all_frees if ahead >= free_now else []
        wait = wait_behind(now, ahead - free_now, frees, self.window, self._blocked_until)
        if priority == "bulk":
            bulk_free = self.max_requests - self.reserve - self._held("bulk")
            bulk = self._frees_at["bulk"]
            wait = max(wait, wait_behind(now, ahead - bulk_free, bulk, self.window, -math.inf))
        return wait

    async def acquire(
        self, on_wait: WaitCallback | None = None, *, priority: Priority = "interactive"
    ) -> Lease:
        # Arrival and the wait notice come before the gate: a task queued behind the one
        # waiting at the gate waits as well, and is counted and told like it.
        started = self._now()
        told = waited = False
        if self._pending[priority]:
            expected = self._expected_wait(started, self._pending[priority], priority)
            if expected > 0:
                waited = told = True
                if on_wait is not None:
                    on_wait(expected)
        self._pending[priority] += 1
        changed = self._changed[priority]
        try:
            async with self._gate[priority]:
                while True:
                    delay = self._delay(self._now(), priority)
                    if delay == 0.0:
                        break
                    waited = True
                    if on_wait is not None and not told:
                        told = True
                        on_wait(delay if delay is not None else self.window)
                    changed.clear()
                    with anyio.move_on_after(math.inf if delay is None else delay):
                        await changed.wait()
                self._in_flight[priority] += 1
                self._serial += 1
                now = self._now()
                self.stats.requests += 1
                if waited:  # merely passing through an uncontended gate is not a wait
                    self.stats.waits += 1
                    self.stats.wait_seconds += now - started
                return Lease(str(self._serial), now, priority)
        finally:
            self._pending[priority] -= 1
            if priority == "interactive":
                self._changed["bulk"].set()  # a bulk waiter may have given way to it

    def try_acquire(self, priority: Priority = "interactive") -> Lease | None:
        """A slot at once, or None when `acquire` would have to wait (or queue behind
        another acquisition of ``priority``). Granted exactly as an uncontended
        `acquire` grants it, without a coroutine; pair it with `release_now`."""
        if self._pending[priority]:
            return None
        now = self._now()
        # `_delay(now, priority) == 0.0`, spelt out: a slot is free for ``priority``.
        frees = self._frees_at
        interactive, bulk = frees["interactive"], frees["bulk"]
        if (interactive and interactive[0] <= now) or (bulk and bulk[0] <= now):
            self._purge(now)
        if now < self._blocked_until:
            return None
        in_flight = self._in_flight
        bulk_held = in_flight["bulk"] + len(bulk)
        if bulk_held + in_flight["interactive"] + len(interactive) >= self.max_requests:
            return None
        if priority == "bulk" and (
            self._pending["interactive"] or bulk_held >= self.max_requests - self.reserve
        ):
            return None
        in_flight[priority] += 1
        self._serial += 1
        self.stats.requests += 1
        if priority == "interactive":
            self._changed["bulk"].set()  # as `acquire` does on its way out
        return Lease(str(self._serial), now, priority)

    def release_now(self, lease: Lease) -> None:
        """`release`, synchronously (it never suspends)."""
        self._release(lease)

    async def renew(self, lease: Lease) -> bool:
        return True  # in-process slots never expire: they die with the process

    async def release(self, lease: Lease) -> None:
        self._release(lease)

    def _release(self, lease: Lease) -> None:
        self._in_flight[lease.priority] -= 1
        bisect.insort(self._frees_at[lease.priority], self._now() + self.window)
        changed = self._changed
        changed["interactive"].set()
        changed["bulk"].set()

    def slot(  # type: ignore[override]  # the mixin's is a generator-based manager
        self, on_wait: WaitCallback | None = None, *, priority: Priority = "interactive"
    ) -> AbstractAsyncContextManager[Lease]:
        """As `Limiter.slot`, without a shielded scope: the release never suspends, so
        no cancellation can come between the request and it (a third of the slot's cost).
        A subclass with its own `release` gets the shielded slot, which calls it."""
        if type(self).release is not SlidingWindowLimiter.release:
            return super().slot(on_wait, priority=priority)
        return _InProcessSlot(self, on_wait, priority)

    async def penalize(self, retry_after: float | None = None) -> None:
        hold = self.window if retry_after is None else retry_after
        self._blocked_until = max(self._blocked_until, self._now() + hold)
        for changed in self._changed.values():
            changed.set()


class _InProcessSlot:
    """`SlidingWindowLimiter.slot`: acquire on entry, release synchronously on exit."""

    __slots__ = ("_lease", "_limiter", "_on_wait", "_priority")

    def __init__(
        self, limiter: SlidingWindowLimiter, on_wait: WaitCallback | None, priority: Priority
    ) -> None:
        self._limiter, self._on_wait, self._priority = limiter, on_wait, priority
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._limiter.acquire(self._on_wait, priority=self._priority)
        return self._lease

    async def __aexit__(self, *exc_info: object) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._limiter._release(lease)


class LimiterFactory(Protocol):
    def __call__(self, key: str, max_requests: int, window: float, *, reserve: int) -> Limiter: ...


def _in_process(key: str, max_requests: int, window: float, *, reserve: int) -> Limiter:
    return SlidingWindowLimiter(max_requests, window, reserve=reserve)


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
        reserve: int | None = None,
    ) -> Limiter:
        """The token's limiter, made on first use; ``reserve`` None means the default."""
        reserve = check_limit(max_requests, window, reserve)
        key = token_key(token)
        table = self._tables.setdefault(asyncio.get_running_loop(), {})
        limiter = table.get(key)
        if limiter is None:
            limiter = table[key] = self._factory(key, max_requests, window, reserve=reserve)
        elif (limiter.max_requests, limiter.window, limiter.reserve) != (
            max_requests,
            float(window),
            reserve,
        ):
            raise ConfigurationError(
                "this token already has a limiter with a different limit "
                f"({limiter.max_requests} per {limiter.window:g}s, reserve "
                f"{limiter.reserve}); one token, one limit"
            )
        return limiter

    def limiters(self) -> dict[str, Limiter]:
        """This loop's limiters by token key."""
        return dict(self._tables.get(asyncio.get_running_loop(), {}))


default_registry = LimiterRegistry()
"""The process-wide registry that clients use unless given another."""
