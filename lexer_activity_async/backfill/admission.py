"""The backfill's overall cap on requests in flight, admitting waiters by rank.

A token's run ends with its last rate window, whose requests take the slots freed W
after the responses of the first requests of the window before, and so on back to the
first window (see `plan.window_order`). When many tokens' windows open at once, the
client's CPU serves the burst one response at a time, so what counts is that every
token's first requests of a window go out before any token's later ones. A waiter's
rank is its request's place within its token's rate window (`rank`): lowest first, ties
in arrival order. anyio's `CapacityLimiter` admits in arrival order only, hence this.

A joined fetch (`large`) answers for up to 12 windows at once, and its body, parsed
tree and sliced windows are the largest things a run holds; with every token's joined
fetches at the same place in its first rate window, dozens of them would arrive
together. Only one place in `LARGE_SHARE` may hold one: the memory a run's peak
leaves behind (freed, but not given back to the OS) is then that of a few, not of
dozens. Joined fetches are few (a token's 12-month spans), so the run is no slower
(`benchmarks/bench_backfill.py`).
"""

from __future__ import annotations

import heapq
import itertools
from contextvars import ContextVar

import anyio
import anyio.lowlevel

__all__ = ["RankedCapacity", "rank", "large", "LARGE_SHARE"]

rank: ContextVar[int] = ContextVar("lexer_activity_async.backfill.rank", default=0)
"""The rank of the current task's requests (set by a token's worker per fetch)."""
large: ContextVar[bool] = ContextVar("lexer_activity_async.backfill.large", default=False)
"""Whether the current task's request answers for several windows (a joined fetch)."""

LARGE_SHARE = 16
"""One place in this many (at least one) may hold a `large` request."""


class _Waiter:
    __slots__ = ("event", "gone", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False
        self.gone = False


class RankedCapacity:
    """At most ``total`` holders at once, of which at most `large_total` large ones; a
    freed place goes to the waiter of lowest rank (then the earliest). A waiter
    cancelled before it is admitted takes no place; one cancelled as it was admitted
    passes its place on."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.large_total = max(1, total // LARGE_SHARE)
        self._large = anyio.Semaphore(self.large_total)
        self._free = total
        self._waiters: list[tuple[int, int, _Waiter]] = []
        self._arrivals = itertools.count()
        self._waiting = 0
        self._large_waiting = 0
        self.members = 0
        """Tokens running under the cap (each counts itself in and out)."""

    @property
    def fair_share(self) -> int:
        """The places each member may count on when all want more: ``total`` split over
        `members`, at least one."""
        return max(1, self.total // max(1, self.members))

    @property
    def waiting(self) -> int:
        """Tasks waiting for a place, or for a large one."""
        return self._waiting + self._large_waiting

    @property
    def held(self) -> int:
        """Places held."""
        return self.total - self._free

    async def acquire(self, rank: int = 0, *, large: bool = False) -> None:
        """Take a place, waiting behind lower ranks (and earlier arrivals of the same);
        a ``large`` request first waits for one of the large places, in arrival order
        (holding no place meanwhile)."""
        if not large:
            await self._acquire(rank)
            return
        self._large_waiting += 1
        try:
            await self._large.acquire()
        finally:
            self._large_waiting -= 1
        try:
            await self._acquire(rank)
        except BaseException:
            self._large.release()
            raise

    async def _acquire(self, rank: int) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._free and not self._waiting:
            self._free -= 1  # no yield: on a CPU-bound burst every switch costs
            return
        waiter = _Waiter()
        heapq.heappush(self._waiters, (rank, next(self._arrivals), waiter))
        self._waiting += 1
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()
            else:
                waiter.gone = True
                self._waiting -= 1
            raise

    def release(self, *, large: bool = False) -> None:
        """Give a place back (``large``: as `acquire` took it): to the next waiter, else
        to the free ones."""
        if large:
            self._large.release()
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if waiter.gone:
                continue
            waiter.granted = True
            self._waiting -= 1
            waiter.event.set()
            return
        self._free += 1
