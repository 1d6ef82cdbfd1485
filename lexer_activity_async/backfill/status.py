"""Where a backfill stands, read from its checkpoint and its files without a request:
per token, how many units are final, provisional, failed and pending."""

from __future__ import annotations

from datetime import datetime

import attrs

from ..checkpoint import DONE, FAILED, Checkpoint, UnitRecord
from ..sinks import ReportSink, make_sink
from .plan import Plan, Unit, plan
from .runner import CHECKPOINT_NAME, is_final, unit_present
from .spec import BackfillSpec

__all__ = ["TokenStatus", "backfill_status"]


@attrs.frozen
class TokenStatus:
    """One token's units by state. ``provisional`` units are refetched by every run;
    ``next_final`` is the earliest time after which a run makes one of them final."""

    label: str
    final: int = 0
    provisional: int = 0
    failed: int = 0
    pending: int = 0
    next_final: datetime | None = None


def _state(the_plan: Plan, sink: ReportSink, unit: Unit, record: UnitRecord | None) -> str:
    if record is None or record.state not in (DONE, FAILED):
        return "pending"  # never fetched, or stopped while its export job ran
    if record.state == FAILED:
        return "failed"
    if not unit_present(the_plan.spec, sink, unit, record):
        return "pending"  # the next run fetches it again
    return "final" if is_final(the_plan, unit, record) else "provisional"


def backfill_status(spec: BackfillSpec, *, now: datetime | None = None) -> list[TokenStatus]:
    """Each token's `TokenStatus` at ``now``, from the checkpoint in the spec's output
    folder (none yet: every unit pending). Sends no request and creates no file."""
    the_plan = plan(spec, now=now)
    path = spec.output / CHECKPOINT_NAME
    records: dict[str, UnitRecord] = {}
    if path.exists():
        with Checkpoint(path) as checkpoint:
            records = checkpoint.records()
    sink = make_sink(spec.format, spec.output)  # not opened: it only looks for files
    result = []
    for source in spec.tokens:
        counts = {"final": 0, "provisional": 0, "failed": 0, "pending": 0}
        settles: list[datetime] = []
        for unit in the_plan.units_of(source.label):
            state = _state(the_plan, sink, unit, records.get(unit.id))
            counts[state] += 1
            if state == "provisional":
                settles.append(the_plan.settles_at(unit))
        result.append(TokenStatus(source.label, **counts, next_final=min(settles, default=None)))
    return result
