"""Shared fixtures: an in-process sandbox and clients pointed at it."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aioresponses import aioresponses
from postgres_server import find_postgres, postgres_server
from redis_server import find_redis_server, redis_server  # tests/ is on sys.path

from lexer_activity_async import LexerClient, LimiterRegistry
from lexer_activity_async.sandbox import Sandbox

TOKEN_A = "sandbox-token-a-0123456789"
TOKEN_B = "sandbox-token-b-9876543210"
NOW = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
"""A fixed "now" shared by the sandbox and clients, so date rules are deterministic."""


SANDBOX_DEFAULTS: dict[str, Any] = {
    "tokens": frozenset({TOKEN_A, TOKEN_B}),
    "max_requests": 10_000,
    "window": 300.0,
    "export_pending_seconds": 0.05,
    "now": lambda: NOW,
}
"""Two valid tokens, a generous limit and quick export jobs."""

# The fixtures' types, for test signatures (``make_client: MakeClient``).
MakeClient = Callable[..., LexerClient]
ClientFor = Callable[..., LexerClient]
SandboxFactory = Callable[..., Awaitable[Sandbox]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Seen = list[dict[str, Any]]
LoopbackServer = Callable[[Handler], Awaitable[tuple[str, Seen]]]
SandboxInThread = Callable[..., Sandbox]
WriteSpec = Callable[[Path, dict[str, Any]], Path]


def _backport_looptime_sub_tick_fix() -> None:
    """Make looptime < 0.8 advance its clock for a timer less than one tick away.

    looptime counts virtual time in integer ticks (1 µs). When the next timer is due in
    less than a tick (a jittered ``sleep`` ends off the tick grid), asyncio asks the
    selector to wait that remainder; looptime < 0.8 rounds it to 0 ticks, so the clock
    never reaches the timer and the loop spins forever (looptime issue #35). 0.8 fixed it
    by moving one tick, but needs Python 3.11, so on Python 3.10 (looptime <= 0.7) the
    same fix is applied here.
    """
    from importlib.metadata import version

    import looptime

    major, minor = (int(part) for part in re.findall(r"\d+", version("looptime"))[:2])
    if (major, minor) >= (0, 8):
        return
    loop_class: Any = looptime.LoopTimeEventLoop
    original = loop_class._LoopTimeEventLoop__sync

    def sync(
        self: Any, timeout: float | None, step: int | None = None, end: int | None = None
    ) -> tuple[float | None, int, bool]:
        real_timeout, real_step, overtime = original(self, timeout, step, end)
        tick = 1 / self._LoopTimeEventLoop__resolution_reciprocal
        if not overtime and timeout is not None and 0 < timeout < tick:
            real_step += 1
        return real_timeout, real_step, overtime

    loop_class._LoopTimeEventLoop__sync = sync


_backport_looptime_sub_tick_fix()


@pytest.fixture(autouse=True)
def private_limit_store(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """The CLI keeps rate limits in a store file by default: give each test its own (never
    the user's cache), and close what the test opened."""
    from lexer_activity_async.limits_sqlite import STORE_ENV, close_stores

    path = tmp_path_factory.mktemp("limits") / "limits.sqlite3"
    monkeypatch.setenv(STORE_ENV, str(path))
    # A child process that drops LEXER_* variables still never reaches the user's cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(path.parent / "cache"))
    yield path
    close_stores()


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """A sandbox with `SANDBOX_DEFAULTS`."""
    async with Sandbox(**SANDBOX_DEFAULTS) as sb:
        yield sb


@pytest.fixture
def registry() -> LimiterRegistry:
    """A fresh limiter registry per test, so limits never leak between tests."""
    return LimiterRegistry()


@pytest.fixture
def make_client(sandbox: Sandbox, client_for: ClientFor) -> MakeClient:
    """Build clients for the sandbox: ``make_client(token=TOKEN_A, **options)``."""
    return functools.partial(client_for, sandbox)


# -- additive fixtures (wire tests: test_client_sandbox.py, test_exports.py) -------------


@pytest.fixture
async def sandbox_factory() -> AsyncIterator[SandboxFactory]:
    """Start extra sandboxes: ``await sandbox_factory(**config)``; each starts from the
    ``sandbox`` fixture's settings (two tokens, generous limit, quick jobs, fixed NOW) and
    is closed at teardown."""
    import contextlib

    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> Sandbox:
            options = {**SANDBOX_DEFAULTS, **overrides}
            sb: Sandbox = await stack.enter_async_context(Sandbox(**options))
            return sb

        yield make


@pytest.fixture
def client_for(registry: LimiterRegistry) -> ClientFor:
    """Build a client for any started sandbox: ``client_for(sb, token=TOKEN_A, **options)``,
    with the same defaults as ``make_client``."""

    def make(sb: Sandbox, token: str = TOKEN_A, **options: Any) -> LexerClient:
        options.setdefault("api_url", sb.api_url)
        options.setdefault("status_url", sb.status_url)
        options.setdefault("registry", registry)
        options.setdefault("max_requests", sb.config.max_requests)
        options.setdefault("window", sb.config.window)
        options.setdefault("now", lambda: NOW)
        return LexerClient(token, **options)

    return make


def _response_class_for_aioresponses() -> type[Any] | None:
    """A `ClientResponse` subclass that aioresponses can build, or None when the installed
    aiohttp's own class already works with it.

    aioresponses (0.7.6 to 0.7.9) builds ``ClientResponse`` without ``stream_writer``, which
    aiohttp 3.14 made a required argument; older releases have no such argument at all.
    """
    import inspect
    from types import SimpleNamespace

    import aiohttp

    parameter = inspect.signature(aiohttp.ClientResponse.__init__).parameters.get("stream_writer")
    if parameter is None or parameter.default is not inspect.Parameter.empty:
        return None

    class CompatResponse(aiohttp.ClientResponse):
        def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
            kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
            super().__init__(method, url, **kwargs)

    return CompatResponse


@pytest.fixture
def mock_http() -> Iterator[aioresponses]:
    """An `aioresponses` mock that works with every supported aiohttp (see
    `_response_class_for_aioresponses`). ``mock_http.requests`` records each call's kwargs
    (``json``, ``headers``, ...)."""
    response_class = _response_class_for_aioresponses()

    class CompatAioresponses(aioresponses):
        def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:
            if response_class is not None:
                kwargs.setdefault("response_class", response_class)
            super().add(url, method, *args, **kwargs)

    # Loopback traffic (the sandbox, `loopback_server`) passes through to the real socket.
    with CompatAioresponses(passthrough=["http://127.0.0.1", "http://localhost"]) as mocked:
        yield mocked


@pytest.fixture
async def loopback_server() -> AsyncIterator[LoopbackServer]:
    """Serve an aiohttp handler on a loopback port for exact, hand-written responses:
    ``url, seen = await loopback_server(handler)``. ``seen`` records every request as a
    dict (method, path_qs, headers, body) before the handler runs."""
    runners: list[web.AppRunner] = []

    async def serve(handler: Handler) -> tuple[str, Seen]:
        seen: Seen = []

        async def record(request: web.Request) -> web.StreamResponse:
            seen.append(
                {
                    "method": request.method,
                    "path_qs": request.path_qs,
                    "headers": dict(request.headers),
                    "body": await request.read(),
                }
            )
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}", seen

    yield serve
    for runner in runners:
        await runner.cleanup()


# -- additive fixtures (backfill and CLI tests: test_backfill.py, test_cli.py) ------------


@pytest.fixture
def sandbox_in_thread() -> Iterator[SandboxInThread]:
    """Start sandboxes on an event loop in a background thread, for code that runs its own
    loop (click's CliRunner, subprocesses): ``sb = sandbox_in_thread(**config)``. Defaults
    as the ``sandbox`` fixture but with the real clock (CLI clients use the real "now").
    Read ``sb.stats`` only while no command is running; closed at teardown."""
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sandbox-loop", daemon=True)
    thread.start()
    started: list[Sandbox] = []

    def start(**overrides: Any) -> Sandbox:
        real_clock = {k: v for k, v in SANDBOX_DEFAULTS.items() if k != "now"}
        options = {**real_clock, **overrides}
        sb = Sandbox(**options)
        asyncio.run_coroutine_threadsafe(sb.start(), loop).result(timeout=30)
        started.append(sb)
        return sb

    try:
        yield start
    finally:
        for sb in started:
            asyncio.run_coroutine_threadsafe(sb.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture
def write_spec() -> WriteSpec:
    """Write a backfill spec as TOML: ``path = write_spec(path, {"date_from": ..., ...})``.
    Values are strings, numbers, booleans, lists and tables (written inline)."""
    import json

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (str, Path)):
            return json.dumps(str(v))
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {v!r} as TOML")

    def write(path: Path, data: dict[str, Any]) -> Path:
        path.write_text("".join(f"{k} = {value(v)}\n" for k, v in data.items()), "utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the session. Skipped locally without the binary; under
    CI=true a missing server is a failure, so the Redis suite can never silently vanish."""
    if find_redis_server() is None:
        message = "redis-server is not on PATH (apt install redis-server) - Redis tests"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} cannot be skipped under CI")
        pytest.skip(f"{message} skipped")
    with redis_server() as url:
        yield url


@pytest.fixture
def other_process() -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    """Start Python code in another process and wait for its first line, ``ready``
    (``start(code)``, the process returned); each is killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(code: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[str]:
    """A real PostgreSQL cluster for the session (one: starting one takes a second or
    two). Skipped locally without the binaries; under CI=true their absence fails."""
    if find_postgres() is None:
        message = "PostgreSQL is not installed (apt install postgresql) - PostgreSQL tests"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} cannot be skipped under CI")
        pytest.skip(f"{message} skipped")
    with postgres_server() as url:
        yield url


@pytest.fixture
def pg_url(postgres_cluster: str) -> Iterator[str]:
    """A ``postgresql://`` URL whose connections use a fresh, empty schema of the session's
    cluster (through ``search_path``), so each test has a database of its own."""
    import uuid

    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_cluster, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_cluster}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_cluster, autocommit=True) as db:
        db.execute(f"DROP SCHEMA {schema} CASCADE")
