"""SlidingWindowLimiter and LimiterRegistry, on virtual time (looptime) with the real limit.

Every test marked ``looptime`` runs its event loop on a fake clock that jumps straight to
the next timer, so five-minute windows take no wall time and every instant is exact (to
looptime's 1 µs resolution). Times are measured from ``t0 = loop.time()`` at the start of
each test, never assumed to start at 0.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import aiolimiter
import pytest

from lexer_activity_async import ConfigurationError, LexerClient
from lexer_activity_async.limits import Lease, LimiterRegistry, SlidingWindowLimiter, token_key

N = 100  # requests ...
W = 300.0  # ... per 5 minutes, per token: the API's real limit
EPS = 1e-6  # looptime's clock resolution


def now() -> float:
    return asyncio.get_running_loop().time()


def at(t: float) -> object:
    """Compares equal to a loop time within the fake clock's resolution."""
    return pytest.approx(t, abs=EPS)


def max_in_any_window(times: list[float], window: float = W) -> int:
    """The most of ``times`` that fall in any half-open span ``[s, s + window)``.

    The busiest span can be taken to start at one of the times, so a sorted sweep is
    exact. Half-open: a request at ``s + window`` is the next window's, which is how a
    sliding-window server counts (the limiter never does even that: an arrival precedes
    its completion, and a slot frees a full window after the completion).
    """
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, s + window - EPS / 2) - i for i, s in enumerate(ordered)),
        default=0,
    )


def test_max_in_any_window_helper() -> None:
    assert max_in_any_window([]) == 0
    assert max_in_any_window([0.0, 299.9, 300.0, 599.9]) == 2
    assert max_in_any_window([0.0, 300.0, 600.0]) == 1
    assert max_in_any_window([5.0, 1.0, 3.0, 400.0], window=3.0) == 2


async def fill(limiter: SlidingWindowLimiter, n: int = N) -> list[Lease]:
    return [await limiter.acquire() for _ in range(n)]


async def started(task: asyncio.Task[object]) -> None:
    """Let ``task`` run up to its first real suspension (here: queued in the limiter).
    Yielding to the loop advances no virtual time while anything else is runnable."""
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()


# -- bursts and the release rule ------------------------------------------------------


@pytest.mark.looptime
async def test_burst_of_100_is_immediate_and_the_101st_waits_for_first_release_plus_window() -> (
    None
):
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    leases = await fill(limiter)
    assert now() == t0  # not a single tick of (virtual) time passed
    assert {lease.acquired_at for lease in leases} == {t0}
    assert limiter.in_use == N
    assert limiter.stats.requests == N
    assert limiter.stats.waits == 0

    waiter_101 = asyncio.create_task(limiter.acquire())
    waiter_102 = asyncio.create_task(limiter.acquire())
    await started(waiter_101)
    # The first request to complete is not the first sent: number 57, after 2 s.
    await asyncio.sleep(2.0)
    await limiter.release(leases[57])
    await asyncio.sleep(3.0)  # the rest complete at t0 + 5
    for lease in leases[:57] + leases[58:]:
        await limiter.release(lease)

    lease_101 = await waiter_101
    assert now() == at(t0 + 2.0 + W)  # earliest completion + W, not t0 + W
    assert lease_101.acquired_at == at(t0 + 2.0 + W)
    lease_102 = await waiter_102
    assert lease_102.acquired_at == at(t0 + 5.0 + W)
    assert limiter.in_use == 2  # the other 98 releases have freed by now too


@pytest.mark.looptime
async def test_slot_frees_a_window_after_the_response_completed_not_after_the_send() -> None:
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    latency = 42.5
    held = await fill(limiter, N - 1)  # 99 slow requests stay in flight throughout
    async with limiter.slot() as lease:  # the 100th: sent at t0 ...
        assert lease.acquired_at == at(t0)
        await asyncio.sleep(latency)  # ... its response completes at t0 + L
    assert limiter.in_use == N

    nxt = await limiter.acquire()
    assert nxt.acquired_at == at(t0 + latency + W)  # not t0 + W
    assert nxt.acquired_at > t0 + W + 1
    for lease in [*held, nxt]:
        await limiter.release(lease)


# -- fairness ---------------------------------------------------------------------------


@pytest.mark.looptime
async def test_waiters_are_served_in_arrival_order_at_the_release_times() -> None:
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    leases = await fill(limiter)
    # Completions at t0 + 1, 2, ..., 100, in reverse order of sending.
    for lease in reversed(leases):
        await asyncio.sleep(1.0)
        await limiter.release(lease)

    granted: list[tuple[int, float]] = []

    async def want(i: int) -> None:
        lease = await limiter.acquire()
        granted.append((i, now()))
        await limiter.release(lease)  # a zero-latency request

    # 250 waiters arrive one after another, at t0 + 100, 100.5, ...
    tasks = []
    for i in range(250):
        tasks.append(asyncio.create_task(want(i)))
        await asyncio.sleep(0.5)
    await asyncio.gather(*tasks)

    assert [i for i, _ in granted] == list(range(250))  # strict FIFO, nobody starves
    times = [t - t0 for _, t in granted]
    # The first 100 take the slots released at 1..100 s, each a window later; the next
    # 100 take the slots those waiters released (at 301..400), a window later again.
    assert times[:100] == [at(k + W) for k in range(1, 101)]
    assert times[100:200] == [at(k + 2 * W) for k in range(1, 101)]
    assert times[200:] == [at(k + 3 * W) for k in range(1, 51)]
    assert max_in_any_window([t for _, t in granted]) == N


@pytest.mark.looptime
async def test_a_late_arrival_cannot_overtake_a_waiter_when_a_slot_frees() -> None:
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    leases = await fill(limiter)
    await limiter.release(leases[0])  # frees at t0 + W; the rest stay in flight
    order: list[str] = []

    async def want(name: str, arrive_at: float) -> Lease:
        await asyncio.sleep(arrive_at - (now() - t0))
        lease = await limiter.acquire()
        order.append(name)
        return lease

    early = asyncio.create_task(want("early", 10.0))
    # "late" arrives at the very instant the slot frees.
    late = asyncio.create_task(want("late", W))
    early_lease = await early
    assert early_lease.acquired_at == at(t0 + W)
    await started(late)  # "late" is queued, not holding a slot
    assert order == ["early"]
    assert limiter.in_use == N
    # The next slot, for "late", frees a window after the first of the others completes.
    await limiter.release(leases[1])
    late_lease = await late
    assert order == ["early", "late"]
    assert late_lease.acquired_at == at(t0 + 2 * W)


# -- cancellation -----------------------------------------------------------------------


@pytest.mark.looptime
async def test_a_task_cancelled_while_waiting_takes_no_slot() -> None:
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    leases = await fill(limiter)
    await asyncio.sleep(1.0)
    await limiter.release(leases[0])  # frees at t0 + 1 + W
    await asyncio.sleep(1.0)
    await limiter.release(leases[1])  # frees at t0 + 2 + W

    head = asyncio.create_task(limiter.acquire())  # waits at the gate
    b = asyncio.create_task(limiter.acquire())
    queued = asyncio.create_task(limiter.acquire())  # waits behind the gate
    d = asyncio.create_task(limiter.acquire())
    for task in (head, b, queued, d):
        await started(task)
    in_use = limiter.in_use
    await asyncio.sleep(10.0)
    head.cancel()
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await head
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert limiter.in_use == in_use == N

    # b and d get exactly the slots head and queued would have had.
    assert (await b).acquired_at == at(t0 + 1 + W)
    assert (await d).acquired_at == at(t0 + 2 + W)
    assert limiter.stats.requests == N + 2


@pytest.mark.looptime
async def test_a_request_cancelled_in_flight_keeps_its_slot_for_a_window_after_cancelling() -> None:
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    await fill(limiter, N - 1)  # never released: in flight for the whole test
    entered = asyncio.Event()

    async def request() -> None:
        async with limiter.slot():
            entered.set()
            await asyncio.sleep(1000.0)  # a hung request

    task = asyncio.create_task(request())
    await entered.wait()
    await asyncio.sleep(5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.in_use == N  # the cancelled request still holds its slot

    lease = await limiter.acquire()
    assert lease.acquired_at == at(t0 + 5.0 + W)


# -- 429 penalties ----------------------------------------------------------------------


@pytest.mark.looptime
async def test_penalize_without_retry_after_blocks_new_acquisitions_for_a_window() -> None:
    limiter = SlidingWindowLimiter(N, W)
    await asyncio.sleep(7.0)
    t0 = now()
    await limiter.penalize(None)
    assert limiter.in_use == 0  # blocked by the penalty alone, not by slots
    lease = await limiter.acquire()
    assert lease.acquired_at == at(t0 + W)
    assert limiter.stats.waits == 1
    assert limiter.stats.wait_seconds == at(W)
    # After the penalty the burst is available again.
    more = await fill(limiter, N - 1)
    assert {x.acquired_at for x in more} == {lease.acquired_at}


@pytest.mark.looptime
async def test_penalize_with_retry_after_blocks_for_that_long() -> None:
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    await limiter.penalize(10)
    lease = await limiter.acquire()
    assert lease.acquired_at == at(t0 + 10)


@pytest.mark.looptime
async def test_a_penalty_extends_a_running_wait_and_never_shortens_one() -> None:
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    leases = await fill(limiter)
    for lease in leases:
        await limiter.release(lease)  # all free at t0 + W
    waiter = asyncio.create_task(limiter.acquire())
    await started(waiter)
    await asyncio.sleep(100.0)
    await limiter.penalize(None)  # t0 + 100: blocked until t0 + 400
    await limiter.penalize(10)  # a shorter penalty does not shorten it
    assert (await waiter).acquired_at == at(t0 + 100 + W)


@pytest.mark.looptime
async def test_slots_keep_their_own_release_times_under_a_short_penalty() -> None:
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    leases = await fill(limiter)
    for lease in leases:
        await limiter.release(lease)  # free at t0 + W
    await limiter.penalize(10)
    lease = await limiter.acquire()
    assert lease.acquired_at == at(t0 + W)  # not t0 + 10


# -- stats and the wait callback ---------------------------------------------------------


@pytest.mark.looptime
async def test_stats_and_on_wait_count_every_waiting_acquisition_with_its_expected_wait() -> None:
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    leases = await fill(limiter)
    for lease in leases:  # completions at t0 + 1 .. t0 + 100
        await asyncio.sleep(1.0)
        await limiter.release(lease)
    await asyncio.sleep(100.0)  # t0 + 200: every slot is released, none free yet
    expected: dict[int, list[float]] = {0: [], 1: [], 2: [], 3: []}
    granted: dict[int, float] = {}

    async def want(i: int) -> None:
        lease = await limiter.acquire(on_wait=expected[i].append)
        granted[i] = lease.acquired_at

    tasks = [asyncio.create_task(want(i)) for i in range(3)]
    await asyncio.gather(*tasks)

    # One call each, with the wait it then actually had: the first waits at the gate,
    # the others queue behind it and are told (and counted) all the same.
    assert expected[0] == [at(101.0)]
    assert expected[1] == [at(102.0)]
    assert expected[2] == [at(103.0)]
    assert [granted[i] - t0 for i in range(3)] == [at(301.0), at(302.0), at(303.0)]
    assert limiter.stats.requests == N + 3
    assert limiter.stats.waits == 3
    assert limiter.stats.wait_seconds == pytest.approx(101.0 + 102.0 + 103.0, abs=1e-5)

    # An acquisition that does not wait is not told and not counted.
    await asyncio.sleep(W)
    await limiter.acquire(on_wait=expected[3].append)
    assert expected[3] == []
    assert limiter.stats.waits == 3
    assert limiter.stats.requests == N + 4


@pytest.mark.looptime
async def test_on_wait_is_told_a_window_when_every_slot_is_in_flight() -> None:
    limiter = SlidingWindowLimiter(N, W)
    t0 = now()
    leases = await fill(limiter)
    told: list[float] = []
    waiter = asyncio.create_task(limiter.acquire(on_wait=told.append))
    await started(waiter)
    assert told == [W]  # unknown yet: at least a window
    await asyncio.sleep(4.0)
    await limiter.release(leases[3])
    assert (await waiter).acquired_at == at(t0 + 4.0 + W)
    assert told == [W]  # still only once
    assert limiter.stats.wait_seconds == at(4.0 + W)


# -- the registry -------------------------------------------------------------------------


def unused_loopback_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def test_registry_shares_one_limiter_per_token_across_clients() -> None:
    registry = LimiterRegistry()
    url = unused_loopback_url()
    token_a, token_b = "tok-A-7c1f0e9d2b", "tok-B-55aa10ee01"
    a1 = LexerClient(token_a, api_url=url, registry=registry, label="first")
    a2 = LexerClient(f"  {token_a}\n", api_url=url, registry=registry, label="second")
    b = LexerClient(token_b, api_url=url, registry=registry)
    try:
        for client in (a1, a2, b):
            await client.open()
        assert a1.limiter is a2.limiter
        assert b.limiter is not a1.limiter
        assert a1.limiter.max_requests == N
        assert a1.limiter.window == W

        keys = registry.limiters()
        assert keys == {token_key(token_a): a1.limiter, token_key(token_b): b.limiter}
        assert set(keys) == {
            hashlib.sha256(token.encode()).hexdigest() for token in (token_a, token_b)
        }
        for key in keys:
            assert len(key) == 64
            assert int(key, 16) >= 0
            assert token_a not in key
            assert token_b not in key

        for different in ({"max_requests": 50}, {"window": 600.0}):
            other = LexerClient(token_a, api_url=url, registry=registry, **different)
            with pytest.raises(ConfigurationError, match="different limit") as info:
                await other.open()
            assert token_a not in str(info.value)
            await other.aclose()
        assert registry.limiters() == keys
    finally:
        for client in (a1, a2, b):
            await client.aclose()


# -- why not aiolimiter ----------------------------------------------------------------------


async def drive(
    slot: Callable[[], AbstractAsyncContextManager[object]], until: float
) -> list[float]:
    """Acquire as fast as possible (zero-latency requests) until ``until``; the times."""
    times: list[float] = []
    while now() < until:
        async with slot():
            times.append(now())
    return times


@pytest.mark.looptime
async def test_aiolimiter_admits_about_twice_the_limit_in_a_window_sliding_window_does_not() -> (
    None
):
    t0 = now()
    leaky = aiolimiter.AsyncLimiter(N, W)
    leaky_times = await drive(lambda: leaky, t0 + 4 * W)

    t1 = now()
    ours = SlidingWindowLimiter(N, W)
    our_times = await drive(ours.slot, t1 + 4 * W)

    # Leaky bucket: a burst of 100 at once, then one more every W / N = 3 s, so a span
    # starting at the burst holds 100 + 99 = 199.
    assert sum(t == at(t0) for t in leaky_times) == N
    assert leaky_times[N] - t0 == pytest.approx(W / N, abs=1e-3)
    assert 195 <= max_in_any_window(leaky_times) <= 200
    assert max_in_any_window(leaky_times) > N  # it breaks the API's contract

    # Sliding window: 100 at once, then the next 100 exactly a window later, and so on.
    assert max_in_any_window(our_times) == N
    assert [round(t - t1, 3) for t in our_times[::N]] == [0.0, W, 2 * W, 3 * W, 4 * W][
        : len(our_times[::N])
    ]
    # And it still uses the whole budget: every window holds exactly 100.
    for start in range(0, int(3 * W), 50):
        inside = [t for t in our_times if t1 + start <= t < t1 + start + W]
        assert len(inside) == N
