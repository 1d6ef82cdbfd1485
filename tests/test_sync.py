"""The blocking twin: same signatures, same typed results, in scripts and inside a
running loop, shared limiter, clean close."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import socket
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import TOKEN_A, SandboxInThread

from lexer_activity_async import ClientClosedError, RetryPolicy, sync
from lexer_activity_async import LexerClient as AsyncLexerClient
from lexer_activity_async import models as m
from lexer_activity_async.events import DownloadProgress, RateLimitWait
from lexer_activity_async.exports import PollPolicy
from lexer_activity_async.limits_sqlite import open_store
from lexer_activity_async.sandbox import Sandbox

JAN = datetime(2026, 1, 1, tzinfo=timezone.utc)
FEB = datetime(2026, 2, 1, tzinfo=timezone.utc)
POLL = PollPolicy(first_delay=0.02, factor=1.5, cap=0.05, timeout=30.0)


def _client(sb: Any, **options: Any) -> sync.LexerClient:
    return sync.LexerClient(TOKEN_A, api_url=sb.api_url, status_url=sb.status_url, **options)


def _portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("AnyIO")]


def test_every_public_async_method_has_a_sync_twin_with_its_signature() -> None:
    for name, value in inspect.getmembers(AsyncLexerClient):
        if name.startswith("_") or not callable(value) or name == "aclose":
            continue
        twin = getattr(sync.LexerClient, name)
        assert inspect.signature(twin) == inspect.signature(value), name
    assert callable(sync.LexerClient.close)


def test_the_constructor_takes_the_async_clients_keywords_but_its_sessions() -> None:
    """Explicit, typed keywords (no ``**options``): every one of the async client's except
    the aiohttp sessions, which belong to the loop that made them."""
    blocking = inspect.signature(sync.LexerClient.__init__).parameters
    asynchronous = inspect.signature(AsyncLexerClient.__init__).parameters
    assert not [p for p in blocking.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    loop_bound = {"session", "file_session"}
    assert list(blocking) == [name for name in asynchronous if name not in loop_bound]
    for name, parameter in blocking.items():
        assert parameter == asynchronous[name], name


def test_script_use_typed_results_shared_limiter_and_clean_close(
    sandbox_in_thread: SandboxInThread,
) -> None:
    sb = sandbox_in_thread()
    before = len(_portal_threads())
    with _client(sb) as one, _client(sb) as two:
        assert all(isinstance(u, m.User) for u in one.users())
        two.groups()
        assert one.stats.requests == two.stats.requests == 2  # one shared limiter
        rows = one.export_rows("case_details", JAN, FEB, poll=POLL)
        first = next(iter(rows))
        assert isinstance(first, dict)
        rows.close()  # early stop cleans up on the loop
    assert len(_portal_threads()) == before  # no thread left
    one.close()  # idempotent
    with pytest.raises(ClientClosedError):
        one.users()


def test_inside_a_running_event_loop(sandbox_in_thread: SandboxInThread) -> None:
    sb = sandbox_in_thread()

    async def notebook_cell() -> list[m.Group]:
        with _client(sb) as client:
            return list(client.groups())

    groups = asyncio.run(notebook_cell())
    assert all(isinstance(g, m.Group) for g in groups)


def test_bad_option_fails_before_any_thread_starts() -> None:
    before = len(_portal_threads())
    with pytest.raises(Exception, match="timeout"):
        sync.LexerClient(TOKEN_A, timeout=0)
    assert len(_portal_threads()) == before


# -- Ctrl-C: the call is cancelled on the loop; nothing is left behind -------------------


class HangingServer:
    """A loopback TCP server that reads a request and never answers; it interrupts the
    main thread (as Ctrl-C does) once the request has arrived, and notes when the client
    closes the connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="hanging-server", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            interrupted = False
            while conn.recv(65536):
                if not interrupted:
                    interrupted = True
                    interrupt_main_thread()
            self.closed.set()

    def stop(self) -> None:
        if self.thread.is_alive() and not self.closed.is_set():
            with contextlib.suppress(OSError):  # unblock accept() if nothing connected
                socket.create_connection(self.listener.getsockname(), timeout=1).close()
        self.listener.close()
        self.thread.join(timeout=10)


@pytest.fixture(autouse=True)
def sigint_raises() -> Iterator[None]:
    """Python's own SIGINT handler for each test: a shell starts background jobs with
    SIGINT ignored and Python keeps it so, where Ctrl-C would raise nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_main_thread() -> None:
    """What Ctrl-C does: SIGINT to the main thread, which raises KeyboardInterrupt there."""
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)


def _slots(store: Path) -> list[float]:
    """Each held slot's ``frees_at`` minus the store's clock now, in seconds."""
    now = open_store(store).now()
    with contextlib.closing(sqlite3.connect(store)) as conn:
        return [at - now for (at,) in conn.execute("SELECT frees_at FROM slots")]


@pytest.fixture
def hanging_server() -> Iterator[HangingServer]:
    server = HangingServer()
    yield server
    server.stop()


def test_ctrl_c_on_the_wire_cancels_the_request_and_releases_its_slot(
    hanging_server: HangingServer, tmp_path: Path
) -> None:
    assert threading.current_thread() is threading.main_thread()
    store = tmp_path / "limits.sqlite3"
    before = len(_portal_threads())
    client = sync.LexerClient(
        TOKEN_A,
        api_url=hanging_server.url,
        status_url=hanging_server.url,
        limit_store=store,
        window=3600,
        retry=RetryPolicy(max_retries=0),
    )
    with client:
        with pytest.raises(KeyboardInterrupt):
            client.users()
        # Before any close: the request was cancelled on the loop, its connection closed...
        assert hanging_server.closed.wait(10)
        (held,) = _slots(store)
        # ... and its slot released: it frees a window after the release (a slot never
        # released would free a lease timeout later than that).
        assert held <= 3600
    assert len(_portal_threads()) == before  # no thread, no loop left


def test_ctrl_c_while_waiting_for_a_slot_takes_no_slot(
    sandbox_in_thread: SandboxInThread, tmp_path: Path
) -> None:
    sb = sandbox_in_thread()
    store = tmp_path / "limits.sqlite3"
    waits: list[RateLimitWait] = []

    def on_event(event: object) -> None:
        if isinstance(event, RateLimitWait):
            waits.append(event)
            interrupt_main_thread()

    before = len(_portal_threads())
    client = _client(sb, limit_store=store, max_requests=1, window=3600, on_event=on_event)
    with client:
        client.users()
        with pytest.raises(KeyboardInterrupt):
            client.groups()  # waits for the one slot, a window away
        assert len(waits) == 1
        assert client.stats.requests == 1  # the cancelled wait was granted nothing
    assert len(_slots(store)) == 1  # the first request's slot only
    assert sb.stats.requests[Sandbox.key(TOKEN_A)] == 1
    assert len(_portal_threads()) == before


async def test_a_sync_and_an_async_client_share_a_tokens_limit_store(
    sandbox_in_thread: SandboxInThread, tmp_path: Path
) -> None:
    """Different loops, one limit: through the same local store, the async client waits
    for the slots the sync client took."""
    sb = sandbox_in_thread()
    store = tmp_path / "limits.sqlite3"
    waits: list[RateLimitWait] = []
    with anyio.CancelScope() as scope:

        def on_event(event: object) -> None:
            if isinstance(event, RateLimitWait):
                waits.append(event)
                scope.cancel()  # seen waiting: stop here rather than wait a window

        limits: dict[str, Any] = {"limit_store": store, "max_requests": 3, "window": 3600}
        with _client(sb, **limits) as blocking:
            blocking.users()
            blocking.groups()
            async with AsyncLexerClient(
                TOKEN_A, api_url=sb.api_url, on_event=on_event, **limits
            ) as client:
                await client.forms()  # the third slot
                await client.users()  # a fourth: waits for the sync client's first slot
    assert scope.cancelled_caught
    assert len(waits) == 1
    assert waits[0].seconds > 3000
    assert sb.stats.requests[Sandbox.key(TOKEN_A)] == 3
    assert len(_slots(store)) == 3


def test_ctrl_c_during_an_export_download_leaves_no_file(
    sandbox_in_thread: SandboxInThread, tmp_path: Path
) -> None:
    sb = sandbox_in_thread(export_size_bytes=4 << 20)
    progress: list[DownloadProgress] = []

    def on_event(event: object) -> None:
        if isinstance(event, DownloadProgress) and not progress:
            progress.append(event)
            interrupt_main_thread()  # with the first bytes of the file received

    dest = tmp_path / "cases.csv"
    with _client(sb, on_event=on_event) as client, pytest.raises(KeyboardInterrupt):
        client.export("case_details", JAN, FEB, dest, poll=POLL)
    assert progress
    assert progress[0].received < 4 << 20
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part
