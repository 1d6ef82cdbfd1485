"""The table of report kinds: each one's name, result type, whether it needs an NPS
``form``, and its granularity rule. The client types `LexerClient.report` by it, the
wire layer decodes by it, and `ReportType.needs_form` reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Generic, TypeAlias, TypeVar

import attrs

from . import models as m
from .reports import ReportType, hourly_response_volume, hourly_states_volume

__all__ = ["ReportKind", "Reports", "ReportResult", "REPORT_KINDS", "report_kind", "RawReport"]

T = TypeVar("T")

Granularity = Callable[[datetime, datetime], bool]
"""True when a report over ``[date_from, date_to)`` comes in hourly points, else daily."""


@attrs.frozen
class ReportKind(Generic[T]):
    """One report kind: ``await client.report(Reports.SUMMARY, ...)`` is typed ``Summary``.

    ``result`` is what its answer decodes to; ``needs_form``: an NPS report, which takes
    one survey as ``form``; ``hourly``: its granularity rule, for series reports."""

    report_type: ReportType
    result: type[T]
    needs_form: bool = False
    hourly: Granularity | None = None

    @property
    def name(self) -> str:
        """The type name sent on the wire (workflow states: see the client's override)."""
        return self.report_type.value


class Reports:
    """A `ReportKind` per report type, to pass to `LexerClient.report`."""

    SUMMARY: ReportKind[m.Summary] = ReportKind(ReportType.SUMMARY, m.Summary)
    STATES_VOLUME: ReportKind[m.StatesVolume] = ReportKind(
        ReportType.STATES_VOLUME, m.StatesVolume, hourly=hourly_states_volume
    )
    WORKFLOW_STATES: ReportKind[list[m.WorkflowState]] = ReportKind(
        ReportType.WORKFLOW_STATES, list[m.WorkflowState]
    )
    CLASSIFICATIONS: ReportKind[list[m.Classification]] = ReportKind(
        ReportType.CLASSIFICATIONS, list[m.Classification]
    )
    RESPONSE_VOLUME: ReportKind[m.ResponseVolume] = ReportKind(
        ReportType.RESPONSE_VOLUME, m.ResponseVolume, hourly=hourly_response_volume
    )
    USER_SUMMARY: ReportKind[list[m.UserSummary]] = ReportKind(
        ReportType.USER_SUMMARY, list[m.UserSummary]
    )
    USER_VOLUME: ReportKind[list[m.UserVolume]] = ReportKind(
        ReportType.USER_VOLUME, list[m.UserVolume]
    )
    CASE_SUMMARY: ReportKind[m.CaseSummary] = ReportKind(ReportType.CASE_SUMMARY, m.CaseSummary)
    CASE_VOLUME: ReportKind[m.CaseVolume] = ReportKind(ReportType.CASE_VOLUME, m.CaseVolume)
    CASE_CLASSIFICATIONS: ReportKind[list[m.CaseClassification]] = ReportKind(
        ReportType.CASE_CLASSIFICATIONS, list[m.CaseClassification]
    )
    NPS_SUMMARY: ReportKind[m.NpsSummary] = ReportKind(
        ReportType.NPS_SUMMARY, m.NpsSummary, needs_form=True
    )
    NPS_VOLUME: ReportKind[list[m.NpsDay]] = ReportKind(
        ReportType.NPS_VOLUME, list[m.NpsDay], needs_form=True
    )


ReportResult: TypeAlias = (
    m.Summary
    | m.StatesVolume
    | list[m.WorkflowState]
    | list[m.Classification]
    | m.ResponseVolume
    | list[m.UserSummary]
    | list[m.UserVolume]
    | m.CaseSummary
    | m.CaseVolume
    | list[m.CaseClassification]
    | m.NpsSummary
    | list[m.NpsDay]
)
"""What a report given by name (not by `ReportKind`) may decode to."""

REPORT_KINDS: Mapping[ReportType, ReportKind[ReportResult]] = {
    kind.report_type: kind for kind in vars(Reports).values() if isinstance(kind, ReportKind)
}
"""Every kind by its `ReportType`, in the order above."""


def report_kind(report_type: ReportType) -> ReportKind[ReportResult]:
    """The table's row for ``report_type``."""
    return REPORT_KINDS[report_type]


@attrs.frozen
class RawReport(Generic[T]):
    """A report's typed ``result`` and the response ``body`` byte for byte, as the API
    sent it (for audits and raw archives); from `LexerClient.report_raw`."""

    result: T
    body: bytes = attrs.field(repr=lambda body: f"<{len(body)} bytes>")
