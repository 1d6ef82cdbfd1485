"""LexerClient end to end against a fake Lexer, on virtual time: the rate limit as the
server sees it, 429s, retries, deadlines, and the token never leaking.

The fake server
---------------
aioresponses is not usable here: 0.7.9 builds ``ClientResponse`` objects by hand and
breaks on aiohttp 3.14 (``ClientResponse.__init__() missing ... 'stream_writer'``), and it
replaces ``ClientSession._request`` (so aiohttp's own timeouts never run anyway). A real
aiohttp server on loopback would mix real socket I/O into looptime's virtual clock, which
may then jump ahead while bytes are still in the kernel. So `FakeLexer` stands in for the
aiohttp session itself, passed as ``LexerClient(session=...)``: the client only uses
``session.request(method, url, json=, params=, headers=, allow_redirects=, timeout=)`` as
an async context manager and the response's ``status``, ``headers`` and ``read()``. The
fake records each request's ARRIVAL (``loop.time()`` when it "reaches the server"), sleeps
for the scripted latency, then answers, or raises what aiohttp raises for a dropped
connection (``ServerDisconnectedError``), a refused one (``ClientConnectorError``: never
an arrival) or a total timeout (``asyncio.TimeoutError`` after ``timeout.total``, when the
scripted latency is longer). Everything is in memory, so virtual time is exact.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import random
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from itertools import pairwise
from types import TracebackType
from typing import Any, cast

import aiohttp
import anyio
import attrs
import payloads  # tests/ is on sys.path
import pytest
from aiohttp.client_reqrep import ConnectionKey

from lexer_activity_async import (
    APIError,
    BadRequestError,
    LexerClient,
    LexerConnectionError,
    LexerError,
    LexerTimeoutError,
    LimiterRegistry,
    NotFoundError,
    RateLimitedError,
    ReportType,
    RequestTimeoutError,
    RetryPolicy,
    ServerError,
    UnauthorizedError,
    wire,
)
from lexer_activity_async import models as m
from lexer_activity_async.events import RateLimited, RateLimitWait, Retrying
from lexer_activity_async.limits import SlidingWindowLimiter
from lexer_activity_async.logs import FIELDS, JsonFormatter
from lexer_activity_async.reports import build_report_body

N = 100
W = 300.0
EPS = 1e-6  # looptime's clock resolution

TOKEN = "tok-SECRET-9f3ac17e2b4d5a60"
LABEL = "acme-prod"
API = "http://lexer.test/v1"
REPORTS_URL = API + "/activity/reports"
NOW = datetime(2024, 6, 3, 12, 0, tzinfo=timezone.utc)  # the client's wall clock, fixed
DATE_FROM = NOW - timedelta(days=8)
DATE_TO = NOW - timedelta(days=1)

SUMMARY_BODY = payloads.SUMMARY  # the reference's summary example, verbatim
SUMMARY = json.loads(SUMMARY_BODY)


def now() -> float:
    return asyncio.get_running_loop().time()


def at(t: float) -> object:
    return pytest.approx(t, abs=EPS)


def max_in_any_window(times: list[float], window: float = W) -> int:
    """The most of ``times`` in any half-open span ``[s, s + window)`` (see test_limits)."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, s + window - EPS / 2) - i for i, s in enumerate(ordered)),
        default=0,
    )


def backoff_bounds(attempt: int) -> tuple[float, float]:
    """Retry ``attempt`` (1-based, n = attempt - 1) waits [0.75, 1] x min(0.5 * 2**n, 30)."""
    top = min(0.5 * 2 ** (attempt - 1), 30.0)
    return 0.75 * top - EPS, top + EPS


# -- the fake server ------------------------------------------------------------------------


@dataclass
class Reply:
    """What the fake does with one request: wait ``latency`` then answer ``status``, or
    raise ``error`` instead; ``refuse`` fails the connection before anything is sent."""

    status: int = 200
    body: bytes = SUMMARY_BODY
    headers: dict[str, str] = field(default_factory=dict)
    latency: float = 0.5
    error: BaseException | None = None
    refuse: bool = False

    @property
    def kind(self) -> str:
        if self.refuse:
            return "refused"
        if self.latency == math.inf:
            return "hang"
        if self.error is not None:
            return type(self.error).__name__
        return str(self.status)


def ok(latency: float = 0.5) -> Reply:
    return Reply(latency=latency)


def fail(status: int, latency: float = 0.5, **headers: str) -> Reply:
    body = {429: b"Rate limited exceeded", 404: b"Not found"}.get(status, b'{"error": "boom"}')
    return Reply(status=status, body=body, headers=headers, latency=latency)


def drop(latency: float = 0.3) -> Reply:
    return Reply(latency=latency, error=aiohttp.ServerDisconnectedError())


def hang() -> Reply:
    return Reply(latency=math.inf)  # cut by the client's own per-attempt timeout


def refuse() -> Reply:
    return Reply(refuse=True)


@dataclass
class Arrival:
    at: float
    method: str
    url: str
    token: str | None
    body: Any
    reply: Reply
    done: float = math.nan  # when the answer (or the failure) reached the client
    seen: bool = True  # False for a refused connection: the server never saw it

    @property
    def call(self) -> str | None:
        return self.body.get("date_from") if isinstance(self.body, dict) else None


class FakeLexer:
    """Duck-types the aiohttp session for `LexerClient` (see the module docstring)."""

    def __init__(self, respond: Callable[[int, dict[str, Any] | None], Reply]) -> None:
        self.respond = respond
        self.attempts: list[Arrival] = []  # every request the client made, in order
        self.arrivals: list[Arrival] = []  # those the server saw (all but refused ones)
        self.refused = 0
        self.closed = False

    @classmethod
    def scripted(cls, *replies: Reply, then: Reply | None = None) -> FakeLexer:
        """Answer with ``replies`` in order, then ``then`` (default: success) forever."""
        queue = list(replies)
        last = then or ok()
        return cls(lambda n, body: queue.pop(0) if queue else last)

    def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | None = None,
        params: Any = None,
        headers: dict[str, str] | None = None,
        allow_redirects: bool = True,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> _Exchange:
        assert allow_redirects is False  # the token must never follow a redirect
        body = None if data is None else json.loads(data)  # the client sends encoded JSON
        return _Exchange(self, method, url, body, headers or {}, timeout)

    @property
    def times(self) -> list[float]:
        return [a.at for a in self.arrivals]

    async def close(self) -> None:  # the client never closes a session it was given
        raise AssertionError("LexerClient closed a session it does not own")


class _Response:
    def __init__(self, reply: Reply) -> None:
        self.status = reply.status
        self.headers = {"Content-Type": "application/json", **reply.headers}
        self._body = reply.body

    async def read(self) -> bytes:
        return self._body


class _Exchange:
    def __init__(
        self,
        server: FakeLexer,
        method: str,
        url: str,
        body: Any,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout | None,
    ) -> None:
        self.server, self.method, self.url, self.body = server, method, url, body
        self.headers, self.timeout = headers, timeout

    async def __aenter__(self) -> _Response:
        server = self.server
        reply = server.respond(len(server.attempts), self.body)
        arrival = Arrival(
            now(), self.method, self.url, self.headers.get(wire.TOKEN_HEADER), self.body, reply
        )
        server.attempts.append(arrival)
        if reply.refuse:
            server.refused += 1
            arrival.seen, arrival.done = False, arrival.at
            fields: dict[str, Any] = {name: None for name in ConnectionKey._fields} | {
                "host": "lexer.test",
                "port": 80,
                "is_ssl": False,
                "ssl": True,
            }
            key = ConnectionKey(**fields)
            raise aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
        server.arrivals.append(arrival)
        try:
            limit = self.timeout.total if self.timeout is not None else None
            if limit is not None and reply.latency > limit:
                await asyncio.sleep(limit)
                raise asyncio.TimeoutError
            await asyncio.sleep(reply.latency)
            if reply.error is not None:
                raise reply.error
            return _Response(reply)
        finally:
            arrival.done = now()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


# -- the token must never leak ----------------------------------------------------------------


class Audit:
    """Collects every event, log record and exception of a test, then checks that the token
    appears in none of them (it must appear in the requests' header, and only there)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.events: list[Any] = []
        self.errors: list[BaseException] = []
        self.servers: list[FakeLexer] = []

    def client(self, server: FakeLexer, **kw: Any) -> LexerClient:
        self.servers.append(server)
        options: dict[str, Any] = {
            "label": LABEL,
            "api_url": API,
            "session": server,
            "registry": LimiterRegistry(),
            "now": lambda: NOW,
            "on_event": self.events.append,
        }
        options.update(kw)
        return LexerClient(TOKEN, **options)

    async def failure(self, coro: Any) -> LexerError:
        """Await ``coro``, which must fail with a LexerError; keep the error for the audit."""
        try:
            await coro
        except LexerError as error:
            self.errors.append(error)
            return error
        raise AssertionError("the call succeeded")

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    def check(self) -> int:
        texts: list[str] = []
        for error in self.errors:
            texts += [str(error), repr(error)]
            texts += traceback.format_exception(error)
            texts += [repr(vars(error))]
        for event in self.events:
            texts += [str(event), repr(event), repr(attrs.asdict(event))]
        for record in self.caplog.records:
            texts += [record.getMessage(), repr(record.args), str(record.__dict__)]
            texts.append(JsonFormatter().format(record))  # the CLI's --json lines
            assert all(hasattr(record, name) for name in FIELDS), record.__dict__
        leaks = [text for text in texts if TOKEN in text]
        assert not leaks, leaks[:3]
        # ... while the token did go where it belongs, on every request.
        for server in self.servers:
            assert all(a.token == TOKEN for a in server.arrivals)
        return len(texts)


@pytest.fixture
def audit(caplog: pytest.LogCaptureFixture) -> Iterator[Audit]:
    caplog.set_level(logging.DEBUG, logger="lexer_activity_async")
    checker = Audit(caplog)
    yield checker
    checker.check()


def summary_of(call: int) -> datetime:
    """A distinct date_from per call, so the fake server can tell the calls apart."""
    return DATE_FROM - timedelta(minutes=call)


def expected_summary() -> m.Summary:
    return m.converter.structure(SUMMARY, m.Summary)


# -- a thousand requests ----------------------------------------------------------------------


async def run_bursts(
    client: LexerClient, burst_times: list[float], size: int
) -> dict[int, m.Summary | LexerError]:
    """Issue ``size`` calls at each of ``burst_times`` (seconds from now), all concurrent."""
    outcomes: dict[int, m.Summary | LexerError] = {}
    t0 = now()

    async def call(i: int) -> None:
        try:
            outcomes[i] = await client.summary(summary_of(i), DATE_TO)
        except LexerError as error:
            outcomes[i] = error

    async def burst(k: int, offset: float) -> None:
        await anyio.sleep(t0 + offset - now())
        async with anyio.create_task_group() as calls:
            for j in range(size):
                calls.start_soon(call, k * size + j)

    async with anyio.create_task_group() as bursts:
        for k, offset in enumerate(burst_times):
            bursts.start_soon(burst, k, offset)
    return outcomes


@pytest.mark.looptime
async def test_a_thousand_requests_in_bursts_take_exactly_the_theoretical_minimum(
    audit: Audit,
) -> None:
    """Fault-free, deterministic latency L: the total time is the theoretical minimum.

    Derivation. The client cannot know when the server saw a request, only that it was
    no later than its response's completion, so it may reuse a slot only W after that
    completion. With all 1000 calls ready early enough, they go in waves of N = 100: wave
    0 is sent at 0 and completes at L; wave k+1 is sent at the moment wave k's slots free,
    W after its completions, so wave k is sent at k(W + L). ceil(1000/100) = 10 waves, so
    9 extra windows, and the last response completes at

        T_min = 9 (W + L) + L = 9W + 10L   (= 2710 s for W = 300, L = 1),

    provided burst k is issued no later than k(W + L), which holds for bursts issued at
    random times within the first window. Even a client that knew every arrival time
    could not go below 9W + L (10 waves of arrivals, W apart, plus the last latency):
    2701 s, within 1 % of T_min, so T_min is within 1 % of the absolute minimum too.
    """
    latency = 1.0
    rng = random.Random(20240603)
    bursts = [0.0, *sorted(rng.uniform(latency, W) for _ in range(9))]
    server = FakeLexer(lambda n, body: ok(latency))

    async with audit.client(server) as client:
        t0 = now()
        outcomes = await run_bursts(client, bursts, N)
        total = now() - t0
        stats = client.stats

    assert len(outcomes) == 1000
    assert all(outcome == expected_summary() for outcome in outcomes.values())
    assert len(server.arrivals) == 1000
    assert max_in_any_window(server.times) == N  # the limit is met, and used to the full

    t_min = 9 * (W + latency) + latency
    assert total == at(t_min)
    assert 1.0 - EPS <= total / t_min <= 1.01
    assert total / (9 * W + latency) <= 1.01  # against the arrival-omniscient bound
    waves = Counter(round(a.at - t0, 3) for a in server.arrivals)
    assert waves == {round(k * (W + latency), 3): N for k in range(10)}

    # Every call of waves 1..9 waited from its burst's issue time to its wave's start.
    assert stats.requests == 1000
    assert stats.rate_limited == 0
    assert stats.retries == 0
    assert stats.waits == 900
    expected_wait = sum(N * (k * (W + latency) - bursts[k]) for k in range(1, 10))
    assert stats.wait_seconds == pytest.approx(expected_wait, abs=1e-3)
    waits = audit.of(RateLimitWait)
    assert len(waits) == 900
    assert {w.label for w in waits} == {LABEL}
    # Wave 1 arrives after wave 0 completed: its wait is known exactly.
    assert Counter(round(w.seconds, 3) for w in waits)[round(W + latency - bursts[1], 3)] >= N


def earliest_schedule(
    attempts: list[Arrival], ready: list[float], t0: float
) -> tuple[list[float], float]:
    """The grant time of every attempt, and the total time, of the schedule that the
    client's contract allows at the earliest: attempts are served first come, first served
    (by the time each became ready), an attempt takes a slot only when fewer than N
    attempts were granted whose response completed less than W ago (or is still due), and
    never while a 429's pause runs (from its completion, for Retry-After or else W). Each
    attempt keeps its recorded service time (latency, or the timeout it hit) and answer."""
    order = sorted(range(len(attempts)), key=lambda k: (round(ready[k], 5), k))
    grants = [math.nan] * len(attempts)
    frees: list[float] = []  # completion + W of the attempts granted so far
    pauses: list[tuple[float, float]] = []
    last = -math.inf
    for k in order:
        a = attempts[k]
        t = max(ready[k], last)
        if len(frees) >= N:
            t = max(t, frees[len(frees) - N])
        moved = True
        while moved:
            moved = False
            for start, end in pauses:
                if start <= t < end - EPS / 2:
                    t, moved = end, True
        grants[k] = last = t
        assert not math.isnan(a.done)
        done = t + (a.done - a.at)
        bisect.insort(frees, done + W)
        if a.seen and a.reply.error is None and a.reply.status == 429:
            retry_after = a.reply.headers.get("Retry-After")
            pauses.append((done, done + (W if retry_after is None else float(retry_after))))
    total = max(g + (a.done - a.at) for g, a in zip(grants, attempts, strict=True)) - t0
    return grants, total


@dataclass
class Injected:
    rate_limited: int = 0
    retried_failures: int = 0
    kinds: Counter[str] = field(default_factory=Counter)


@pytest.mark.looptime
async def test_a_thousand_requests_with_random_latency_429s_and_failures(audit: Audit) -> None:
    """Bursts at random times, latency uniform in [0.05, 2] s, a few % of 429s (with and
    without Retry-After), 5xx/408, dropped, refused and timed-out connections, and a few
    calls that fail for good. Every arrival counts toward the limit, whatever its answer.

    Theoretical minimum here: faults make waves uneven, so it is computed, not derived in
    closed form: `earliest_schedule` replays the recorded attempts (their service times and
    answers) through the contract alone (FIFO, a slot held until W after completion, 429
    pauses) and gives the earliest instant each could have been sent. The client must hit
    it: every arrival exactly at its earliest instant, the total within 1 % (in fact equal).
    Backoff jitter is off here (``jitter_low=1``) so a retry's ready time is known exactly;
    jittered delays are checked in the retry tests below.
    """
    rng = random.Random(8)
    size, n_bursts = 100, 10
    bursts = [0.0, *sorted(rng.uniform(0.0, 2400.0) for _ in range(n_bursts - 1))]
    always_503 = {summary_of(i).isoformat(timespec="seconds") for i in (13, 444, 999)}
    always_404 = {summary_of(i).isoformat(timespec="seconds") for i in (77, 500)}
    injected = Injected()
    failures: Counter[str] = Counter()  # retryable failures so far, per call
    throttled: Counter[str] = Counter()

    def respond(n: int, body: dict[str, Any] | None) -> Reply:
        assert body is not None
        call = str(body["date_from"])
        latency = rng.uniform(0.05, 2.0)
        if call in always_404:
            reply = fail(404, latency)
        elif call in always_503:
            reply = fail(503, latency)
            if failures[call] < 3:  # the 4th failure is final, not retried
                injected.retried_failures += 1
            failures[call] += 1
        else:
            u = rng.random()
            if u < 0.03 and throttled[call] < 3:
                throttled[call] += 1
                injected.rate_limited += 1
                retry_after = rng.choice([None, "5", "30"])
                headers = {} if retry_after is None else {"Retry-After": retry_after}
                reply = fail(429, latency, **headers)
            elif u < 0.09 and failures[call] < 3:  # max_retries=3: a 4th attempt succeeds
                failures[call] += 1
                injected.retried_failures += 1
                reply = rng.choice(
                    [
                        fail(500, latency),
                        fail(502, latency),
                        fail(503, latency),
                        fail(408, latency),
                        drop(latency),
                        drop(latency),
                        hang(),
                        refuse(),
                    ]
                )
            else:
                reply = ok(latency)
        injected.kinds[reply.kind] += 1
        return reply

    server = FakeLexer(respond)
    policy = RetryPolicy(jitter_low=1.0)
    async with audit.client(server, timeout=20.0, retry=policy) as client:
        t0 = now()
        outcomes = await run_bursts(client, bursts, size)
        total = now() - t0
        stats = client.stats

    # The invariant, over every arrival the server saw (429s, 5xx and drops included).
    times = server.times
    assert max_in_any_window(times) <= N
    assert max_in_any_window(times) == N  # and the run did push against the limit
    assert len(times) == len(server.attempts) - server.refused
    assert stats.requests == len(server.attempts)  # one slot per attempt, refused too

    # The faults did happen, in the planned amounts.
    assert len(server.attempts) == sum(injected.kinds.values())
    assert injected.rate_limited >= 20
    assert injected.kinds["ServerDisconnectedError"] >= 5
    assert injected.kinds["refused"] >= 1
    assert injected.kinds["hang"] >= 1  # timed out by the client

    # Every call succeeded, except those meant to fail, which failed as they should.
    by_call: dict[str, list[Arrival]] = {}
    for attempt in server.attempts:
        by_call.setdefault(str(attempt.call), []).append(attempt)
    assert len(outcomes) == size * n_bursts
    for i, outcome in outcomes.items():
        call = summary_of(i).isoformat(timespec="seconds")
        if call in always_503:
            assert isinstance(outcome, ServerError)
            assert outcome.status == 503
            assert len(by_call[call]) == 4  # 1 + max_retries
        elif call in always_404:
            assert isinstance(outcome, NotFoundError)
            assert len(by_call[call]) == 1  # never retried
        else:
            assert outcome == expected_summary(), (i, outcome)
    audit.errors += [o for o in outcomes.values() if isinstance(o, LexerError)]

    # The counters match what the server injected.
    assert stats.rate_limited == injected.rate_limited
    assert stats.retries == injected.retried_failures
    assert len(audit.of(RateLimited)) == injected.rate_limited
    assert len(audit.of(Retrying)) == injected.retried_failures
    warnings = [r for r in audit.caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == injected.rate_limited

    # When each attempt became ready: its burst, the 429 it follows, or a backoff.
    index = {id(a): k for k, a in enumerate(server.attempts)}
    ready = [math.nan] * len(server.attempts)
    for i in range(size * n_bursts):
        retries = 0
        previous: Arrival | None = None
        for attempt in by_call[summary_of(i).isoformat(timespec="seconds")]:
            if previous is None:
                became_ready = t0 + bursts[i // size]
            elif previous.seen and previous.reply.status == 429 and not previous.reply.error:
                assert previous.done is not None
                became_ready = previous.done
            else:
                assert previous.done is not None
                retries += 1
                became_ready = previous.done + policy.backoff(retries)
            ready[index[id(attempt)]] = became_ready
            previous = attempt
    grants, t_min = earliest_schedule(server.attempts, ready, t0)
    late = [
        (k, a.at - g)
        for k, (a, g) in enumerate(zip(server.attempts, grants, strict=True))
        if abs(a.at - g) > 1e-5
    ]
    assert not late, late[:5]
    assert 1.0 - EPS <= total / t_min <= 1.01
    # For scale: the bare arrival bound, (arrivals - 1) // N windows, ignores latency and
    # the 429 pauses (29 here, each holding the token for up to W); it is well below.
    bare = (len(times) - 1) // N * W
    assert total >= bare
    print(
        f"{len(times)} arrivals, {len(server.attempts)} attempts; total {total:.3f}s; "
        f"minimum {t_min:.3f}s (ratio {total / t_min:.6f}); bare bound {bare:.0f}s; {stats}"
    )


# -- 429 --------------------------------------------------------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("headers", "pause", "retry_after", "logged"),
    [
        ({}, W, None, "300s (a full window)"),
        ({"Retry-After": "7"}, 7.0, 7.0, "7s (Retry-After)"),
        (
            {"Retry-After": format_datetime(NOW + timedelta(seconds=20), usegmt=True)},
            20.0,
            20.0,
            "20s (Retry-After)",
        ),
    ],
    ids=["no-retry-after", "retry-after-seconds", "retry-after-http-date"],
)
async def test_a_429_pauses_every_request_of_the_token(
    audit: Audit, headers: dict[str, str], pause: float, retry_after: float | None, logged: str
) -> None:
    server = FakeLexer.scripted(fail(429, 0.5, **headers))
    registry = LimiterRegistry()
    second_events: list[Any] = []
    first = audit.client(server, registry=registry)
    # Another client of the same token: its requests pause as well.
    second = audit.client(server, registry=registry, on_event=second_events.append)
    async with first, second:
        t0 = now()

        async def later() -> m.Summary:
            await anyio.sleep(pause / 2)
            return await second.summary(DATE_FROM, DATE_TO)

        async def sooner() -> m.Summary:
            return await first.summary(DATE_FROM, DATE_TO)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sooner)
            tg.start_soon(later)
        stats = first.stats

    rejected, retried, other = server.arrivals
    assert rejected.at == at(t0)
    assert rejected.reply.status == 429
    assert rejected.done == at(t0 + 0.5)
    # The pause runs from the 429's response, for Retry-After or else a whole window.
    assert retried.at - rejected.done == at(pause)
    assert other.at == at(retried.at)
    assert retried.at - rejected.done >= pause - EPS

    assert stats.rate_limited == 1
    assert stats.retries == 0  # a 429 does not use up max_retries
    assert audit.of(RateLimited) == [RateLimited(LABEL, retry_after)]
    waits = [e for e in audit.events if isinstance(e, RateLimitWait)]
    assert [w.seconds for w in waits] == [at(pause)]  # the retry, told the whole pause
    second_waits = [e for e in second_events if isinstance(e, RateLimitWait)]
    assert [e.seconds for e in second_waits] == [at(pause / 2 + 0.5)]  # joined midway
    assert all(e.label == LABEL for e in [*waits, *second_events])

    records = [r for r in audit.caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert LABEL in records[0].getMessage()
    assert logged in records[0].getMessage()


@pytest.mark.looptime
async def test_429s_beyond_max_rate_limited_raise(audit: Audit) -> None:
    server = FakeLexer.scripted(then=fail(429, 0.1, **{"Retry-After": "1"}))
    async with audit.client(server, retry=RetryPolicy(max_rate_limited=2)) as client:
        error = await audit.failure(client.summary(DATE_FROM, DATE_TO))
        stats = client.stats
    assert isinstance(error, RateLimitedError)
    assert error.retry_after == 1.0
    assert len(server.arrivals) == 3
    assert [b.at - a.done for a, b in pairwise(server.arrivals)] == [
        at(1.0),
        at(1.0),
    ]
    assert stats.rate_limited == 3
    assert len([r for r in audit.caplog.records if r.levelno == logging.WARNING]) == 3


# -- retries ----------------------------------------------------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("reply", "error_type"),
    [
        (fail(500), ServerError),
        (fail(502), ServerError),
        (fail(503), ServerError),
        (fail(408), RequestTimeoutError),
        (drop(), LexerConnectionError),
        (hang(), LexerTimeoutError),
    ],
    ids=["500", "502", "503", "408", "dropped", "timeout"],
)
async def test_transient_failures_are_retried_max_retries_times_with_backoff(
    audit: Audit, reply: Reply, error_type: type[LexerError]
) -> None:
    server = FakeLexer.scripted(then=reply)
    async with audit.client(server, timeout=10.0) as client:
        t0 = now()
        error = await audit.failure(client.summary(DATE_FROM, DATE_TO))
        stats = client.stats
        in_use = cast(SlidingWindowLimiter, client.limiter).in_use

    assert isinstance(error, error_type)
    arrivals = server.arrivals
    assert len(arrivals) == 4  # 1 + max_retries (3)
    assert arrivals[0].at == at(t0)
    if reply.latency == math.inf:
        assert all(a.done - a.at == at(10.0) for a in arrivals)  # the per-attempt timeout
    retrying = audit.of(Retrying)
    assert [e.attempt for e in retrying] == [1, 2, 3]
    assert {e.error for e in retrying} == {error_type.__name__}
    for event, (before, after) in zip(retrying, pairwise(arrivals), strict=True):
        low, high = backoff_bounds(event.attempt)
        assert low <= event.delay <= high
        assert after.at - before.done == at(event.delay)  # slept exactly the backoff
    assert stats.retries == 3
    assert stats.requests == 4
    assert in_use == 4  # every attempt took (and holds) a slot of the window


@pytest.mark.looptime
async def test_a_call_recovers_after_transient_failures(audit: Audit) -> None:
    server = FakeLexer.scripted(fail(503), drop(), hang(), ok())
    async with audit.client(server, timeout=10.0) as client:
        result = await client.summary(DATE_FROM, DATE_TO)
        stats = client.stats
    assert result == expected_summary()
    assert [a.reply.kind for a in server.arrivals] == [
        "503",
        "ServerDisconnectedError",
        "hang",
        "200",
    ]
    assert stats.retries == 3
    assert [e.error for e in audit.of(Retrying)] == [
        "ServerError",
        "LexerConnectionError",
        "LexerTimeoutError",
    ]


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, BadRequestError), (401, UnauthorizedError), (404, NotFoundError)],
)
async def test_client_errors_are_never_retried(
    audit: Audit, status: int, error_type: type[APIError]
) -> None:
    server = FakeLexer.scripted(then=fail(status))
    async with audit.client(server) as client:
        error = await audit.failure(client.summary(DATE_FROM, DATE_TO))
        stats = client.stats
    assert isinstance(error, error_type)
    assert error.status == status
    assert len(server.arrivals) == 1
    assert stats.retries == 0
    assert audit.of(Retrying) == []


@pytest.mark.looptime
async def test_every_retry_takes_a_limiter_slot(audit: Audit) -> None:
    server = FakeLexer.scripted(fail(503), fail(503))
    async with audit.client(server) as client:
        t0 = now()
        others = [await client.limiter.acquire() for _ in range(N - 1)]
        for lease in others:
            await client.limiter.release(lease)  # 99 slots free again at t0 + W
        result = await client.summary(DATE_FROM, DATE_TO)
        stats = client.stats

    assert result == expected_summary()
    first, second, third = server.arrivals
    assert first.at == at(t0)  # the 100th slot
    # The retry was ready after about a second, but the window was full until t0 + W.
    assert second.at == at(t0 + W)
    retrying = audit.of(Retrying)
    assert first.done + retrying[0].delay < t0 + 2
    assert [w.seconds for w in audit.of(RateLimitWait)] == [
        at(t0 + W - first.done - retrying[0].delay)
    ]
    assert third.at - second.done == at(retrying[1].delay)
    assert stats.requests == N - 1 + 3
    assert stats.retries == 2


@pytest.mark.looptime
async def test_per_call_max_retries_override_and_the_backoff_cap(audit: Audit) -> None:
    server = FakeLexer.scripted(then=fail(503, 0.1))
    async with audit.client(server) as client:
        await audit.failure(client.summary(DATE_FROM, DATE_TO, max_retries=9))
        assert len(server.arrivals) == 10
        await audit.failure(client.summary(DATE_FROM, DATE_TO, max_retries=0))
        assert len(server.arrivals) == 11
    retrying = audit.of(Retrying)
    assert [e.attempt for e in retrying] == list(range(1, 10))
    for event in retrying:
        low, high = backoff_bounds(event.attempt)
        assert low <= event.delay <= high
    # From retry 7 on, 0.5 * 2**n (32, 64, 128 s) is capped at 30 s.
    assert all(22.5 - EPS <= e.delay <= 30.0 + EPS for e in retrying[6:])
    gaps = [b.at - a.done for a, b in pairwise(server.arrivals[:10])]
    assert gaps == [at(e.delay) for e in retrying]


@pytest.mark.looptime
async def test_per_client_retry_policy(audit: Audit) -> None:
    policy = RetryPolicy(max_retries=2, base=2.0, cap=5.0, jitter_low=1.0)
    server = FakeLexer.scripted(then=fail(502, 0.25))
    async with audit.client(server, retry=policy) as client:
        assert client.retry == policy
        await audit.failure(client.summary(DATE_FROM, DATE_TO))
    arrivals = server.arrivals
    assert len(arrivals) == 3
    # No jitter: exactly base, then 2 x base.
    assert [b.at - a.done for a, b in pairwise(arrivals)] == [at(2.0), at(4.0)]

    server = FakeLexer.scripted(then=fail(502, 0.25))
    async with audit.client(server, retry=RetryPolicy(max_retries=1)) as client:
        await audit.failure(client.summary(DATE_FROM, DATE_TO))
    assert len(server.arrivals) == 2


@pytest.mark.looptime
async def test_a_per_call_deadline_raises_lexer_timeout_error(audit: Audit) -> None:
    server = FakeLexer.scripted(then=hang())
    async with audit.client(server, timeout=60.0) as client:
        t0 = now()
        error = await audit.failure(client.summary(DATE_FROM, DATE_TO, deadline=5.0))
        assert now() == at(t0 + 5.0)
        in_use = cast(SlidingWindowLimiter, client.limiter).in_use
    assert type(error) is LexerTimeoutError
    assert "deadline of 5s" in str(error)
    assert len(server.arrivals) == 1
    assert server.arrivals[0].done == at(t0 + 5.0)  # cancelled in flight ...
    assert in_use == 1  # ... it keeps its slot: the server may have seen it


@pytest.mark.looptime
async def test_a_deadline_spent_waiting_for_the_limiter_takes_no_slot(audit: Audit) -> None:
    server = FakeLexer.scripted()
    async with audit.client(server) as client:
        held = [await client.limiter.acquire() for _ in range(N)]
        t0 = now()
        error = await audit.failure(client.summary(DATE_FROM, DATE_TO, deadline=30.0))
        assert now() == at(t0 + 30.0)
        assert cast(SlidingWindowLimiter, client.limiter).in_use == N
        assert client.stats.requests == N
        for lease in held:
            await client.limiter.release(lease)
    assert isinstance(error, LexerTimeoutError)
    assert server.arrivals == []


@pytest.mark.looptime
async def test_a_client_deadline_bounds_the_whole_call_including_backoff(audit: Audit) -> None:
    policy = RetryPolicy(max_retries=10, deadline=20.0, base=8.0, jitter_low=1.0)
    server = FakeLexer.scripted(then=fail(500, 0.5))
    async with audit.client(server, retry=policy) as client:
        t0 = now()
        error = await audit.failure(client.summary(DATE_FROM, DATE_TO))
        assert now() == at(t0 + 20.0)
    assert isinstance(error, LexerTimeoutError)
    # Attempts at 0 and 8.5; the next backoff (16 s, from 9) would end past the deadline.
    assert [a.at - t0 for a in server.arrivals] == [at(0.0), at(8.5)]


# -- non-idempotent sends -----------------------------------------------------------------------


def summary_request() -> tuple[wire.Request, Callable[[int, bytes], Any]]:
    body = build_report_body("summary", DATE_FROM, DATE_TO, now=NOW)

    def decode(status: int, raw: bytes) -> Any:
        return wire.decode_report(ReportType.SUMMARY, status, raw)

    return wire.report_request(body), decode


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("reply", "error_type"),
    [(fail(503), ServerError), (fail(500), ServerError), (drop(), LexerConnectionError)],
    ids=["503", "500", "dropped"],
)
async def test_non_idempotent_sends_are_not_retried_once_sent(
    audit: Audit, reply: Reply, error_type: type[LexerError]
) -> None:
    server = FakeLexer.scripted(reply)
    request, decode = summary_request()
    async with audit.client(server) as client:
        error = await audit.failure(client.send(request, decode, idempotent=False))
        stats = client.stats
    assert isinstance(error, error_type)
    assert len(server.arrivals) == 1
    assert stats.retries == 0
    # The same failure on an idempotent send is retried.
    server = FakeLexer.scripted(reply)
    async with audit.client(server) as client:
        assert await client.send(request, decode) == expected_summary()
    assert len(server.arrivals) == 2


@pytest.mark.looptime
async def test_non_idempotent_send_is_retried_when_the_connection_was_refused(audit: Audit) -> None:
    server = FakeLexer.scripted(refuse())
    request, decode = summary_request()
    async with audit.client(server) as client:
        assert await client.send(request, decode, idempotent=False) == expected_summary()
        stats = client.stats
    assert server.refused == 1
    assert len(server.arrivals) == 1
    assert stats.retries == 1
    assert stats.requests == 2


# -- the token --------------------------------------------------------------------------------


@pytest.mark.looptime
async def test_the_token_never_appears_in_errors_logs_or_events(audit: Audit) -> None:
    transient = [fail(429), fail(503), drop(), hang(), refuse(), fail(408)]
    servers = [
        FakeLexer.scripted(*transient, then=fail(401)),
        FakeLexer.scripted(then=fail(400)),
        FakeLexer.scripted(then=fail(429, 0.5, **{"Retry-After": "3"})),
        FakeLexer.scripted(then=Reply(body=b"<html>not json</html>")),
        FakeLexer.scripted(then=hang()),
    ]
    calls: list[dict[str, Any]] = [{"max_retries": 10}, {}, {}, {}, {"deadline": 1.0}]
    policies = [RetryPolicy(), RetryPolicy(), RetryPolicy(max_rate_limited=0)] + [None] * 2
    for server, call, policy in zip(servers, calls, policies, strict=True):
        async with audit.client(server, timeout=5.0, retry=policy) as client:
            assert TOKEN not in repr(client)
            assert TOKEN not in str(vars(client))
            await audit.failure(client.summary(DATE_FROM, DATE_TO, **call))
    assert [type(e).__name__ for e in audit.errors] == [
        "MissingTokenError",  # a 401, after a 429 and five transient failures
        "BadRequestError",
        "RateLimitedError",
        "UnexpectedResponseError",
        "LexerTimeoutError",
    ]
    assert {type(e).__name__ for e in audit.events} == {
        "RateLimited",
        "RateLimitWait",
        "RequestSent",
        "Retrying",
    }
    assert any(r.levelno == logging.INFO for r in audit.caplog.records)
    assert any(r.levelno == logging.WARNING for r in audit.caplog.records)
    assert audit.check() > 20


# -- absurd Retry-After values never poison the token --------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("value", "unusable"),
    [
        ("9" * 5000, True),  # int() of it exceeds the digit limit; float() is inf
        ("99999999999999999999", True),  # too many digits for a delay
        ("-5", True),
        ("soon", True),
        ("99999999999999", False),  # a valid delay, cut to the window
        ("Fri, 31 Dec 9999 23:59:59 GMT", False),  # a valid date, cut to the window
    ],
    ids=["5000-digits", "20-digits", "negative", "garbage", "huge", "year-9999"],
)
async def test_an_absurd_retry_after_holds_the_token_one_window_at_most(
    audit: Audit, value: str, unusable: bool
) -> None:
    bad = fail(429, 0.5, **{"Retry-After": value})
    server = FakeLexer.scripted(bad, bad, bad)
    async with audit.client(server) as client:
        assert await client.summary(DATE_FROM, DATE_TO) == expected_summary()
        assert await client.summary(DATE_FROM, DATE_TO) == expected_summary()  # not poisoned
    first, second, third, retried, after = server.arrivals
    for a, b in pairwise([first, second, third, retried]):
        assert b.at - a.done == at(W)
    assert after.at == at(retried.done)
    warned = [r for r in audit.caplog.records if "unusable Retry-After" in r.getMessage()]
    assert len(warned) == (1 if unusable else 0)  # once, for three of them


@pytest.mark.looptime
async def test_max_retry_after_caps_what_the_server_asks(audit: Audit) -> None:
    server = FakeLexer.scripted(fail(429, 0.5, **{"Retry-After": "3600"}))
    async with audit.client(server, retry=RetryPolicy(max_retry_after=30.0)) as client:
        await client.summary(DATE_FROM, DATE_TO)
    rejected, retried = server.arrivals
    assert retried.at - rejected.done == at(30.0)
    assert audit.of(RateLimited) == [RateLimited(LABEL, 30.0)]
