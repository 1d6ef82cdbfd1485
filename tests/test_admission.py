"""The backfill's overall cap admits by rank: lowest first, ties in arrival order, never
more holders than its total (nor more large ones than their share), and a cancelled
waiter takes no place and loses none."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lexer_activity_async.backfill.admission import LARGE_SHARE, RankedCapacity


async def settle() -> None:
    """Let every task that can run do so (no timing involved)."""
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


async def admit(cap: RankedCapacity, admitted: list[str], name: str, rank: int) -> None:
    """Wait for a place at ``rank``, note ``name`` as admitted, give the place back."""
    await cap.acquire(rank)
    admitted.append(name)
    cap.release()


async def test_a_free_place_is_taken_at_once_and_waiters_go_by_rank_then_arrival() -> None:
    cap = RankedCapacity(1)
    await cap.acquire(rank=7)
    admitted: list[str] = []

    async with anyio.create_task_group() as group:
        for name, rank in (("late-40", 40), ("b-3", 3), ("c-3", 3), ("a-0", 0)):
            group.start_soon(admit, cap, admitted, name, rank)
            await settle()  # arrivals in this order
        assert cap.waiting == 4
        assert admitted == []
        cap.release()
    assert admitted == ["a-0", "b-3", "c-3", "late-40"]
    assert cap.waiting == 0
    assert cap.held == 0


async def test_a_cancelled_waiter_takes_no_place() -> None:
    cap = RankedCapacity(1)
    await cap.acquire()
    admitted: list[str] = []

    async with anyio.create_task_group() as outer:
        with anyio.CancelScope() as doomed:
            async with anyio.create_task_group() as inner:
                inner.start_soon(admit, cap, admitted, "cancelled", 0)
                outer.start_soon(admit, cap, admitted, "kept", 5)
                await settle()
                assert cap.waiting == 2
                doomed.cancel()
        assert cap.waiting == 1
        cap.release()
    assert admitted == ["kept"]
    assert cap.held == 0


async def test_a_waiter_cancelled_as_it_is_admitted_passes_its_place_on() -> None:
    """The place is granted, then the waiter is cancelled before it runs again. An asyncio
    task's `cancel` is used, not a cancel scope: when a scope delivers its cancellation
    (anyio 4.0 does so a loop step later) decides whether the grant or the cancellation
    is seen first, and this test is about the second case."""
    cap = RankedCapacity(1)
    await cap.acquire()
    admitted: list[str] = []
    first = asyncio.ensure_future(cap.acquire(0))
    async with anyio.create_task_group() as group:
        group.start_soon(admit, cap, admitted, "second", 1)
        await settle()
        assert cap.waiting == 2
        cap.release()  # granted to "first", which has not run since ...
        first.cancel()  # ... and is cancelled before it does
        with pytest.raises(asyncio.CancelledError):
            await first
        await settle()
        assert admitted == ["second"]  # (else "second" would wait for ever)
    assert cap.held == 0
    assert cap.waiting == 0


async def test_an_acquire_in_a_cancelled_scope_takes_nothing() -> None:
    cap = RankedCapacity(2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await cap.acquire()
    assert cap.held == 0


def test_fair_share_splits_the_total_over_members() -> None:
    cap = RankedCapacity(64)
    assert cap.fair_share == 64
    cap.members = 10
    assert cap.fair_share == 6
    cap.members = 100
    assert cap.fair_share == 1


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(min_value=1, max_value=4),
    ranks=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=20),
)
def test_never_more_holders_than_the_total_and_each_admission_the_lowest_waiting(
    total: int, ranks: list[int]
) -> None:
    async def main() -> None:
        cap = RankedCapacity(total)
        holding, most = 0, 0
        waiting: dict[int, int] = {}  # index -> rank, while it waits
        violations: list[tuple[int, int]] = []

        async def one(index: int, rank: int) -> None:
            nonlocal holding, most
            waiting[index] = rank
            await cap.acquire(rank)
            del waiting[index]
            lower = [r for r in waiting.values() if r < rank]
            if lower:
                violations.append((rank, min(lower)))
            holding += 1
            most = max(most, holding)
            await settle()
            holding -= 1
            cap.release()

        async with anyio.create_task_group() as group:
            for index, rank in enumerate(ranks):
                group.start_soon(one, index, rank)
        assert most <= total
        assert violations == []
        assert cap.held == 0
        assert cap.waiting == 0

    anyio.run(main)


@pytest.mark.parametrize("total", [1, 3])
async def test_ranks_admitted_lowest_first_under_load(total: int) -> None:
    """Everyone arrives while the cap is full: admissions come out sorted by rank."""
    cap = RankedCapacity(total)
    for _ in range(total):
        await cap.acquire()
    order: list[int] = []

    async def one(rank: int) -> None:
        await cap.acquire(rank)
        order.append(rank)
        await settle()
        cap.release()

    ranks = [5, 1, 4, 1, 0, 9, 2, 6]
    async with anyio.create_task_group() as group:
        for rank in ranks:
            group.start_soon(one, rank)
        await settle()
        for _ in range(total):
            cap.release()
    assert order == sorted(ranks)


def test_large_places_are_a_share_of_the_total_and_at_least_one() -> None:
    assert RankedCapacity(64).large_total == 64 // LARGE_SHARE == 4
    assert RankedCapacity(LARGE_SHARE - 1).large_total == 1
    assert RankedCapacity(1).large_total == 1


async def test_large_requests_beyond_their_share_wait_holding_no_place() -> None:
    """Two large places of 32: the third and fourth large requests wait (and count as
    waiting, so that a token adds no worker to join them), neither holding nor queueing
    for a place, so a small request still goes at once."""
    cap = RankedCapacity(2 * LARGE_SHARE)
    assert cap.large_total == 2
    done = anyio.Event()
    inside: list[str] = []

    async def hold(name: str, large: bool) -> None:
        await cap.acquire(large=large)
        inside.append(name)
        await done.wait()
        cap.release(large=large)

    async with anyio.create_task_group() as group:
        for name in ("L1", "L2", "L3", "L4"):
            group.start_soon(hold, name, True)
        await settle()
        assert inside == ["L1", "L2"]
        assert cap.held == 2
        assert cap.waiting == 2
        group.start_soon(hold, "small", False)
        await settle()
        assert inside == ["L1", "L2", "small"]
        assert cap.held == 3
        done.set()
    assert sorted(inside) == ["L1", "L2", "L3", "L4", "small"]
    assert cap.held == 0


async def test_a_large_waiter_cancelled_while_queueing_for_a_place_frees_its_large_one() -> None:
    """The one place is held; a large request has the one large place and queues for a
    place when it is cancelled: the next large request gets both."""
    cap = RankedCapacity(1)
    await cap.acquire()
    admitted: list[str] = []

    async def admit_large(name: str) -> None:
        await cap.acquire(large=True)
        admitted.append(name)
        cap.release(large=True)

    async with anyio.create_task_group() as outer:
        with anyio.CancelScope() as doomed:
            async with anyio.create_task_group() as inner:
                inner.start_soon(admit_large, "cancelled")
                await settle()
                assert cap.waiting == 1  # it got the large place, and queues for a place
                doomed.cancel()
        assert cap.waiting == 0
        cap.release()
        outer.start_soon(admit_large, "next")
        await settle()
        assert admitted == ["next"]  # (else "next" waits for the large place for ever)
    assert cap.held == 0


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(min_value=1, max_value=3 * LARGE_SHARE),
    requests=st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=30),
)
def test_never_more_large_holders_than_their_share(
    total: int, requests: list[tuple[int, bool]]
) -> None:
    async def main() -> None:
        cap = RankedCapacity(total)
        holding = {False: 0, True: 0}
        most = {False: 0, True: 0}

        async def one(rank: int, large: bool) -> None:
            await cap.acquire(rank, large=large)
            holding[large] += 1
            most[large] = max(most[large], holding[large])
            assert holding[False] + holding[True] <= total
            await settle()
            holding[large] -= 1
            cap.release(large=large)

        async with anyio.create_task_group() as group:
            for rank, large in requests:
                group.start_soon(one, rank, large)
        assert most[True] <= cap.large_total
        assert most[True] == min(cap.large_total, sum(large for _, large in requests))
        assert cap.held == 0
        assert cap.waiting == 0

    anyio.run(main)
