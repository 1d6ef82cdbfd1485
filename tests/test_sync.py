"""The blocking twin: same signatures, same typed results, in scripts and inside a
running loop, shared limiter, clean close."""

from __future__ import annotations

import asyncio
import inspect
import threading
from datetime import datetime, timezone
from typing import Any

import pytest
from conftest import TOKEN_A, SandboxInThread

from lexer_activity_async import ClientClosedError, sync
from lexer_activity_async import LexerClient as AsyncLexerClient
from lexer_activity_async import models as m
from lexer_activity_async.exports import PollPolicy

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
