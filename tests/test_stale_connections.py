"""Dead keep-alive connections: a proxy or server that closes a connection after its
answer without saying so (tinyproxy does, after every response) leaves aiohttp a pooled
connection that the next request meets dead. An export start is not idempotent, so the
channel does not retry it; ``restart_dropped`` starts it once more, as the pipeline and
backfills ask.

A raw asyncio server on 127.0.0.1 makes the race deterministic: it answers the first
request of a connection with keep-alive and drops the connection on the second request
without an answer, after reading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest
from payloads import SUMMARY_TEXT  # tests/ is on sys.path

from lexer_activity_async import (
    LexerClient,
    LexerConnectionError,
    LimiterRegistry,
    MalformedResponseError,
    RetryPolicy,
    ServerError,
    sync,
)

TOKEN = "stale-token-9c1e5a7b3d2f4e6a8b0c"
NOW = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
FROM, TO = NOW - timedelta(days=7), NOW - timedelta(days=1)
JOB = b'{"status": "pending", "url": null, "token": "job-1"}'


def _answer(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


class KeepAliveServer:
    """Serves each connection's requests in turn: the first with a keep-alive answer (a
    summary report or an export job), a further one with ``second`` (None: the
    connection drops once the request is read)."""

    def __init__(self, second_on_a_connection: bytes | None) -> None:
        self.second = second_on_a_connection
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request)
        self.connections = 0
        self.url = ""

    def answer(self, request: bytes, nth: int) -> bytes | None:
        if nth > 1:
            return self.second
        return _answer("200 OK", SUMMARY_TEXT.encode() if b'"summary"' in request else JOB)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        nth = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                request = head + await reader.readexactly(length)
                self.requests.append((number, request))
                nth += 1
                reply = self.answer(request, nth)
                if reply is None:
                    return  # read, never answered: the connection drops
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def keep_alive_server(second: bytes | None) -> AsyncIterator[KeepAliveServer]:
    state = KeepAliveServer(second)
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


def _client(url: str) -> LexerClient:
    return LexerClient(
        TOKEN,
        api_url=url,
        status_url=url,
        registry=LimiterRegistry(),
        now=lambda: NOW,
        retry=RetryPolicy(max_retries=3, base=0.001, cap=0.001),
    )


async def _report_then_start(server: KeepAliveServer, *, restart: bool) -> str:
    """A report (it leaves its connection pooled), then an export start on that one."""
    async with _client(server.url) as client:
        await client.report("summary", FROM, TO)
        job = await client.start_export("case_details", FROM, TO, restart_dropped=restart)
        return job.token


async def test_a_start_meeting_a_dead_pooled_connection_is_restarted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lexer_activity_async")
    async with keep_alive_server(None) as server:
        assert await _report_then_start(server, restart=True) == "job-1"
    # The report and the start on connection 1 (dropped unanswered), the start again on 2.
    assert [number for number, _ in server.requests] == [1, 1, 2]
    assert server.requests[1][1] == server.requests[2][1]  # the same request, once more
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "starting it once more" in warnings[0].getMessage()
    assert TOKEN not in caplog.text


async def test_without_restart_dropped_a_dead_connection_fails_the_start() -> None:
    async with keep_alive_server(None) as server:
        with pytest.raises(LexerConnectionError) as caught:
            await _report_then_start(server, restart=False)
    assert type(caught.value) is LexerConnectionError
    assert caught.value.request_sent
    assert len(server.requests) == 2  # not retried: the job may exist
    assert TOKEN not in repr(caught.value)


@pytest.mark.parametrize(
    ("second", "error_type"),
    [
        (_answer("503 Service Unavailable", b'{"error": "busy"}'), ServerError),
        (b"HTTP/1.1 banana\r\n\r\n", MalformedResponseError),
    ],
    ids=["503", "malformed"],
)
async def test_a_start_the_server_answered_is_not_restarted(
    second: bytes, error_type: type[Exception]
) -> None:
    async with keep_alive_server(second) as server:
        with pytest.raises(error_type):
            await _report_then_start(server, restart=True)
    assert len(server.requests) == 2  # the server spoke: the job may exist, no second


def test_the_sync_client_takes_restart_dropped() -> None:
    async def serve_and_call() -> str:
        async with keep_alive_server(None) as server:

            def call() -> str:
                with sync.LexerClient(
                    TOKEN, api_url=server.url, status_url=server.url, now=lambda: NOW
                ) as client:
                    client.report("summary", FROM, TO)
                    job = client.start_export("case_details", FROM, TO, restart_dropped=True)
                    return job.token

            return await asyncio.to_thread(call)

    assert asyncio.run(serve_and_call()) == "job-1"
