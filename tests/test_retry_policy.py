"""`retry`: the backoff bounds and which errors may be retried (pure policy, no I/O)."""

from __future__ import annotations

import random

import pytest

from lexer_activity_async import exceptions as exc
from lexer_activity_async.retry import RetryPolicy, is_retryable


def expected_bounds(attempt: int, base: float = 0.5, cap: float = 30.0) -> tuple[float, float]:
    """``min(base * 2**(n-1), cap) * [0.75, 1]``, computed independently of the policy."""
    ceiling = cap
    if attempt - 1 < 64:
        ceiling = min(base * (1 << (attempt - 1)), cap)
    return 0.75 * ceiling, ceiling


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6, 7, 8, 10, 20, 64, 1100, 10_000])
def test_backoff_bounds(attempt: int) -> None:
    low, high = expected_bounds(attempt)
    rng = random.Random(1234)
    draws = [RetryPolicy().backoff(attempt, rng) for _ in range(500)]
    assert all(low <= d <= high for d in draws)
    assert max(draws) - min(draws) > 0.5 * (high - low)  # jittered over the range


def test_backoff_first_values() -> None:
    # attempt 1: [0.375, 0.5]; 2: [0.75, 1]; 3: [1.5, 2]; 7: [24, 32] capped to [22.5, 30]
    rng = random.Random(0)
    for attempt, (low, high) in {
        1: (0.375, 0.5),
        2: (0.75, 1.0),
        3: (1.5, 2.0),
        6: (12.0, 16.0),
        7: (22.5, 30.0),
        50: (22.5, 30.0),
    }.items():
        delay = RetryPolicy().backoff(attempt, rng)
        assert low <= delay <= high, (attempt, delay)
        assert type(delay) is float


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy()
    first = [policy.backoff(n, random.Random(42)) for n in range(1, 9)]
    again = [policy.backoff(n, random.Random(42)) for n in range(1, 9)]
    assert first == again
    # the same draw scales with the exponential step until the cap
    assert first[1] == pytest.approx(2 * first[0])
    assert first[2] == pytest.approx(4 * first[0])


def test_backoff_uses_the_draw_as_the_jitter_factor() -> None:
    draw = random.Random(7).uniform(0.75, 1.0)
    assert RetryPolicy().backoff(3, random.Random(7)) == pytest.approx(2.0 * draw)
    assert RetryPolicy().backoff(30, random.Random(7)) == pytest.approx(30.0 * draw)


def test_backoff_custom_parameters() -> None:
    policy = RetryPolicy(base=1.0, cap=5.0, jitter_low=0.5)
    rng = random.Random(3)
    assert all(0.5 <= policy.backoff(1, rng) <= 1.0 for _ in range(100))
    assert all(2.5 <= policy.backoff(4, rng) <= 5.0 for _ in range(100))  # 8 capped to 5
    no_jitter = RetryPolicy(jitter_low=1.0)
    assert no_jitter.backoff(4, random.Random(9)) == 4.0


def test_backoff_without_rng_uses_module_random() -> None:
    assert 0.375 <= RetryPolicy().backoff(1) <= 0.5


def test_policy_defaults_and_validation() -> None:
    policy = RetryPolicy()
    assert (policy.max_retries, policy.deadline, policy.base, policy.cap) == (3, None, 0.5, 30.0)
    assert policy.jitter_low == 0.75
    with pytest.raises(ValueError):  # noqa: PT011 - attrs' validator
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError):  # noqa: PT011
        RetryPolicy(max_rate_limited=-1)


# -- is_retryable ---------------------------------------------------------------------------

RETRYABLE = [
    exc.ServerError("Internal Server Error", status=500),
    exc.ServerError("Bad Gateway", status=502),
    exc.ServerError("Service Unavailable", status=503),
    exc.RequestTimeoutError("Request Timeout", status=408),
    exc.LexerConnectionError("reset by peer", request_sent=True),
    exc.LexerConnectionError("refused", request_sent=False),
    exc.LexerTimeoutError("no answer within 60s"),
]

NOT_RETRYABLE = [
    exc.BadRequestError("Invalid report - something", status=400),
    exc.DateRangeTooLongError("Invalid report - date range is too long", status=400),
    exc.FutureStartDateError("Invalid report - starting date is a future date", status=400),
    exc.InvalidReportTypeError("Invalid report - invalid type", status=400),
    exc.TokenMismatchError("Unauthorized - api token not matching", status=401),
    exc.MissingTokenError("Unauthorized", status=401),
    exc.NotFoundError("Not found", status=404),
    exc.RateLimitedError("Rate limited exceeded"),  # handled through the limiter instead
    exc.UnexpectedResponseError("undocumented status 418", status=418),
    exc.ValidationError("bad input"),
    exc.ConfigurationError("no token"),
    ValueError("not ours"),
]


@pytest.mark.parametrize("error", RETRYABLE, ids=repr)
def test_retryable_errors(error: BaseException) -> None:
    assert is_retryable(error) is True
    assert is_retryable(error, idempotent=True) is True


@pytest.mark.parametrize("error", NOT_RETRYABLE, ids=repr)
def test_non_retryable_errors(error: BaseException) -> None:
    assert is_retryable(error) is False
    assert is_retryable(error, idempotent=False) is False


@pytest.mark.parametrize(
    "error",
    [e for e in RETRYABLE if not (isinstance(e, exc.LexerConnectionError) and not e.request_sent)],
    ids=repr,
)
def test_non_idempotent_requests_are_not_retried_once_possibly_sent(error: BaseException) -> None:
    assert is_retryable(error, idempotent=False) is False


def test_non_idempotent_request_retried_when_it_never_left() -> None:
    never_sent = exc.LexerConnectionError("cannot connect", request_sent=False)
    maybe_sent = exc.LexerConnectionError("connection dropped", request_sent=True)
    assert is_retryable(never_sent, idempotent=False) is True
    assert is_retryable(maybe_sent, idempotent=False) is False
    # a connection error is presumed sent unless said otherwise
    assert exc.LexerConnectionError("dropped").request_sent is True
    assert is_retryable(exc.LexerConnectionError("dropped"), idempotent=False) is False
