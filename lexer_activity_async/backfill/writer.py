"""The report writer: each report staged by the run's sink (`sinks`), then written in
batches and checkpointed in one transaction (group commit)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import anyio
import attrs

from ..checkpoint import CheckpointStore
from ..kinds import ReportResult
from ..reports import ReportType
from ..sinks import ReportSink, Slot, Staged
from ..sinks.files import output_error
from .plan import Unit
from .spec import BackfillSpec

__all__ = [
    "ReportWriter",
    "PendingUnit",
    "output_error",
    "report_kind",
    "report_kinds",
    "report_slot",
]


def report_kind(spec: BackfillSpec, name: str) -> ReportType:
    """The kind of the spec's report ``name`` (workflow states may be renamed)."""
    return ReportType.WORKFLOW_STATES if name == spec.workflow_states_type else ReportType(name)


def report_kinds(spec: BackfillSpec) -> list[ReportType]:
    """The kinds of the spec's reports, in its order."""
    return [report_kind(spec, name) for name in spec.reports]


def report_slot(spec: BackfillSpec, unit: Unit) -> Slot:
    """Where a report unit's data goes, in any sink."""
    kind = report_kind(spec, unit.name)
    form = spec.nps_form if kind.needs_form else None
    return Slot(unit.label, unit.name, kind, unit.date_from, unit.date_to, unit.stamp, form)


@attrs.define(eq=False)
class _Pending:
    unit_id: str
    staged: Staged
    final: bool = True
    committed: bool = False
    error: Exception | None = None


PendingUnit = _Pending
"""A unit staged by `ReportWriter.stage`, for `ReportWriter.commit`."""


class ReportWriter:
    """Writes reports through ``sink`` with group commit.

    Each unit is staged on the event loop (JSON: a part file, a page-cache write).
    Then one worker-thread call per batch has the sink make the batch durable (files:
    fsync, rename, folder fsync; duckdb: one transaction per window) and marks the
    units done in one checkpoint transaction. A thread hop per unit cost about 1 ms of
    CPU, more than the request itself. A unit is done only once its data is durable. A
    unit that cannot be written fails alone (an `OutputError`, nothing of it left); a
    checkpoint that cannot be written fails the whole batch with `CheckpointError`.
    Only a crash can leave a part file, which the rerun of that unit overwrites.
    """

    def __init__(
        self,
        checkpoint: CheckpointStore,
        sink: ReportSink,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._checkpoint = checkpoint
        self._sink = sink
        self._now = now
        self._pending: list[_Pending] = []
        self._lock = anyio.Lock()
        self._waiting = 0

    @property
    def backlog(self) -> int:
        """Units staged and waiting for their batch to be durable (in `commit`)."""
        return self._waiting

    @property
    def needs_body(self) -> bool:
        """Whether `stage` needs each response's body (the raw format)."""
        return self._sink.needs_body

    def stage(
        self,
        unit_id: str,
        slot: Slot,
        result: ReportResult,
        body: bytes | None,
        *,
        final: bool = True,
    ) -> _Pending:
        """Stage ``result`` with the sink; `commit` then writes it, recorded final or
        provisional. File sinks keep nothing of it: units waiting for their batch hold
        no data."""
        return _Pending(unit_id, self._sink.stage(slot, result, body), final)

    async def commit(self, entry: _Pending) -> int:
        """Wait until the batch holding ``entry`` is durable and checkpointed; its size.
        Cancelled before that, the entry leaves its batch and the sink drops it."""
        (outcome,) = await self.commit_all((entry,))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def commit_all(self, entries: Sequence[_Pending]) -> list[int | Exception]:
        """`commit` for several entries in one wait (a joined fetch's windows): each
        one's size, or the error it alone met (an `OutputError`; a `CheckpointError` is
        every entry's). One task for all of them, not one each: a token's windows
        waiting for their batch hold no task frames."""
        self._pending.extend(entries)
        self._waiting += len(entries)
        try:
            async with self._lock:  # batches run one at a time; later arrivals form the next
                if any(not entry.committed and entry.error is None for entry in entries):
                    batch, self._pending = self._pending, []
                    try:
                        await anyio.to_thread.run_sync(self._commit, batch)
                    except Exception as error:  # the checkpoint could not be written
                        for other in batch:
                            if not other.committed and other.error is None:
                                other.error = error
                                self._sink.discard(other.staged)
        except BaseException:
            for entry in entries:
                if not entry.committed:
                    if entry in self._pending:
                        self._pending.remove(entry)
                    self._sink.discard(entry.staged)
            raise
        finally:
            self._waiting -= len(entries)
        return [entry.error if entry.error is not None else entry.staged.size for entry in entries]

    def _commit(self, batch: list[_Pending]) -> None:
        errors = self._sink.write([entry.staged for entry in batch])
        for entry, error in zip(batch, errors, strict=True):
            entry.error = error
        written = [e for e in batch if e.error is None]
        self._checkpoint.mark_done_many(
            [(e.unit_id, e.staged.size) for e in written],
            final=[e.final for e in written],
            fetched_at=self._now().timestamp() if self._now is not None else None,
        )
        for entry in batch:
            entry.committed = True
