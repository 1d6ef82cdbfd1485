"""What a backfill reports as it runs (unit started, unit finished) and when it ends
(the summary)."""

from __future__ import annotations

import attrs

from ..events import Event
from .plan import Unit

__all__ = ["UnitStarted", "UnitFinished", "BackfillEvent", "BackfillSummary"]


@attrs.frozen
class UnitStarted:
    unit: Unit


@attrs.frozen
class UnitFinished:
    """A unit ended: ``state`` is done, failed or skipped; ``size`` in bytes."""

    unit: Unit
    state: str
    size: int = 0
    error: str | None = None


BackfillEvent = UnitStarted | UnitFinished | Event


@attrs.frozen
class BackfillSummary:
    """Per label: units done (of which ``provisional``: written, to be refetched until
    they settle), failed, skipped (already done); and totals."""

    done: dict[str, int]
    failed: dict[str, list[tuple[str, str]]]
    skipped: dict[str, int]
    bytes: int
    requests: int
    rate_limited: int
    retries: int
    files: int
    provisional: dict[str, int] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.failed.values())
