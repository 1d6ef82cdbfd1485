"""The transport seam: client behaviour over an in-memory `MockTransport` (no socket,
virtual time), and the one direction of imports below the client."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import payloads as ref
import pytest

from lexer_activity_async import (
    ClientClosedError,
    ConfigurationError,
    LexerClient,
    LexerConnectionError,
    LimiterRegistry,
    RetryPolicy,
    ServerError,
    TokenMismatchError,
    exports,
)
from lexer_activity_async import models as m
from lexer_activity_async.events import Event, Retrying
from lexer_activity_async.exports import DownloadPolicy
from lexer_activity_async.kinds import Reports
from lexer_activity_async.transport import (
    Channel,
    HttpRequest,
    HttpResponse,
    MockTransport,
    Secret,
)

TOKEN = "mock-token-0123456789abcdef"
NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)
JAN = datetime(2024, 1, 1, tzinfo=timezone.utc)
FEB = datetime(2024, 2, 1, tzinfo=timezone.utc)
SUMMARY = json.loads(ref.SUMMARY)


def mock_client(transport: MockTransport, **options: object) -> LexerClient:
    return LexerClient(
        TOKEN,
        api_url="https://api.example/v1",
        status_url="https://status.example/v1",
        registry=LimiterRegistry(),
        transport=transport,
        now=lambda: NOW,
        **options,  # type: ignore[arg-type]
    )


async def test_a_report_goes_out_with_the_token_and_decodes_to_its_kind() -> None:
    seen: list[HttpRequest] = []

    def handler(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        return HttpResponse(200, {"Content-Type": "application/json"}, json.dumps(SUMMARY).encode())

    async with mock_client(MockTransport(handler)) as client:
        result = await client.report(Reports.SUMMARY, JAN, FEB, users=[7])
        stats = client.stats
    assert isinstance(result, m.Summary)
    assert result.total_volume == 81
    (request,) = seen
    assert (request.method, request.url) == ("POST", "https://api.example/v1/activity/reports")
    assert request.secret_headers["Auth-Api-Token"].reveal() == TOKEN
    assert TOKEN not in repr(request)
    assert json.loads(request.body or b"") == {
        "type": "summary",
        "date_from": "2024-01-01T00:00:00+00:00",
        "date_to": "2024-02-01T00:00:00+00:00",
        "users": [7],
    }
    assert stats.requests == 1


@pytest.mark.looptime
async def test_a_request_body_holds_no_more_memory_than_its_bytes() -> None:
    """A backfill holds a body for each request waiting for a slot or the wire: each
    takes about its own size (orjson's bytes alone keep a 4 KiB buffer)."""
    bodies: list[bytes] = []

    def handler(request: HttpRequest) -> HttpResponse:
        bodies.append(request.body or b"")
        return HttpResponse(200, {"Content-Type": "application/json"}, json.dumps(SUMMARY).encode())

    async with mock_client(MockTransport(handler)) as client:
        await client.summary(JAN, FEB)  # warm: caches, first-call allocations
        bodies.clear()
        tracemalloc.start()
        try:
            for _ in range(100):
                await client.summary(JAN, FEB)
            held, _ = tracemalloc.get_traced_memory()
            del bodies[:]
            gc.collect()
            left, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (held - left) / 100 < 1024  # bytes per body kept: each is ~150


async def test_a_server_error_is_retried_after_backoff_then_succeeds() -> None:
    answers = [HttpResponse(503, {}, b"busy"), HttpResponse(200, {}, json.dumps(SUMMARY).encode())]
    events: list[Event] = []
    transport = MockTransport(lambda request: answers.pop(0))
    async with mock_client(transport, on_event=events.append) as client:
        result = await client.summary(JAN, FEB)
        stats = client.stats
    assert result.total_volume == 81
    assert answers == []
    retries = [e for e in events if isinstance(e, Retrying)]
    assert [(e.attempt, e.error) for e in retries] == [(1, "ServerError")]
    assert stats.requests == 2
    assert stats.retries == 1


@pytest.mark.looptime
async def test_retries_stop_at_max_retries_with_the_typed_error() -> None:
    calls = 0

    def handler(request: HttpRequest) -> HttpResponse:
        nonlocal calls
        calls += 1
        return HttpResponse(500, {}, b'{"error": "broken"}')

    async with mock_client(MockTransport(handler), retry=RetryPolicy(max_retries=2)) as client:
        with pytest.raises(ServerError, match="broken"):
            await client.users()
    assert calls == 3


async def test_an_echoed_token_is_redacted_before_the_error_is_built() -> None:
    def handler(request: HttpRequest) -> HttpResponse:
        echoed = request.secret_headers["Auth-Api-Token"].reveal()
        body = f"Unauthorized - api token not matching: {echoed}".encode()
        return HttpResponse(401, {"X-Echo": echoed}, body)

    async with mock_client(MockTransport(handler)) as client:
        with pytest.raises(TokenMismatchError) as caught:
            await client.users()
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(caught.value.args)
    assert "<redacted>" in str(caught.value)


class EchoingTransport:
    """A caller's own `Transport` that redacts nothing: it echoes the token back."""

    async def handle(self, request: HttpRequest) -> HttpResponse:
        echoed = request.secret_headers["Auth-Api-Token"].reveal()
        return HttpResponse(401, {"X-Echo": echoed}, f"not matching: {echoed}".encode())

    async def aclose(self) -> None:
        pass


async def test_the_channel_redacts_what_a_callers_own_transport_lets_through() -> None:
    transport = EchoingTransport()
    client = LexerClient(
        TOKEN,
        api_url="https://api.example/v1",
        registry=LimiterRegistry(),
        transport=transport,
        now=lambda: NOW,
    )
    async with client:
        with pytest.raises(TokenMismatchError) as caught:
            await client.users()
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(caught.value.args)
    assert "<redacted>" in str(caught.value)


@pytest.mark.looptime
async def test_an_export_start_is_retried_only_when_it_never_left() -> None:
    starts = 0

    def handler(request: HttpRequest) -> HttpResponse:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise LexerConnectionError("cannot connect", request_sent=False)
        if starts == 2:
            raise LexerConnectionError("dropped after sending")
        return HttpResponse(200, {}, b'{"status": "pending", "url": null, "token": "r1"}')

    async with mock_client(MockTransport(handler)) as client:
        with pytest.raises(LexerConnectionError, match="dropped after sending"):
            await client.start_export("case_details", JAN, FEB)
    assert starts == 2  # the second failure may have created the job: not retried


@pytest.mark.looptime
async def test_a_download_resumes_with_range_after_a_dropped_stream(tmp_path: Path) -> None:
    content = b"id,text\n" + b"".join(b"%d,row\n" % i for i in range(200))
    ranges: list[str | None] = []

    async def dropping(data: bytes) -> AsyncIterator[bytes]:
        yield data[:100]
        raise LexerConnectionError("connection to the file host failed: reset")

    def handler(request: HttpRequest) -> HttpResponse:
        if "activity/reports" in request.url:
            return HttpResponse(
                200,
                {},
                b'{"status": "complete", "url": "https://files.example/f.csv", "token": "r"}',
            )
        assert request.secret_headers == {}  # the file host never sees the token
        offset_header = request.headers.get("Range")
        ranges.append(offset_header)
        if offset_header is None:
            return HttpResponse(200, {"Content-Length": str(len(content))}, dropping(content))
        offset = int(offset_header.removeprefix("bytes=").rstrip("-"))
        rest = content[offset:]
        return HttpResponse(
            206,
            {"Content-Range": f"bytes {offset}-{len(content) - 1}/{len(content)}"},
            rest,
        )

    dest = tmp_path / "out.csv"
    async with mock_client(MockTransport(handler)) as client:
        job = await client.start_export("case_details", JAN, FEB)
        size = await client.download_export(job, dest, policy=DownloadPolicy(chunk_size=64))
    assert size == len(content)
    assert dest.read_bytes() == content
    assert ranges == [None, "bytes=100-"]


async def test_export_rows_stream_through_the_mock_without_a_file() -> None:
    def handler(request: HttpRequest) -> HttpResponse:
        if request.url.endswith("/activity/reports"):
            return HttpResponse(
                200, {}, b'{"status": "complete", "url": "https://f.example/x", "token": "r"}'
            )
        return HttpResponse(200, {}, b'a,b\n1,"x,y"\n2,z\n')

    async with mock_client(MockTransport(handler)) as client:
        rows = [row async for row in client.export_rows("case_details", JAN, FEB)]
    assert rows == [{"a": "1", "b": "x,y"}, {"a": "2", "b": "z"}]


PACKAGE = Path(exports.__file__).parent
BELOW_THE_CLIENT = [
    "transport",
    "exports",
    "wire",
    "kinds",
    "reports",
    "models",
    "retry",
    "backoff",
    "durable",
    "limits",
    "events",
    "exceptions",
    "destinations",
]


@pytest.mark.parametrize("module", BELOW_THE_CLIENT)
def test_no_module_below_the_client_imports_it(module: str) -> None:
    """Importing ``module`` in a fresh interpreter loads neither the client nor the
    package's ``__init__`` re-exports that would (the import names the submodule)."""
    code = (
        "import sys, importlib\n"
        "sys.modules['lexer_activity_async'] = type(sys)('lexer_activity_async')\n"
        "import lexer_activity_async as pkg, pathlib\n"
        f"pkg.__path__ = [str(pathlib.Path({str(PACKAGE)!r}))]\n"
        f"importlib.import_module('lexer_activity_async.{module}')\n"
        "assert 'lexer_activity_async.client' not in sys.modules, sorted(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_import_check_sees_a_module_that_does_import_the_client() -> None:
    """The check above can fail: the backfill, above the client, is caught by it."""
    with pytest.raises(AssertionError, match="client"):
        test_no_module_below_the_client_imports_it("backfill")


async def test_exports_run_on_a_bare_channel_with_no_client() -> None:
    """The exports need only the channel's public seam (send, emit, now, files)."""
    seen: list[str] = []

    def handler(request: HttpRequest) -> HttpResponse:
        seen.append(f"{request.method} {request.url} {dict(request.params or {})}")
        return HttpResponse(200, {}, b'{"status": "pending", "url": null, "token": "r7"}')

    mock = MockTransport(handler)
    channel = Channel(
        token=Secret(TOKEN),
        label="bare",
        api_url="https://api.example/v1",
        status_url="https://status.example/v1",
        timeout=5.0,
        retry=RetryPolicy(),
        window=300.0,
    )
    channel.bind(mock, mock, LimiterRegistry().get(TOKEN, max_requests=100, window=300.0))
    job = await exports.export_status(channel, "r7")
    assert job == m.ExportJob("pending", None, "r7")
    assert seen == ["GET https://status.example/v1/activity/reports/status {'token': 'r7'}"]
    assert channel.limiter.stats.requests == 1


async def test_a_passed_transport_is_the_callers_and_excludes_a_session() -> None:
    mock = MockTransport(lambda request: HttpResponse(200, {}, b"[]"))
    async with mock_client(mock) as client:
        assert await client.users() == []
    assert client.closed
    assert not mock.closed  # the caller closes what it passed in
    with pytest.raises(ClientClosedError):
        await client.users()
    with pytest.raises(ConfigurationError, match="session or transport"):
        LexerClient(TOKEN, transport=mock, session=object())  # type: ignore[arg-type]
