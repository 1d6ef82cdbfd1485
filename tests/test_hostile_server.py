"""Hostile servers: a raw asyncio server on 127.0.0.1 answers malformed HTTP, echoes the
token, nests JSON absurdly deep, sends NaN and absurd Retry-After values, or never
answers; a loopback listener with a full accept queue stands in for a host that never
completes the handshake.

For every failure: the exception is a typed `LexerError`, and the token is in none of its
``str``, ``repr``, arguments or attributes, any link of its cause/context chain, the
formatted traceback, or the locals of any frame in those tracebacks.

Deadlines are tiny (tens of milliseconds) instead of slept through: nothing here waits
for real seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from payloads import SUMMARY_TEXT  # tests/ is on sys.path

from lexer_activity_async import (
    BadRequestError,
    ConfigurationError,
    DownloadError,
    DownloadTimeoutError,
    LexerClient,
    LexerConnectionError,
    LexerError,
    LexerTimeoutError,
    LimiterBackendError,
    LimiterRegistry,
    MalformedResponseError,
    NotFoundError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    TokenMismatchError,
    UnexpectedResponseError,
)
from lexer_activity_async import client as client_module
from lexer_activity_async.exports import DownloadPolicy, export_status, stream_file
from lexer_activity_async.limits import SlidingWindowLimiter
from lexer_activity_async.transport import Secret as _Secret

TOKEN = "hostile-token-5f3c9a7e1b2d4c6f8a0e"
ECHO = b"{TOKEN" + b"_" * (len(TOKEN) - 7) + b"}"
"""Replaced, in a canned answer, by the token the request carried (so an echo is real);
as long as the token, so a Content-Length computed beforehand stays right."""

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
FROM, TO = NOW - timedelta(days=7), NOW - timedelta(days=1)
W = 300.0


# -- the servers ---------------------------------------------------------------------------


class RawServer:
    """Reads each request's head and body, then runs ``answer(request, writer)``."""

    def __init__(self, answer: Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.stop = asyncio.Event()  # ends the handlers that never answer
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            request = head + await reader.readexactly(length)
            self.requests.append(request)
            await self._answer_until_stopped(request, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer_until_stopped(self, request: bytes, writer: asyncio.StreamWriter) -> None:
        """Run the answer, but end it when the server stops: from Python 3.12.1 on,
        ``Server.wait_closed`` waits for every handler, and some answers never end."""
        answering = asyncio.ensure_future(self.answer(request, writer))
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({answering, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answering, stopping):
                task.cancel()
            await asyncio.gather(answering, stopping, return_exceptions=True)
        error = None if answering.cancelled() else answering.exception()
        if error is not None:
            raise error

    @property
    def tokens_seen(self) -> list[bytes]:
        return [_token_of(r) for r in self.requests]


def _token_of(request: bytes) -> bytes:
    for line in request.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"auth-api-token":
            return value.strip()
    return b""


def reply(payload: bytes) -> Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]:
    """Write ``payload`` (the request's token in place of `ECHO`), then close."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(payload.replace(ECHO, _token_of(request)))
        await writer.drain()

    return answer


def response(status: str, body: bytes, *headers: bytes) -> bytes:
    """A well-formed answer; ``Connection: close``, as the server serves one per connection."""
    head = b"".join(h + b"\r\n" for h in (b"Connection: close", *headers))
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n".encode() + head + b"\r\n" + body


@contextlib.asynccontextmanager
async def raw_server(
    answer: Callable[[bytes, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[RawServer]:
    state = RawServer(answer)
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield state
    finally:
        state.stop.set()
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A loopback port whose connects never complete: a listener with backlog 0 that
    never accepts, its accept queue filled, so the kernel drops every further SYN."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(address)
            fillers.append(filler)
        with pytest.raises(TimeoutError):  # the hole holds: a further connect never completes
            socket.create_connection(address, timeout=0.05).close()
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for sock in [*fillers, listener]:
            sock.close()


def hostile_client(url: str, **options: Any) -> LexerClient:
    options.setdefault("retry", RetryPolicy(max_retries=0))
    return LexerClient(
        TOKEN,
        api_url=url,
        status_url=url,
        registry=LimiterRegistry(),
        now=lambda: NOW,
        **options,
    )


# -- the audit -----------------------------------------------------------------------------


def _reprs(value: object, depth: int, seen: set[int]) -> Iterator[str]:
    """``repr`` of ``value`` and of what it holds, a few levels down; the client's own
    token holder (`_Secret`) is the one place the token is meant to live."""
    if id(value) in seen or isinstance(value, _Secret):
        return
    seen.add(id(value))
    try:
        yield repr(value)
    except Exception:  # a half-torn-down object may not repr
        return
    if depth == 0 or isinstance(value, (str, bytes, int, float, type(None))):
        return
    children: list[object] = []
    if isinstance(value, dict):
        children = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = list(value)
    else:
        children = list(getattr(value, "__dict__", {}).values())
        for slot in getattr(type(value), "__slots__", ()):
            children.append(getattr(value, slot, None))
    for child in children:
        yield from _reprs(child, depth - 1, seen)


def assert_token_free(error: BaseException) -> None:
    """No trace of the token anywhere the error reaches."""
    texts = list(traceback.format_exception(error))
    links: list[BaseException]
    pending, links = [error], []
    while pending:
        link = pending.pop()
        if any(link is known for known in links):
            continue
        links.append(link)
        pending += [x for x in (link.__cause__, link.__context__) if x is not None]
    seen: set[int] = set()
    for link in links:
        texts += [str(link), repr(link), repr(link.args)]
        texts += list(_reprs(getattr(link, "__dict__", {}), 3, seen))
        tb = link.__traceback__
        while tb is not None:
            for name, value in tb.tb_frame.f_locals.items():
                texts += [
                    f"{tb.tb_frame.f_code.co_name}.{name}={text}" for text in _reprs(value, 3, seen)
                ]
            tb = tb.tb_next
    leaks = [text for text in texts if TOKEN in text]
    assert not leaks, leaks[:3]


async def failure(call: Awaitable[object]) -> LexerError:
    try:
        await call
    except LexerError as error:
        return error
    raise AssertionError("the call succeeded")


@pytest.fixture(autouse=True)
def _logs_are_token_free(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, logger="lexer_activity_async")
    yield
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in repr(record.args)


# -- malformed HTTP on the API and status hosts ------------------------------------------------


LONG_HEADER = b"X-Echo: " + ECHO * 400  # ~14 KB, over aiohttp's 8190-byte line limit

MALFORMED = {
    "bad status line": (b"HTTP/1.1 abc OK\r\n\r\n", MalformedResponseError),
    "status line echoing the token": (
        b"HTTP/1.1 2x0 " + ECHO + b"\r\n\r\n",
        MalformedResponseError,
    ),
    "not HTTP at all, echoing the token": (ECHO + b" hello\r\n\r\n", MalformedResponseError),
    "non-numeric Content-Length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: " + ECHO + b"\r\n\r\n[]",
        MalformedResponseError,
    ),
    "over-long header": (
        b"HTTP/1.1 200 OK\r\n" + LONG_HEADER + b"\r\nContent-Length: 2\r\n\r\n[]",
        MalformedResponseError,
    ),
    "header line without a colon": (
        b"HTTP/1.1 200 OK\r\n" + ECHO + b"\r\nContent-Length: 2\r\n\r\n[]",
        MalformedResponseError,
    ),
    "broken chunked encoding": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + ECHO + b"\r\n[]\r\n",
        MalformedResponseError,
    ),
    "gzip Content-Encoding that is not gzip": (
        response("200 OK", ECHO * 3, b"Content-Encoding: gzip"),
        LexerConnectionError,
    ),
    "connection closed mid-body": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n[" + ECHO,
        LexerConnectionError,
    ),
    "connection closed before any answer": (b"", LexerConnectionError),
}


@pytest.mark.parametrize(("answer", "expected"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_http_is_a_typed_token_free_error(
    answer: bytes, expected: type[LexerError]
) -> None:
    async with raw_server(reply(answer)) as server, hostile_client(server.url) as client:
        error = await failure(client.users())
    assert type(error) is expected
    assert server.tokens_seen == [TOKEN.encode()]  # the echo was of the real token
    assert_token_free(error)


async def test_malformed_http_names_what_the_parser_objected_to() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: " + ECHO + b"\r\n\r\n[]"
    async with raw_server(reply(answer)) as server, hostile_client(server.url) as client:
        error = await failure(client.users())
    assert "Invalid character in Content-Length" in str(error)
    assert isinstance(error, MalformedResponseError)
    assert error.request_sent


async def test_a_malformed_answer_is_retried_like_a_dropped_connection() -> None:
    answers = [b"HTTP/1.1 abc OK\r\n\r\n", response("200 OK", b"[]")]

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answers.pop(0))
        await writer.drain()

    retry = RetryPolicy(max_retries=1, base=0.0)
    async with raw_server(answer) as server, hostile_client(server.url, retry=retry) as client:
        assert await client.users() == []
    assert len(server.requests) == 2


async def test_a_malformed_status_poll_is_typed_and_token_free() -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    async with raw_server(reply(answer)) as server, hostile_client(server.url) as client:
        error = await failure(export_status(client, "job-1"))
    assert isinstance(error, MalformedResponseError)
    assert b"GET /activity/reports/status?token=job-1 " in server.requests[0]
    assert_token_free(error)


class _ReleaseFails(SlidingWindowLimiter):
    async def release(self, lease: Any) -> None:
        await super().release(lease)
        raise LimiterBackendError("the limiter backend went away")


async def test_a_limiter_failing_while_a_malformed_answer_propagates_keeps_it_out() -> None:
    registry = LimiterRegistry(factory=lambda key, n, w, *, reserve: _ReleaseFails(n, w))
    answer = b"HTTP/1.1 2x0 " + ECHO + b"\r\n\r\n"
    async with raw_server(reply(answer)) as server:
        client = LexerClient(TOKEN, api_url=server.url, registry=registry, retry=RetryPolicy(0))
        async with client:
            error = await failure(client.users())
    assert type(error) is LimiterBackendError
    assert_token_free(error)


# -- answers that echo the token ---------------------------------------------------------------


ECHOED = {
    "401 mismatch": (
        response("401 Unauthorized", b"Unauthorized - api token not matching: " + ECHO),
        TokenMismatchError,
    ),
    "400 JSON message": (
        response("400 Bad Request", b'{"error": "no such token ' + ECHO + b'"}'),
        BadRequestError,
    ),
    "404 with the token in a header": (
        response("404 Not Found", b"Not found", b"X-Echo: " + ECHO),
        NotFoundError,
    ),
    "500": (response("500 Oops", ECHO + b" broke"), ServerError),
    "429 with the token as Retry-After": (
        response("429 Too Many", b"Rate limited exceeded " + ECHO, b"Retry-After: " + ECHO),
        RateLimitedError,
    ),
    "200 of the wrong shape, token across the excerpt's end": (
        response("200 OK", b'{"x": "' + b"a" * 180 + ECHO + b'"}'),
        UnexpectedResponseError,
    ),
    "undocumented status": (response("418 Teapot", ECHO), UnexpectedResponseError),
}


@pytest.mark.parametrize(("answer", "expected"), ECHOED.values(), ids=ECHOED.keys())
async def test_an_echoed_token_is_redacted_before_it_reaches_an_error(
    answer: bytes, expected: type[LexerError]
) -> None:
    retry = RetryPolicy(max_retries=0, max_rate_limited=0)
    async with raw_server(reply(answer)) as server, hostile_client(server.url, retry=retry) as c:
        error = await failure(c.users())
    assert type(error) is expected
    assert server.tokens_seen == [TOKEN.encode()]
    assert_token_free(error)
    if b"Retry-After" not in answer and b"X-Echo" not in answer:
        assert "<redacted>" in str(error) or b"<redacted>" in getattr(error, "body_excerpt", b"")


def test_redaction_covers_the_json_escaped_form() -> None:
    secret = _Secret('tok"en/\\x')
    assert secret.redact(b'{"e": "tok\\"en/\\\\x"} tok"en/\\x') == b'{"e": "<redacted>"} <redacted>'
    assert secret.redact_text('say tok"en/\\x') == "say <redacted>"


# -- JSON no parser should accept ---------------------------------------------------------


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("status", ["200 OK", "400 Bad Request", "401 Unauthorized", "500 Oops"])
async def test_deeply_nested_json_is_an_unexpected_response(status: str) -> None:
    async with (
        raw_server(reply(response(status, DEEP))) as server,
        hostile_client(server.url) as client,
    ):
        error = await failure(client.users())
    assert type(error) is UnexpectedResponseError
    assert "nested too deeply" in str(error)
    assert error.status == int(status[:3])
    assert_token_free(error)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_numbers_are_an_unexpected_response(constant: str) -> None:
    body = SUMMARY_TEXT.replace("181795.692883103", constant).encode()
    assert constant.encode() in body
    async with (
        raw_server(reply(response("200 OK", body))) as server,
        hostile_client(server.url) as client,
    ):
        error = await failure(client.summary(FROM, TO))
    assert type(error) is UnexpectedResponseError
    assert constant.lstrip("-") in str(error)
    assert_token_free(error)


# -- absurd Retry-After -------------------------------------------------------------------


ABSURD = {
    "5000 digits": "9" * 5000,
    "1e400": "1e400",
    "negative": "-5",
    "garbage": "soon, maybe",
    "a date past year 9999": "Fri, 31 Dec 99999 23:59:59 GMT",
}


@pytest.mark.parametrize("value", ABSURD.values(), ids=ABSURD.keys())
async def test_an_unusable_retry_after_counts_as_absent(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    answer = response("429 Too Many", b"Rate limited exceeded", b"Retry-After: " + value.encode())
    retry = RetryPolicy(max_retries=0, max_rate_limited=0)
    async with raw_server(reply(answer)) as server, hostile_client(server.url, retry=retry) as c:
        error = await failure(c.users())
        limiter: Any = c.limiter
        hold = limiter._blocked_until - limiter._now()
    assert isinstance(error, RateLimitedError)
    assert error.retry_after is None
    assert 0 < hold <= W  # one window, as with no Retry-After: not forever, no OverflowError
    assert [r for r in caplog.records if "unusable Retry-After" in r.getMessage()]
    assert_token_free(error)


@pytest.mark.parametrize(
    "value", ["99999999999999", "Fri, 31 Dec 9999 23:59:59 GMT"], ids=["huge", "year 9999"]
)
async def test_a_huge_retry_after_is_cut_to_the_window(value: str) -> None:
    answer = response("429 Too Many", b"Rate limited exceeded", b"Retry-After: " + value.encode())
    retry = RetryPolicy(max_retries=0, max_rate_limited=0)
    async with raw_server(reply(answer)) as server, hostile_client(server.url, retry=retry) as c:
        error = await failure(c.users())
        limiter: Any = c.limiter
        hold = limiter._blocked_until - limiter._now()
    assert isinstance(error, RateLimitedError)
    assert error.retry_after == W
    assert W - 1 < hold <= W


async def test_max_retry_after_bounds_the_pause_and_the_call_goes_on() -> None:
    answers = [
        response("429 Too Many", b"", b"Retry-After: Fri, 31 Dec 9999 23:59:59 GMT"),
        response("429 Too Many", b"", b"Retry-After: 99999999999999"),
        response("200 OK", b"[]"),
    ]

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answers.pop(0))
        await writer.drain()

    retry = RetryPolicy(max_retries=0, max_rate_limited=2, max_retry_after=0.0)
    async with raw_server(answer) as server, hostile_client(server.url, retry=retry) as client:
        assert await client.users() == []
        assert client.stats.rate_limited == 2
    assert len(server.requests) == 3


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan, "60"])
def test_max_retry_after_must_be_a_finite_number(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_retry_after"):
        RetryPolicy(max_retry_after=bad)


# -- hosts that never answer ---------------------------------------------------------------


async def never_answer(request: bytes, writer: asyncio.StreamWriter) -> None:
    await asyncio.Event().wait()  # cancelled when the client gives up and the server closes


async def test_an_api_host_that_never_answers_is_a_timeout() -> None:
    async with (
        raw_server(never_answer) as server,
        hostile_client(server.url, timeout=0.05) as client,
    ):
        error = await failure(client.users())
    assert type(error) is LexerTimeoutError
    assert_token_free(error)


async def test_an_api_host_that_never_completes_the_handshake_is_a_timeout() -> None:
    with black_hole() as url:
        async with hostile_client(url, timeout=0.05) as client:
            error = await failure(client.users())
    assert type(error) is LexerTimeoutError
    assert_token_free(error)


async def test_a_call_deadline_keeps_no_cancelled_attempt_in_its_context() -> None:
    async with raw_server(never_answer) as server, hostile_client(server.url) as client:
        error = await failure(client.users(deadline=0.05))
    assert type(error) is LexerTimeoutError
    assert error.__context__ is None
    assert error.__cause__ is None
    assert_token_free(error)


# -- the file host -------------------------------------------------------------------------


async def download(url: str, policy: DownloadPolicy) -> LexerError:
    async with hostile_client("http://127.0.0.1:9") as client:  # loopback: plain http allowed

        async def drain() -> None:
            async for _ in stream_file(client, url, policy=policy):
                pass

        return await failure(drain())


async def test_a_file_host_that_never_completes_the_handshake_times_out() -> None:
    with black_hole() as url:
        error = await download(url + "/f.csv", DownloadPolicy(connect_timeout=0.05, max_resumes=0))
    assert type(error) is DownloadTimeoutError
    assert isinstance(error, DownloadError)
    assert isinstance(error, LexerTimeoutError)
    assert "connect 0.05s" in str(error)
    assert_token_free(error)


async def test_a_file_host_that_goes_silent_times_out() -> None:
    async def silent(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nid,name\r\n")
        await writer.drain()
        await asyncio.Event().wait()

    async with raw_server(silent) as server:
        error = await download(
            server.url + "/f.csv", DownloadPolicy(read_timeout=0.05, max_resumes=0)
        )
    assert type(error) is DownloadTimeoutError
    assert_token_free(error)


async def test_a_download_past_its_whole_deadline_times_out_despite_resumes_left() -> None:
    async def trickle(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nid,name\r\n")
        await writer.drain()
        await asyncio.Event().wait()

    policy = DownloadPolicy(timeout=0.1, read_timeout=60.0, max_resumes=5)
    async with raw_server(trickle) as server:
        error = await download(server.url + "/f.csv", policy)
    assert type(error) is DownloadTimeoutError
    assert "whole download 0.1s" in str(error)
    assert len(server.requests) <= 1  # no resume once the deadline has passed


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        response("503 Busy", b""),
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nid",
    ],
    ids=["bad status line", "bad Content-Length", "503", "closed mid-body"],
)
async def test_a_malformed_file_host_is_a_download_error(answer: bytes) -> None:
    async with raw_server(reply(answer)) as server:
        error = await download(server.url + "/f.csv", DownloadPolicy(max_resumes=0))
    assert type(error) is DownloadError
    assert error.__context__ is None
    assert error.__cause__ is None
    assert len(server.requests) == 1
    assert _token_of(server.requests[0]) == b""  # the file host never sees the token


@pytest.mark.parametrize(
    "options",
    [{"read_timeout": 0}, {"connect_timeout": -1.0}, {"timeout": math.inf}, {"timeout": 0.0}],
)
def test_download_deadlines_must_be_positive(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        DownloadPolicy(**options)


# -- bad configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["\r\n", "\n", "\x00", "\x7f", "\x1b", "\t"])
def test_a_token_with_control_characters_is_a_configuration_error(bad: str) -> None:
    token = f"{TOKEN[:10]}{bad}{TOKEN[10:]}"
    with pytest.raises(ConfigurationError, match="control character") as info:
        LexerClient(token, api_url="http://127.0.0.1:9")
    assert TOKEN[:10] not in str(info.value)
    assert TOKEN[10:] not in str(info.value)


def test_surrounding_whitespace_of_a_token_is_still_stripped() -> None:
    client = LexerClient(f"  {TOKEN}\r\n", api_url="http://127.0.0.1:9")
    assert client._token.reveal() == TOKEN


async def test_two_limits_for_one_token_is_a_configuration_error_that_closes_its_sessions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[Any] = []
    for name in ("api_session", "files_session"):
        original = getattr(client_module, name)

        def record(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            session = _original(*args, **kwargs)
            opened.append(session)
            return session

        monkeypatch.setattr(client_module, name, record)
    registry = LimiterRegistry()
    url = "http://127.0.0.1:9"
    async with LexerClient(TOKEN, api_url=url, registry=registry):
        other = LexerClient(TOKEN, api_url=url, registry=registry, max_requests=50)
        with pytest.raises(ConfigurationError, match="different limit") as info:
            await other.open()
        assert TOKEN not in str(info.value)
        assert len(opened) == 4
        assert [s.closed for s in opened] == [False, False, True, True]
        assert not other.closed  # the caller may still aclose() it, a no-op now
        await other.aclose()


@pytest.mark.parametrize("options", [{"max_requests": 0}, {"window": 0.0}, {"window": math.inf}])
def test_a_nonsense_limit_is_a_configuration_error(options: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        LexerClient(TOKEN, api_url="http://127.0.0.1:9", **options)  # type: ignore[arg-type]


# -- end to end: a backfill against a server that echoes the token ----------------------------


async def test_a_backfill_records_no_echoed_token_in_its_checkpoint_or_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lexer_activity_async.backfill import BackfillSpec, TokenSource, run_backfill

    monkeypatch.setenv("LEXER_TEST_HOSTILE_TOKEN", TOKEN)
    answers = [  # none retried, so no backoff to sit through
        response("400 Bad Request", b'{"error": "' + ECHO + b' is no report type"}'),
        response("418 Teapot", b"I am " + ECHO),
        response("401 Unauthorized", b"Unauthorized - api token not matching: " + ECHO),
    ]

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answers[len(server.requests) % len(answers)].replace(ECHO, _token_of(request)))
        await writer.drain()

    async with raw_server(answer) as server:
        spec = BackfillSpec(
            tokens=(TokenSource("hostile", env="LEXER_TEST_HOSTILE_TOKEN"),),
            date_from=datetime(2024, 1, 1, tzinfo=timezone.utc),
            date_to=datetime(2024, 3, 1, tzinfo=timezone.utc),
            output=tmp_path / "out",
            reports=("summary", "case_summary"),
            api_url=server.url,
            status_url=server.url,
        )
        summary = await run_backfill(spec, registry=LimiterRegistry())
    assert not summary.ok
    assert server.requests
    assert all(_token_of(r) == TOKEN.encode() for r in server.requests)
    assert TOKEN not in repr(summary)
    errors = [error for failures in summary.failed.values() for _, error in failures]
    assert errors
    assert any("<redacted>" in error for error in errors)
    for path in (tmp_path / "out").rglob("*"):
        assert TOKEN not in str(path)
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path  # the checkpoint too
