"""Priorities through the client, over real loopback HTTP against the sandbox: bulk calls
leave the reserve to interactive ones, per client and per call (reports, lists, exports,
export rows); the backfill runs as bulk; bad priorities and reserves are configuration
errors before any request; a slot lost while waiting for the in-flight cap is taken anew.
The window math per backend is in ``test_limiter_conformance.py``, the processes in
``test_priority_processes.py``."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.abc
import pytest
from conftest import TOKEN_A, ClientFor, SandboxFactory

from lexer_activity_async import (
    ConfigurationError,
    LexerClient,
    LexerTimeoutError,
    LimiterRegistry,
    sync,
)
from lexer_activity_async.backfill import BackfillSpec, TokenSource, run_backfill
from lexer_activity_async.events import RateLimitWait
from lexer_activity_async.exports import PollPolicy
from lexer_activity_async.limits import Lease, Priority, SlidingWindowLimiter, WaitCallback
from lexer_activity_async.sandbox import Sandbox
from lexer_activity_async.transport import RENEW_AFTER, HttpRequest, HttpResponse, MockTransport

JAN = datetime(2026, 1, 1, tzinfo=timezone.utc)
FEB = datetime(2026, 2, 1, tzinfo=timezone.utc)
POLL = PollPolicy(first_delay=0.01, cap=0.05)
KEY_A = Sandbox.key(TOKEN_A)


class Recording(SlidingWindowLimiter):
    """An in-process limiter that records the priority of each acquisition; its first
    ``lose`` renewals report the slot lost."""

    def __init__(self, *args: Any, lose: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.priorities: list[Priority] = []
        self.lose = lose
        self.renewals = 0

    async def acquire(
        self, on_wait: WaitCallback | None = None, *, priority: Priority = "interactive"
    ) -> Lease:
        self.priorities.append(priority)
        return await super().acquire(on_wait, priority=priority)

    async def renew(self, lease: Lease) -> bool:
        self.renewals += 1
        return self.renewals > self.lose


def recording_registry(made: list[Recording], lose: int = 0) -> LimiterRegistry:
    def factory(key: str, max_requests: int, window: float, *, reserve: int) -> Recording:
        made.append(Recording(max_requests, window, reserve=reserve, lose=lose))
        return made[-1]

    return LimiterRegistry(factory=factory)


async def test_bulk_calls_leave_the_reserve_to_interactive_calls(
    sandbox_factory: SandboxFactory, client_for: ClientFor
) -> None:
    """N = 5, reserve 2: three bulk calls take every bulk slot; a fourth waits (for the
    rest of the 300 s window) while two interactive calls go through at once."""
    sb = await sandbox_factory(max_requests=5, window=300.0)
    waits: list[RateLimitWait] = []
    bulk_waiting = anyio.Event()

    def on_event(event: object) -> None:
        if isinstance(event, RateLimitWait):
            waits.append(event)
            bulk_waiting.set()

    async with client_for(sb, priority="bulk", reserve=2, on_event=on_event) as client:
        assert (client.priority, client.reserve, client.limiter.reserve) == ("bulk", 2, 2)
        for _ in range(3):
            await client.groups()
        assert waits == []
        async with anyio.create_task_group() as group:
            group.start_soon(client.groups)  # bulk: waits though 2 of 5 slots are free
            await bulk_waiting.wait()
            with anyio.fail_after(5):
                assert await client.users(priority="interactive")
                assert await client.summary(JAN, FEB, priority="interactive")
            group.cancel_scope.cancel()
        assert len(waits) == 1, "the interactive calls never waited"
    assert sb.stats.requests[KEY_A] == 5
    assert sb.stats.rate_limited == 0


async def test_per_call_priority_reaches_the_limiter_for_every_kind_of_call(
    sandbox_factory: SandboxFactory, client_for: ClientFor, tmp_path: Path
) -> None:
    sb = await sandbox_factory()
    made: list[Recording] = []
    async with client_for(sb, registry=recording_registry(made)) as client:
        await client.users()  # the client's default: interactive
        await client.forms(priority="bulk")
        await client.report("summary", JAN, FEB, priority="bulk")
        await client.case_volume(JAN, FEB, priority="bulk")
        [limiter] = made
        assert limiter.priorities == ["interactive", "bulk", "bulk", "bulk"]
        limiter.priorities.clear()
        await client.export(
            "case_details", JAN, FEB, tmp_path / "c.csv", poll=POLL, priority="bulk"
        )
        assert len(limiter.priorities) >= 2  # the start and at least one status poll
        assert set(limiter.priorities) == {"bulk"}
        limiter.priorities.clear()
        rows = client.export_rows("case_details", JAN, FEB, poll=POLL, priority="bulk")
        assert [row async for row in rows]
        assert len(limiter.priorities) >= 2
        assert set(limiter.priorities) == {"bulk"}
        limiter.priorities.clear()
        job = await client.start_export("case_details", JAN, FEB, priority="bulk")
        await client.export_status(job.token)
        await client.wait_for_export(job, poll=POLL, priority="bulk")
        assert limiter.priorities[:2] == ["bulk", "interactive"]
        assert set(limiter.priorities[2:]) == {"bulk"}


async def test_the_backfill_runs_as_bulk_with_the_spec_reserve(
    sandbox_factory: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = await sandbox_factory()
    monkeypatch.setenv("LEXER_TEST_PRIORITY_TOKEN", TOKEN_A)
    spec = BackfillSpec(
        tokens=(TokenSource("a", env="LEXER_TEST_PRIORITY_TOKEN"),),
        date_from=datetime(2024, 1, 1, tzinfo=timezone.utc),
        date_to=datetime(2024, 3, 1, tzinfo=timezone.utc),
        output=tmp_path / "out",
        reports=("summary", "case_volume"),
        api_url=sb.api_url,
        status_url=sb.status_url,
        max_requests=sb.config.max_requests,
        window=sb.config.window,
        reserve=7,
    )
    made: list[Recording] = []
    summary = await run_backfill(spec, registry=recording_registry(made))
    assert summary.ok, summary.failed
    [limiter] = made
    assert len(limiter.priorities) == 3  # 2 months of summary, case_volume joined in one
    assert set(limiter.priorities) == {"bulk"}
    assert limiter.reserve == 7  # the spec's [rate_limit] reserve


@pytest.mark.parametrize(
    "options",
    [
        {"priority": "urgent"},
        {"priority": None},
        {"reserve": 5},  # all of N: bulk work could never send
        {"reserve": -1},
        {"reserve": 1.5},
        {"max_requests": 0},
    ],
)
def test_bad_priority_or_reserve_is_a_configuration_error(options: dict[str, Any]) -> None:
    options.setdefault("max_requests", 5)
    with pytest.raises(ConfigurationError):
        LexerClient(TOKEN_A, **options)


async def test_a_bad_per_call_priority_fails_before_any_request_or_slot(
    sandbox_factory: SandboxFactory, client_for: ClientFor, tmp_path: Path
) -> None:
    sb = await sandbox_factory()
    async with client_for(sb) as client:
        bad: Any = "urgent"
        with pytest.raises(ConfigurationError, match="priority"):
            await client.users(priority=bad)
        with pytest.raises(ConfigurationError, match="priority"):
            await client.summary(JAN, FEB, priority=bad)
        with pytest.raises(ConfigurationError, match="priority"):
            await client.export("case_details", JAN, FEB, tmp_path / "c.csv", priority=bad)
        with pytest.raises(ConfigurationError, match="priority"):
            client.export_rows("case_details", JAN, FEB, priority=bad)
        assert client.stats.requests == 0
    assert sb.stats.requests == {}
    assert not (tmp_path / "c.csv").exists()


def test_the_default_reserve_is_a_tenth_of_the_limit() -> None:
    assert LexerClient(TOKEN_A).reserve == 10
    assert LexerClient(TOKEN_A, max_requests=25).reserve == 2
    assert LexerClient(TOKEN_A, max_requests=25, reserve=0).reserve == 0


@pytest.mark.looptime
async def test_a_slot_lost_while_waiting_for_the_in_flight_cap_is_taken_anew() -> None:
    """A shared backend's lease can expire while its request waits for the in-flight
    cap; the channel renews the slot after such a wait, and when the renewal says it was
    lost, takes a new one before sending, once. A request that did not wait there costs
    no renewal (no extra round trip to Redis or the store)."""
    sent: list[str] = []

    def handler(request: HttpRequest) -> HttpResponse:
        sent.append(request.url)
        return HttpResponse(200, {}, b"[]")

    made: list[Recording] = []
    cap = anyio.CapacityLimiter(1)
    async with LexerClient(
        TOKEN_A,
        transport=MockTransport(handler),
        registry=recording_registry(made, lose=1),
        max_in_flight=cap,
    ) as client:
        assert await client.groups() == []
        [limiter] = made
        assert (limiter.renewals, limiter.stats.requests, len(sent)) == (0, 1, 1)

        async def hold(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            async with cap:
                task_status.started()
                await anyio.sleep(10 * RENEW_AFTER)

        async with anyio.create_task_group() as group:
            await group.start(hold)
            assert await client.groups() == []
    assert limiter.renewals == 1  # after the wait: lost; the new slot met a free cap
    assert limiter.stats.requests == 3  # three slots taken ...
    assert len(sent) == 2  # ... for two requests sent


def test_the_sync_client_takes_priorities_too(sandbox_in_thread: Any) -> None:
    """The blocking twin: a bulk client's fourth call (N = 5, reserve 2) runs out its
    deadline waiting, while an interactive call goes straight through."""
    sb = sandbox_in_thread(max_requests=5, window=300.0)
    with sync.LexerClient(
        TOKEN_A,
        api_url=sb.api_url,
        status_url=sb.status_url,
        max_requests=5,
        window=300.0,
        priority="bulk",
        reserve=2,
    ) as client:
        for _ in range(3):
            client.groups()
        with pytest.raises(LexerTimeoutError):
            client.groups(deadline=0.3)
        assert client.users(priority="interactive")
        with pytest.raises(ConfigurationError):
            client.users(priority=cast(Any, "urgent"))
        stats = client.stats
    assert (stats.requests, stats.waits) == (4, 0)  # the timed-out wait took no slot
    assert sb.stats.requests[KEY_A] == 4
