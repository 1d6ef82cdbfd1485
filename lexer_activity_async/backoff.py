"""The one backoff formula: exponential growth to a cap, optionally jittered (pure).

Retries (`RetryPolicy.backoff`), export status polls (`PollPolicy.delay`) and download
resumptions all wait by it, so the three cannot drift apart.
"""

from __future__ import annotations

import random

__all__ = ["exponential"]


def exponential(
    step: int,
    *,
    base: float,
    cap: float,
    factor: float = 2.0,
    jitter_low: float = 1.0,
    rng: random.Random | None = None,
) -> float:
    """``min(base * factor**step, cap) * uniform(jitter_low, 1)`` seconds (``step`` from 0).

    ``jitter_low=1`` means no jitter (and draws nothing from ``rng``). A step so large that
    the growth overflows a float waits ``cap``."""
    draw = 1.0 if jitter_low == 1.0 else (rng or random).uniform(jitter_low, 1.0)
    try:
        grown = base * factor ** max(step, 0)
    except OverflowError:
        grown = cap
    return float(min(grown, cap) * draw)
