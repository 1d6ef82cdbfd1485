"""The backfill's overall cap on requests in flight, admitting waiters by rank.

A token's run ends with its last rate window, whose requests take the slots freed W
after the responses of the first requests of the window before, and so on back to the
first window (see `plan.window_order`). When many tokens' windows open at once, the
client's CPU serves the burst one response at a time, so what counts is that every
token's first requests of a window go out before any token's later ones. A waiter's
rank is its request's place within its token's rate window (`rank`): lowest first, ties
in arrival order. anyio's `CapacityLimiter` admits in arrival order only, hence this.
"""

from __future__ import annotations

import heapq
import itertools
from contextvars import ContextVar

import anyio
import anyio.lowlevel

__all__ = ["RankedCapacity", "rank"]

rank: ContextVar[int] = ContextVar("lexer_activity_async.backfill.rank", default=0)
"""The rank of the current task's requests (set by a token's worker per fetch)."""


class _Waiter:
    __slots__ = ("event", "gone", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False
        self.gone = False


class RankedCapacity:
    """At most ``total`` holders at once; a freed place goes to the waiter of lowest rank
    (then the earliest). A waiter cancelled before it is admitted takes no place; one
    cancelled as it was admitted passes its place on."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._waiters: list[tuple[int, int, _Waiter]] = []
        self._arrivals = itertools.count()
        self._waiting = 0
        self.members = 0
        """Tokens running under the cap (each counts itself in and out)."""

    @property
    def fair_share(self) -> int:
        """The places each member may count on when all want more: ``total`` split over
        `members`, at least one."""
        return max(1, self.total // max(1, self.members))

    @property
    def waiting(self) -> int:
        """Tasks waiting for a place."""
        return self._waiting

    @property
    def held(self) -> int:
        """Places held."""
        return self.total - self._free

    async def acquire(self, rank: int = 0) -> None:
        """Take a place, waiting behind lower ranks (and earlier arrivals of the same)."""
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

    def release(self) -> None:
        """Give a place back: to the next waiter, else to the free ones."""
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if waiter.gone:
                continue
            waiter.granted = True
            self._waiting -= 1
            waiter.event.set()
            return
        self._free += 1
