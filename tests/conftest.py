"""Shared fixtures: an in-process sandbox and clients pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from lexer_activity_async import LexerClient, LimiterRegistry
from lexer_activity_async.sandbox import Sandbox

TOKEN_A = "sandbox-token-a-0123456789"
TOKEN_B = "sandbox-token-b-9876543210"
NOW = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
"""A fixed "now" shared by the sandbox and clients, so date rules are deterministic."""


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """A sandbox with two valid tokens, a generous limit and quick export jobs."""
    async with Sandbox(
        tokens=frozenset({TOKEN_A, TOKEN_B}),
        max_requests=10_000,
        window=300.0,
        export_pending_seconds=0.05,
        now=lambda: NOW,
    ) as sb:
        yield sb


@pytest.fixture
def registry() -> LimiterRegistry:
    """A fresh limiter registry per test, so limits never leak between tests."""
    return LimiterRegistry()


@pytest.fixture
def make_client(
    sandbox: Sandbox, registry: LimiterRegistry
) -> Callable[..., LexerClient]:
    """Build clients for the sandbox: ``make_client(token=TOKEN_A, **options)``."""

    def make(token: str = TOKEN_A, **options: Any) -> LexerClient:
        options.setdefault("api_url", sandbox.api_url)
        options.setdefault("status_url", sandbox.status_url)
        options.setdefault("registry", registry)
        options.setdefault("max_requests", sandbox.config.max_requests)
        options.setdefault("window", sandbox.config.window)
        options.setdefault("now", lambda: NOW)
        return LexerClient(token, **options)

    return make
