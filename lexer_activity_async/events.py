"""Progress events the client emits, for a progress display or a structured log.

Hooks are plain callables taking one event; they run inline and must not block.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import attrs

__all__ = [
    "Event",
    "EventHook",
    "RateLimitWait",
    "RateLimited",
    "RequestSent",
    "Retrying",
    "ExportState",
    "DownloadProgress",
]


@attrs.frozen
class RateLimitWait:
    """A request of token ``label`` is expected to wait on the rate limit for ``seconds``,
    until ``until`` (wall clock): a display counts down from it, and counts the time as
    waited only as it passes."""

    label: str
    seconds: float
    until: datetime


@attrs.frozen
class RequestSent:
    """A request of token ``label`` took a rate-limit slot and is going out: one request
    of the token's budget is spent (whatever its answer)."""

    label: str


@attrs.frozen
class RateLimited:
    """The server answered 429 for token ``label``; its window is treated as full."""

    label: str
    retry_after: float | None


@attrs.frozen
class Retrying:
    """A call failed with ``error`` (a class name) and is retried after ``delay`` seconds."""

    label: str
    attempt: int
    delay: float
    error: str


@attrs.frozen
class ExportState:
    """An export job of token ``label`` changed state (``pending``, ``complete``, ...)."""

    label: str
    kind: str
    report_token: str
    status: str


@attrs.frozen
class DownloadProgress:
    """``received`` of ``total`` bytes (None when unknown) of an export file are on disk."""

    label: str
    kind: str
    received: int
    total: int | None


Event = RateLimitWait | RequestSent | RateLimited | Retrying | ExportState | DownloadProgress
EventHook = Callable[[Event], None]
