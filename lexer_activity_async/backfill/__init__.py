"""Bulk backfills: a spec (TOML or Python), a planner, and a checkpointed runner.

A backfill pulls reports and exports for many tokens over a long span. The planner cuts
the span into windows (default one calendar month) and makes one *unit* per token x
window x report or export. The runner runs every token in parallel under its own limiter,
writes each unit atomically to ``<output>/<label>/...`` and records it in a checkpoint,
so a rerun after a crash skips finished units and polls in-flight export jobs again.
A unit whose file cannot be written fails alone (`OutputError`); a checkpoint that
cannot be used stops the run (`CheckpointError`).

Adjacent windows of a series report (states_volume, response_volume, case_volume,
nps_volume) are fetched in one request of up to 12 months and sliced into one file per
window, each the same as that window's own fetch would write (`slicing`).

The rooms: `spec` (the spec and its parsing), `plan` (units, windows, the fetches that
serve them, the floor), `slicing` (which series can be joined, and their slices),
`runner` (per-token workers, orchestration), `writer` (group commit through the run's
sink), `events` (unit events and the summary), `status` (where a backfill stands,
without a request), `workqueue` and `worker` (a run shared by workers on many hosts
through PostgreSQL).
Their public names are all importable from here.

Output layout (keyed by label, never the token), reports in the spec's ``format``
(see `sinks`; ``json`` shown)::

    <output>/<label>/reports/<type>/<from>_<to>.json
    <output>/<label>/exports/<kind>/<from>_<to>.csv       (or .parquet: [exports] format)
    <output>/.lexer-checkpoint.sqlite
"""

from __future__ import annotations

from ..checkpoint import CheckpointError
from .events import BackfillEvent, BackfillSummary, UnitFinished, UnitStarted
from .plan import (
    EXPORT_POLLS_ESTIMATE,
    EXPORT_WINDOW_CHOICES,
    ExportWindowCost,
    FetchGroup,
    Plan,
    Unit,
    export_window_costs,
    fetch_groups,
    plan,
    rate_limit_floor,
)
from .runner import CHECKPOINT_NAME, GC_THRESHOLDS, gc_tuned, run_backfill
from .slicing import SERIES_REPORTS, slice_series
from .spec import (
    ALL_REPORTS,
    DEFAULT_SETTLE,
    MAX_NAME_LENGTH,
    BackfillSpec,
    ExportSpec,
    SpecError,
    TokenSource,
    check_name,
    parse_duration,
)
from .status import RunStatus, TokenStatus, backfill_status, run_status
from .worker import DEFAULT_LEASE, run_worker

__all__ = [
    "SpecError",
    "TokenSource",
    "ExportSpec",
    "BackfillSpec",
    "Unit",
    "Plan",
    "plan",
    "rate_limit_floor",
    "EXPORT_POLLS_ESTIMATE",
    "FetchGroup",
    "fetch_groups",
    "ExportWindowCost",
    "EXPORT_WINDOW_CHOICES",
    "export_window_costs",
    "SERIES_REPORTS",
    "slice_series",
    "UnitStarted",
    "UnitFinished",
    "BackfillEvent",
    "BackfillSummary",
    "run_backfill",
    "gc_tuned",
    "GC_THRESHOLDS",
    "CHECKPOINT_NAME",
    "ALL_REPORTS",
    "MAX_NAME_LENGTH",
    "check_name",
    "CheckpointError",
    "TokenStatus",
    "backfill_status",
    "RunStatus",
    "run_status",
    "DEFAULT_SETTLE",
    "parse_duration",
    "run_worker",
    "DEFAULT_LEASE",
]
