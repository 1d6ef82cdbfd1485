"""When to retry a failed call, and how long to back off first (pure policy, no I/O)."""

from __future__ import annotations

import math
import random

import attrs

from . import exceptions as exc
from .backoff import exponential

__all__ = ["RetryPolicy", "is_retryable"]


@attrs.frozen
class RetryPolicy:
    """Retries for 5xx, 408, connection errors and timeouts, with jittered exponential
    backoff: ``min(base * 2**(n-1), cap) * uniform(jitter_low, 1)`` before retry ``n``.

    ``deadline`` bounds a whole call (limiter waits, attempts and backoffs) in seconds;
    None means no overall bound (a backfill may queue behind the rate limit for hours).
    429s are retried after the limiter's penalty, up to ``max_rate_limited`` times, and
    do not use up ``max_retries``.

    ``max_retry_after`` bounds the pause a 429's ``Retry-After`` may impose on the token, in
    seconds; None (the default) means the client's rate-limit window. A longer value is
    cut to it; an unusable one (garbage, negative, absurdly long) counts as absent, which
    pauses the token for one window.
    """

    max_retries: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    deadline: float | None = None
    base: float = 0.5
    cap: float = 30.0
    jitter_low: float = 0.75
    max_rate_limited: int = attrs.field(default=10, validator=attrs.validators.ge(0))
    max_retry_after: float | None = attrs.field(default=None)

    @max_retry_after.validator
    def _check_max_retry_after(self, _: object, value: float | None) -> None:
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value < math.inf):
            raise exc.ConfigurationError("max_retry_after must be a finite number >= 0, or None")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return exponential(
            attempt - 1, base=self.base, cap=self.cap, jitter_low=self.jitter_low, rng=rng
        )


def is_retryable(error: BaseException, *, idempotent: bool = True) -> bool:
    """Whether ``error`` may be retried (429s are handled apart, through the limiter).

    A request that is not idempotent (an export-start POST: the job may already exist)
    is retried only when it provably never reached the server: the connection could not
    be made.
    """
    if isinstance(error, exc.TLSError) or (
        isinstance(error, exc.ProxyError) and error.status == 407
    ):
        return False  # the same settings would fail the same way
    if isinstance(error, exc.LexerConnectionError) and not error.request_sent:
        return True
    if not idempotent:
        return False
    return isinstance(
        error,
        (exc.ServerError, exc.RequestTimeoutError, exc.LexerConnectionError, exc.LexerTimeoutError),
    )
