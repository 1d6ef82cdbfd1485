"""One conformance suite for every `Limiter` backend: in-process, Redis and the local
SQLite limit store.

The in-process backend runs on virtual time (looptime), where every bound below holds
exactly. The Redis backend and the SQLite store cannot: they read the Redis server's
clock and the boot clock, which are real. So what a test asserts is ordering, not
duration: a waiter is granted no earlier than its slot frees (``SLACK`` covers
microsecond rounding), and a wait estimate lies
between the bounds that the observed times of the calls allow. The only upper bounds on
real time are ``LATE``, less than a window: they catch a waiter woken a window too late.
The invariant checked throughout is the limiter's contract: at every acquisition, at most
``max_requests`` slots are held, a slot being held from its acquisition until ``window``
seconds after its release.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from redis_server import free_port, redis_server  # tests/ is on sys.path

from lexer_activity_async.exceptions import ConfigurationError, LimiterBackendError
from lexer_activity_async.limits import (
    Limiter,
    LimiterRegistry,
    Priority,
    SlidingWindowLimiter,
    token_key,
)
from lexer_activity_async.limits_sqlite import LimitStore, SqliteLimiter

if TYPE_CHECKING:
    from redis.asyncio import Redis

N = 5
W = 0.5
SLACK = 0.002  # early-side tolerance: microsecond rounding, timer granularity
LATE = 0.4  # late-side tolerance on real time (Redis): scheduling and round trips, < W


def now() -> float:
    return asyncio.get_running_loop().time()


# --------------------------------------------------------------------------- fixtures


class Backend:
    """Makes limiters of one kind. ``make(key=...)`` with the same key gives limiters that
    share slots (separate Redis connections, as separate processes would have)."""

    name = "memory"
    shared = False  # do slots outlive their holder (leases)?

    def make(
        self,
        max_requests: int = N,
        window: float = W,
        *,
        lease_timeout: float = 60.0,
        key: str | None = None,
        reserve: int | None = None,
    ) -> Limiter:
        return SlidingWindowLimiter(max_requests, window, reserve=reserve)

    async def aclose(self) -> None:
        pass


class RedisBackend(Backend):
    name = "redis"
    shared = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.key = uuid.uuid4().hex
        self.prefix = f"test:{uuid.uuid4().hex[:8]}:"
        self.clients: list[Redis] = []

    def client(self) -> Redis:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(self.url)
        self.clients.append(client)
        return client

    def make(
        self,
        max_requests: int = N,
        window: float = W,
        *,
        lease_timeout: float = 60.0,
        key: str | None = None,
        reserve: int | None = None,
    ) -> Limiter:
        from lexer_activity_async.limits_redis import RedisLimiter

        return RedisLimiter(
            self.client(),
            key or self.key,
            max_requests,
            window,
            reserve=reserve,
            lease_timeout=lease_timeout,
            prefix=self.prefix,
        )

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


class SqliteBackend(Backend):
    """Limiters over one store file; each ``make`` opens its own `LimitStore` (its own
    connection), as a separate process would."""

    name = "sqlite"
    shared = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key = uuid.uuid4().hex
        self.stores: list[LimitStore] = []

    def make(
        self,
        max_requests: int = N,
        window: float = W,
        *,
        lease_timeout: float = 60.0,
        key: str | None = None,
        reserve: int | None = None,
    ) -> Limiter:
        store = LimitStore(self.path)
        self.stores.append(store)
        return SqliteLimiter(
            store,
            key or self.key,
            max_requests,
            window,
            reserve=reserve,
            lease_timeout=lease_timeout,
        )

    async def aclose(self) -> None:
        for store in self.stores:
            store.close()


def _make_backend(request: pytest.FixtureRequest, name: str) -> Backend:
    if name == "memory":
        return Backend()
    if name == "sqlite":
        return SqliteBackend(request.getfixturevalue("tmp_path") / "limits.sqlite3")
    return RedisBackend(request.getfixturevalue("redis_url"))


@pytest.fixture(
    params=[
        pytest.param("memory", marks=pytest.mark.looptime),
        pytest.param("redis", marks=pytest.mark.redis),
        "sqlite",
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    made = _make_backend(request, request.param)
    yield made
    await made.aclose()


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis), "sqlite"])
async def shared_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The backends whose slots outlive their holder and are shared between processes."""
    made = _make_backend(request, request.param)
    yield made
    await made.aclose()


@pytest.fixture
async def rbackend(redis_url: str) -> AsyncIterator[RedisBackend]:
    made = RedisBackend(redis_url)
    yield made
    await made.aclose()


# --------------------------------------------------------------------------- helpers


def assert_window_invariant(spans: list[tuple[float, float]], max_requests: int) -> None:
    """``spans`` are (acquired, released) times. At every acquisition at most
    ``max_requests`` slots may be held, a slot being held until ``W`` after release."""
    for t, _ in spans:
        held = sum(1 for a, r in spans if a <= t < r + W - SLACK)
        assert held <= max_requests, f"{held} slots held at t={t:.4f}"


async def run_workload(
    limiters: list[Limiter],
    *,
    workers: int,
    per_worker: int,
    seed: int,
    priorities: tuple[Priority, ...] = ("interactive",),
    by_priority: dict[Priority, list[tuple[float, float]]] | None = None,
) -> list[tuple[float, float]]:
    """Workers make requests of random duration through ``slot``, spread over
    ``limiters`` and ``priorities``; returns the recorded (acquired, released) spans
    (also filed by priority into ``by_priority`` when given)."""
    rng = random.Random(seed)
    spans: list[tuple[float, float]] = []
    plans = [[rng.uniform(0, 0.12) for _ in range(per_worker)] for _ in range(workers)]

    async def worker(limiter: Limiter, plan: list[float], priority: Priority) -> None:
        for duration in plan:
            async with limiter.slot(priority=priority):
                acquired = now()
                await asyncio.sleep(duration)
                spans.append((acquired, now()))
                if by_priority is not None:
                    by_priority.setdefault(priority, []).append(spans[-1])

    await asyncio.gather(
        *(
            worker(limiters[i % len(limiters)], plan, priorities[i % len(priorities)])
            for i, plan in enumerate(plans)
        )
    )
    return spans


# --------------------------------------------------------------------------- conformance


async def test_burst_then_next_waits_for_a_window_after_the_earliest_release(
    backend: Backend,
) -> None:
    limiter = backend.make()
    start = now()
    leases = [await limiter.acquire() for _ in range(N)]
    assert now() - start < LATE, "a burst of max_requests must not wait"

    told: list[float] = []
    asked = now()
    waiter = asyncio.create_task(limiter.acquire(told.append))
    await asyncio.sleep(0.1)
    assert not waiter.done(), "acquisition N+1 must wait while N slots are in flight"
    released = now()
    await limiter.release(leases[0])
    await waiter
    got = now()
    assert released + W - SLACK <= got <= released + W + LATE
    # every slot is in flight, so no release time is known: the estimate is one window
    assert told == [pytest.approx(W, abs=SLACK)]
    assert limiter.stats.requests == N + 1
    # (SlidingWindowLimiter counts any acquisition during which its clock moved as a
    # wait, so under a real clock only ">= 1" is common to both backends)
    assert limiter.stats.waits >= 1
    # the wait began after `asked` and before the release, and ended between a window
    # after the release and `got`
    assert W - SLACK <= limiter.stats.wait_seconds <= got - asked + SLACK


async def test_queued_waiters_are_told_their_expected_wait_and_counted(
    backend: Backend,
) -> None:
    # On a real clock (Redis, SQLite) every waiter must still find its slot held when it
    # arrives, however slow the machine: a longer window keeps that true under load.
    w = 4 * W if backend.shared else W
    limiter = backend.make(window=w)
    leases = [await limiter.acquire() for _ in range(N)]
    releasing: list[float] = []  # just before each release call ...
    released: list[float] = []  # ... and just after it
    for lease in leases:
        releasing.append(now())
        await limiter.release(lease)
        released.append(now())
        await asyncio.sleep(0.05)
    told: dict[int, list[float]] = {0: [], 1: [], 2: []}
    told_at: dict[int, float] = {}
    granted: dict[int, float] = {}

    def tell(i: int, seconds: float) -> None:
        told[i].append(seconds)
        told_at[i] = now()

    async def want(i: int) -> None:
        await limiter.acquire(lambda seconds: tell(i, seconds))
        granted[i] = now()

    arrival = now()
    await asyncio.gather(*(want(i) for i in range(3)))
    # the first waits at the gate, the others queue behind it: each is told once, with
    # the wait it then has, and gets the i-th slot to free. The slot frees a window after
    # its release, which happened between `releasing` and `released`; the estimate was
    # made between `arrival` and the moment it was told.
    for i in range(3):
        [estimate] = told[i]
        assert releasing[i] + w - told_at[i] - SLACK <= estimate
        assert estimate <= released[i] + w - arrival + SLACK
        assert releasing[i] + w - SLACK <= granted[i] <= released[i] + w + LATE
    # each wait began between `arrival` and its notice, and ended once its slot freed
    # and before `granted`
    most = sum(granted[i] - arrival for i in range(3)) + SLACK
    least = sum(releasing[i] + w - told_at[i] for i in range(3)) - SLACK
    if backend.shared:
        assert limiter.stats.waits == 3
        assert least <= limiter.stats.wait_seconds <= most
    else:
        # SlidingWindowLimiter counts an acquisition as a wait whenever its clock moved
        # during it: only a lower bound is common to every clock
        assert limiter.stats.waits >= 3
        assert limiter.stats.wait_seconds >= least


async def test_released_slot_frees_exactly_a_window_after_release(backend: Backend) -> None:
    limiter = backend.make()
    leases = [await limiter.acquire() for _ in range(N)]
    released = []
    for lease in leases[:2]:
        released.append(now())
        await limiter.release(lease)
        await asyncio.sleep(0.1)
    await limiter.acquire()
    assert released[0] + W - SLACK <= now() <= released[0] + W + LATE
    await limiter.acquire()
    assert released[1] + W - SLACK <= now() <= released[1] + W + LATE


async def test_sliding_window_invariant_under_load(backend: Backend) -> None:
    limiter = backend.make()
    spans = await run_workload([limiter], workers=8, per_worker=3, seed=1)
    assert len(spans) == 24
    assert_window_invariant(spans, N)
    # the limiter did constrain: 24 requests cannot fit in fewer than 4 windows
    assert max(a for a, _ in spans) - min(a for a, _ in spans) >= 4 * W - SLACK


async def test_penalize_blocks_for_retry_after_and_never_shortens(backend: Backend) -> None:
    limiter = backend.make()
    penalized = now()
    await limiter.penalize(0.4)
    await limiter.penalize(0.1)  # a shorter penalty does not shorten the block
    await limiter.acquire()
    assert penalized + 0.4 - SLACK <= now() <= penalized + 0.4 + LATE

    penalized = now()
    await limiter.penalize()  # no Retry-After: a whole window
    await limiter.acquire()
    assert penalized + W - SLACK <= now() <= penalized + W + LATE


async def test_penalty_wakes_a_waiter_no_earlier(backend: Backend) -> None:
    limiter = backend.make(max_requests=1)
    lease = await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.05)
    await limiter.release(lease)
    penalized = now()
    await limiter.penalize(W + 0.3)  # longer than the slot's own wait
    await waiter
    assert penalized + W + 0.3 - SLACK <= now() <= penalized + W + 0.3 + LATE


async def test_cancelled_waiter_takes_no_slot(backend: Backend) -> None:
    limiter = backend.make()
    leases = [await limiter.acquire() for _ in range(N)]
    doomed = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.05)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    released = now()
    for lease in leases:
        await limiter.release(lease)
    await asyncio.sleep(W)
    # all N slots are free again: a whole burst goes through without waiting
    start = now()
    for _ in range(N):
        await limiter.acquire()
    assert now() - start < LATE
    assert start >= released + W - SLACK
    assert limiter.stats.requests == 2 * N


async def test_cancelled_in_flight_request_keeps_its_slot_for_a_window(
    backend: Backend,
) -> None:
    limiter = backend.make()
    sent = asyncio.Event()

    async def request() -> None:
        async with limiter.slot():
            sent.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(request())
    await sent.wait()
    await asyncio.sleep(0.05)
    cancelled = now()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(N - 1):
        await limiter.acquire()
    assert now() - cancelled < LATE
    await limiter.acquire()  # the cancelled request's slot, a window after cancellation
    assert cancelled + W - SLACK <= now() <= cancelled + W + LATE


async def test_waiters_are_served_in_fifo_order(backend: Backend) -> None:
    limiter = backend.make()
    leases = [await limiter.acquire() for _ in range(N)]
    order: list[int] = []

    async def waiter(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    tasks = []
    for i in range(N):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0.01)
    for lease in reversed(leases):  # freeing order must not matter
        await limiter.release(lease)
    await asyncio.gather(*tasks)
    assert order == list(range(N))


async def test_dead_holder_lease_is_held_for_lease_timeout_plus_window(
    shared_backend: Backend,
) -> None:
    """Shared backends only: in-process slots die with their process, so have no leases."""
    backend = shared_backend
    lease_timeout = 0.3
    dead = backend.make(lease_timeout=lease_timeout)
    before = now()
    for _ in range(N):
        await dead.acquire()  # ... and the holder dies: never released
    granted = now()
    live = backend.make(lease_timeout=lease_timeout)
    await live.acquire()
    assert before + lease_timeout + W - SLACK <= now() <= granted + lease_timeout + W + LATE


# --------------------------------------------------------------------------- priorities

R = 2  # the reserve: bulk work may hold N - R slots


async def test_bulk_leaves_the_reserve_to_interactive_calls(backend: Backend) -> None:
    limiter = backend.make(reserve=R)
    assert limiter.reserve == R
    start = now()
    bulk = [await limiter.acquire(priority="bulk") for _ in range(N - R)]
    assert now() - start < LATE, "bulk work gets N - reserve slots at once"
    told: list[float] = []
    waiter = asyncio.create_task(limiter.acquire(told.append, priority="bulk"))
    await asyncio.sleep(0.1)
    assert not waiter.done(), "bulk work must not take the reserve"
    # the reserve is the interactive calls': taken at once, past the waiting bulk one
    interactive_told: list[float] = []
    started = now()
    interactive = [await limiter.acquire(interactive_told.append) for _ in range(R)]
    assert now() - started < LATE
    assert interactive_told == []
    assert limiter.stats.waits == 0
    assert [lease.priority for lease in bulk + interactive] == ["bulk"] * (N - R) + [
        "interactive"
    ] * R
    # an interactive slot freeing does not let bulk work in: bulk holds its N - R
    await limiter.release(interactive[0])
    await asyncio.sleep(0.1)
    assert not waiter.done()
    released = now()
    await limiter.release(bulk[0])
    lease = await waiter
    assert released + W - SLACK <= now() <= released + W + LATE
    assert lease.priority == "bulk"
    # every bulk slot was in flight when it asked: the estimate is one window
    assert told == [pytest.approx(W, abs=SLACK)]


async def test_interactive_calls_may_use_every_slot_bulk_leaves_free(backend: Backend) -> None:
    limiter = backend.make(reserve=R)
    start = now()
    leases = [await limiter.acquire() for _ in range(N)]
    assert now() - start < LATE
    bulk = asyncio.create_task(limiter.acquire(priority="bulk"))
    await asyncio.sleep(0.1)
    assert not bulk.done(), "bulk work still counts the interactive slots against N"
    released = now()
    await limiter.release(leases[0])
    await bulk
    assert released + W - SLACK <= now() <= released + W + LATE


async def test_a_waiting_interactive_call_goes_before_waiting_bulk_work(
    backend: Backend,
) -> None:
    limiter = backend.make(reserve=0)  # no reserve: both wait for the same slots
    leases = [await limiter.acquire() for _ in range(N)]
    order: list[Priority] = []

    async def want(priority: Priority) -> None:
        await limiter.acquire(priority=priority)
        order.append(priority)

    bulk = asyncio.create_task(want("bulk"))
    await asyncio.sleep(0.05)  # bulk asked first ...
    interactive = asyncio.create_task(want("interactive"))
    await asyncio.sleep(0.05)
    await limiter.release(leases[0])
    await interactive  # ... but the slot that frees is the interactive call's
    assert order == ["interactive"]
    assert not bulk.done()
    await limiter.release(leases[1])
    await bulk
    assert order == ["interactive", "bulk"]


async def test_window_invariant_holds_for_mixed_priorities(backend: Backend) -> None:
    limiter = backend.make(reserve=R)
    by_priority: dict[Priority, list[tuple[float, float]]] = {}
    spans = await run_workload(
        [limiter],
        workers=4,
        per_worker=3,
        seed=4,
        priorities=("bulk", "bulk", "bulk", "interactive"),
        by_priority=by_priority,
    )
    assert len(spans) == 12
    assert_window_invariant(spans, N)
    assert_window_invariant(by_priority["bulk"], N - R)
    assert len(by_priority["bulk"]) == 9


async def test_bad_settings_raise_configuration_error(backend: Backend) -> None:
    for bad in (
        {"reserve": N},
        {"reserve": -1},
        {"reserve": 1.5},
        {"max_requests": 0},
        {"window": 0.0},
    ):
        with pytest.raises(ConfigurationError):
            backend.make(**bad)
    assert backend.make(max_requests=100).reserve == 10  # the default: 10 % of N
    assert backend.make(max_requests=9).reserve == 0
    if backend.shared:
        with pytest.raises(ConfigurationError, match="lease_timeout"):
            backend.make(lease_timeout=0.0)


async def test_registry_refuses_a_second_reserve_for_one_token() -> None:
    registry = LimiterRegistry()
    limiter = registry.get("tok-reserve", max_requests=N, window=W, reserve=R)
    assert registry.get("tok-reserve", max_requests=N, window=W, reserve=R) is limiter
    with pytest.raises(ConfigurationError, match="reserve"):
        registry.get("tok-reserve", max_requests=N, window=W, reserve=R + 1)
    with pytest.raises(ConfigurationError, match="reserve"):
        registry.get("tok-other", max_requests=N, window=W, reserve=N)


async def test_renew_holds_the_slot_a_whole_lease_from_the_renewal(
    shared_backend: Backend,
) -> None:
    """A request that waited (for an in-flight cap) after its slot was granted renews it
    before sending: a holder dying then keeps it a lease and a window from the renewal."""
    lease_timeout = 0.3
    limiter = shared_backend.make(max_requests=1, lease_timeout=lease_timeout)
    other = shared_backend.make(max_requests=1, lease_timeout=lease_timeout)
    lease = await limiter.acquire()
    await asyncio.sleep(0.2)
    renewing = now()
    assert await limiter.renew(lease)
    await other.acquire()  # the holder "died": never released
    assert renewing + lease_timeout + W - SLACK <= now()
    assert now() <= renewing + lease_timeout + W + LATE


async def test_renew_retakes_an_expired_lease_only_if_its_priority_has_room(
    shared_backend: Backend,
) -> None:
    limiter = shared_backend.make(max_requests=2, reserve=1, lease_timeout=0.1)
    lost = await limiter.acquire(priority="bulk")
    await asyncio.sleep(0.1 + W + 0.05)  # its lease expired unrenewed
    taken = await limiter.acquire(priority="bulk")  # the only bulk slot
    assert not await limiter.renew(lost), "bulk work has no room: the lease is lost"
    await limiter.release(taken)
    await asyncio.sleep(W + 0.05)
    assert await limiter.renew(lost), "room again: taken anew"
    blocked = asyncio.create_task(limiter.acquire(priority="bulk"))
    await asyncio.sleep(0.1)
    assert not blocked.done(), "the retaken lease counts as bulk"
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked


async def test_in_process_slots_always_renew() -> None:
    limiter = SlidingWindowLimiter(N, W)
    assert await limiter.renew(await limiter.acquire())


# --------------------------------------------------------------------------- shared only


async def test_two_processes_sharing_a_key_never_exceed_the_limit(
    shared_backend: Backend,
) -> None:
    first, second = shared_backend.make(), shared_backend.make()
    spans = await run_workload([first, second], workers=8, per_worker=3, seed=2)
    assert_window_invariant(spans, N)
    assert first.stats.requests + second.stats.requests == 24
    assert max(a for a, _ in spans) - min(a for a, _ in spans) >= 4 * W - SLACK


async def test_concurrent_burst_is_not_counted_as_waiting(shared_backend: Backend) -> None:
    limiter = shared_backend.make()
    told: list[float] = []
    start = now()
    await asyncio.gather(*(limiter.acquire(told.append) for _ in range(N)))
    assert now() - start < LATE
    # the tasks queued behind each other's Redis round trips, but none was rate limited
    assert told == []
    assert (limiter.stats.requests, limiter.stats.waits) == (N, 0)


async def test_release_in_another_process_frees_the_slot_a_window_later(
    shared_backend: Backend,
) -> None:
    holder, waiter_side = shared_backend.make(), shared_backend.make()
    leases = [await holder.acquire() for _ in range(N)]
    waiter = asyncio.create_task(waiter_side.acquire())
    await asyncio.sleep(0.1)
    released = now()
    await holder.release(leases[0])  # the waiter's process is not told: it polls
    await waiter
    assert released + W - SLACK <= now() <= released + W + LATE


async def test_late_release_after_lease_expiry_still_holds_a_window(
    shared_backend: Backend,
) -> None:
    limiter = shared_backend.make(max_requests=1, lease_timeout=0.1)
    overdue = await limiter.acquire()
    second = await limiter.acquire()  # granted when the first lease expired (0.1 + W)
    await limiter.release(second)
    await asyncio.sleep(0.1)
    late = now()
    await limiter.release(overdue)  # it did complete after all: it counts a window from now
    await limiter.acquire()  # two slots held under a limit of 1: both must free first
    assert late + W - SLACK <= now() <= late + W + LATE


# --------------------------------------------------------------------------- Redis only


@pytest.mark.redis
async def test_cancellation_during_the_redis_call_leaves_no_orphan_lease(
    rbackend: RedisBackend,
) -> None:
    import redis.asyncio

    from lexer_activity_async.limits_redis import RedisLimiter

    limiter = rbackend.make(max_requests=1000)
    assert isinstance(limiter, RedisLimiter)
    rng = random.Random(3)
    granted = 0
    for _ in range(60):
        task = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(rng.uniform(0, 0.002))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
            granted += 1
    probe: Redis = redis.asyncio.Redis.from_url(rbackend.url)
    try:
        assert await probe.zcard(limiter.leases_key) == granted
    finally:
        await probe.aclose()


@pytest.mark.redis
async def test_keys_expire_by_themselves(rbackend: RedisBackend) -> None:
    import redis.asyncio

    from lexer_activity_async.limits_redis import RedisLimiter

    limiter = rbackend.make(lease_timeout=0.2)
    assert isinstance(limiter, RedisLimiter)
    probe: Redis = redis.asyncio.Redis.from_url(rbackend.url)
    try:
        lease = await limiter.acquire()
        assert 0 < await probe.pttl(limiter.leases_key) <= (0.2 + W) * 1000 + 2
        await limiter.release(lease)
        assert 0 < await probe.pttl(limiter.leases_key) <= W * 1000 + 2
        await limiter.penalize(0.3)
        assert 0 < await probe.pttl(limiter.blocked_key) <= 300 + 2
        await asyncio.sleep(W + 0.05)
        assert await probe.exists(limiter.leases_key, limiter.blocked_key) == 0
    finally:
        await probe.aclose()


@pytest.mark.redis
async def test_registry_factory_keys_hold_no_raw_token(rbackend: RedisBackend) -> None:
    import redis.asyncio

    from lexer_activity_async.limits_redis import RedisLimiter, redis_limiter_factory

    token = "tok-SECRET-0123456789"
    registry = LimiterRegistry(factory=redis_limiter_factory(rbackend.url, prefix=rbackend.prefix))
    limiter = registry.get(token, max_requests=N, window=W)
    assert isinstance(limiter, RedisLimiter)
    assert registry.get(token, max_requests=N, window=W) is limiter
    probe: Redis = redis.asyncio.Redis.from_url(rbackend.url)
    try:
        async with limiter.slot():
            await limiter.penalize(30)  # long enough that the key cannot expire before the scan
        keys = [k.decode() async for k in probe.scan_iter(match=f"{rbackend.prefix}*")]
        assert sorted(keys) == sorted(
            f"{rbackend.prefix}{{{token_key(token)}}}:{kind}" for kind in ("leases", "blocked")
        )
        assert not any(token in key for key in keys)
    finally:
        await probe.aclose()
        await limiter._redis.aclose()


@pytest.mark.redis
async def test_redis_going_away_raises_backend_error(rbackend: RedisBackend) -> None:
    import redis.asyncio

    from lexer_activity_async.limits_redis import RedisLimiter

    with redis_server() as url:
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=1)
        limiter = RedisLimiter(client, "k", N, W, url=url)
        lease = await limiter.acquire()
    try:
        with pytest.raises(LimiterBackendError, match="rate-limiter backend"):
            await limiter.release(lease)
        with pytest.raises(LimiterBackendError):
            await limiter.acquire()
        with pytest.raises(LimiterBackendError):
            await limiter.penalize(1)
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_unreachable_redis_raises_backend_error_without_password() -> None:
    import redis.asyncio

    from lexer_activity_async.limits_redis import RedisLimiter, check_redis

    url = f"redis://user:s3cret-pw@127.0.0.1:{free_port()}/0"
    with pytest.raises(LimiterBackendError) as caught:
        await check_redis(url)
    assert "127.0.0.1" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)
    assert "***" in str(caught.value)

    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=1)
    try:
        limiter = RedisLimiter(client, "k", N, W, url=url)
        with pytest.raises(LimiterBackendError) as caught:
            await limiter.acquire()
        assert "s3cret-pw" not in str(caught.value)
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_check_redis_accepts_a_live_server(redis_url: str) -> None:
    from lexer_activity_async.limits_redis import check_redis

    await check_redis(redis_url)


def test_redact_url_hides_passwords() -> None:
    from lexer_activity_async.limits_redis import redact_url

    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://u:pw@h/2") == "rediss://u:***@h/2"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert "pw" not in redact_url("unix:///tmp/r.sock?db=0&password=pw")


def test_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from lexer_activity_async import limits_redis

    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(LimiterBackendError, match=r"lexer-activity-async\[redis\]"):
        limits_redis.redis_limiter_factory("redis://localhost")
