"""Shared fixtures: an in-process sandbox and clients pointed at it."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
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


@pytest.fixture(autouse=True)
def private_limit_store(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """The CLI keeps rate limits in a store file by default: give each test its own (never
    the user's cache), and close what the test opened."""
    from lexer_activity_async.limits_sqlite import STORE_ENV, close_stores

    path = tmp_path_factory.mktemp("limits") / "limits.sqlite3"
    monkeypatch.setenv(STORE_ENV, str(path))
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
def make_client(
    sandbox: Sandbox, client_for: Callable[..., LexerClient]
) -> Callable[..., LexerClient]:
    """Build clients for the sandbox: ``make_client(token=TOKEN_A, **options)``."""
    return functools.partial(client_for, sandbox)


# -- additive fixtures (wire tests: test_client_sandbox.py, test_exports.py) -------------


@pytest.fixture
async def sandbox_factory() -> AsyncIterator[Callable[..., Any]]:
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
def client_for(registry: LimiterRegistry) -> Callable[..., LexerClient]:
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


@pytest.fixture
def mock_http() -> Any:
    """An `aioresponses` mock usable with aiohttp >= 3.13.

    aioresponses 0.7.9 builds ``ClientResponse`` without the ``stream_writer`` argument
    that aiohttp 3.13 made required; every mocked response here gets a stand-in for it.
    ``mock_http.requests`` records each call's kwargs (``json``, ``headers``, ...).
    """
    from types import SimpleNamespace

    import aiohttp
    from aioresponses import aioresponses

    class CompatResponse(aiohttp.ClientResponse):
        def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
            kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
            super().__init__(method, url, **kwargs)

    class CompatAioresponses(aioresponses):  # type: ignore[misc]
        def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("response_class", CompatResponse)
            super().add(url, method, *args, **kwargs)

    # Loopback traffic (the sandbox, `loopback_server`) passes through to the real socket.
    with CompatAioresponses(passthrough=["http://127.0.0.1", "http://localhost"]) as mocked:
        yield mocked


@pytest.fixture
async def loopback_server() -> AsyncIterator[Callable[..., Any]]:
    """Serve an aiohttp handler on a loopback port for exact, hand-written responses:
    ``url, seen = await loopback_server(handler)``. ``seen`` records every request as a
    dict (method, path_qs, headers, body) before the handler runs."""
    from aiohttp import web

    runners: list[web.AppRunner] = []

    async def serve(handler: Callable[..., Any]) -> tuple[str, list[dict[str, Any]]]:
        seen: list[dict[str, Any]] = []

        async def record(request: web.Request) -> web.StreamResponse:
            seen.append(
                {
                    "method": request.method,
                    "path_qs": request.path_qs,
                    "headers": dict(request.headers),
                    "body": await request.read(),
                }
            )
            response: web.StreamResponse = await handler(request)
            return response

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
def sandbox_in_thread() -> Any:
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
def write_spec() -> Callable[..., Any]:
    """Write a backfill spec as TOML: ``path = write_spec(path, {"date_from": ..., ...})``.
    Values are strings, numbers, booleans, lists and tables (written inline)."""
    import json
    from pathlib import Path

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
