"""Series reports sliced into windows: which report kinds can be fetched once for several
adjacent windows, and the slice of such a fetch that is one window's result.

A series report (states_volume, response_volume, case_volume, nps_volume) answers one
point per period (a day, or an hour for short ranges) from the period holding its
``date_from`` to the one holding its ``date_to``, each point computed over its part of
the range. So a fetch of adjacent windows holds, for each window, the points a fetch of
that window alone would hold, provided the boundary between them starts a period (local
midnight in the request's offset) and both fetches are daily.

The API reads ``date_to`` inclusively (the reference's example ends at ``23:59:59``), and a
window ``[from, to)`` is fetched with ``date_to = to``: the answer also holds a point for
the one second of the period that starts at ``to``, which the next window's file holds in
full. `slice_series` keeps the points that start inside the window, the same whether the
result came from the window's own fetch or from a longer one.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any, TypeVar

from .. import models as m
from ..reports import hourly_response_volume, hourly_states_volume, range_too_long

__all__ = [
    "SERIES_REPORTS",
    "slice_series",
    "Slicer",
    "is_daily",
    "starts_period",
    "can_join",
]

SERIES_REPORTS = frozenset({"states_volume", "response_volume", "case_volume", "nps_volume"})
"""Report kinds whose result is a series of periods, and so can be sliced."""

_DAY = timedelta(days=1)
P = TypeVar("P", m.StatePoint, m.ValuePoint, m.NpsDay)


def is_daily(name: str, date_from: datetime, date_to: datetime) -> bool:
    """Whether a request of series report ``name`` over the range is answered by day."""
    if name == "states_volume":
        return not hourly_states_volume(date_from, date_to)
    if name == "response_volume":
        return not hourly_response_volume(date_from, date_to)
    return name in SERIES_REPORTS


def starts_period(moment: datetime, zone_of: datetime) -> bool:
    """Whether ``moment`` is a local midnight in ``zone_of``'s offset (a day's start)."""
    assert zone_of.tzinfo is not None
    local = moment.astimezone(zone_of.tzinfo)
    return local == local.replace(hour=0, minute=0, second=0, microsecond=0)


def can_join(name: str, first: datetime, boundary: datetime, fetch_to: datetime) -> bool:
    """Whether a window starting at ``boundary`` (ending its request at ``fetch_to``) can be
    fetched in one request with the windows before it, which start at ``first``: a series
    kind, daily on its own and joined, the boundary a period start, at most 12 months."""
    return (
        name in SERIES_REPORTS
        and is_daily(name, boundary, fetch_to)
        and starts_period(boundary, first)
        and not range_too_long(first, fetch_to)
    )


def _start(point: m.StatePoint | m.ValuePoint | m.NpsDay) -> datetime:
    return point.date if isinstance(point, m.NpsDay) else point.date_from


_Index = Callable[[Sequence[Any]], "list[datetime] | None"]


def _cut(
    points: tuple[P, ...] | list[P], lo: datetime, hi: datetime, index: _Index | None = None
) -> tuple[P, ...]:
    """The points whose period starts before ``hi`` and holds ``lo`` or starts after it
    (a period is at most a day long). ``index``: the points' starts when in order, found
    once for many windows (then bisected), or None."""
    earliest = lo - _DAY
    starts = index(points) if index is not None else None
    if starts is None:
        return tuple(p for p in points if earliest < _start(p) < hi)
    return tuple(points[bisect_right(starts, earliest) : bisect_left(starts, hi)])


def _slice(result: object, date_from: datetime, date_to: datetime, index: _Index | None) -> object:
    if isinstance(result, m.StatesVolume):
        return m.StatesVolume(
            {
                state: _cut(points, date_from, date_to, index)
                for state, points in result.states.items()
            }
        )
    if isinstance(result, m.ResponseVolume):
        return m.ResponseVolume(_cut(result.avg_response_time, date_from, date_to, index))
    if isinstance(result, m.CaseVolume):
        return m.CaseVolume(_cut(result.open, date_from, date_to, index))
    if isinstance(result, list) and result and isinstance(result[0], m.NpsDay):
        return list(_cut(result, date_from, date_to, index))
    return result


def slice_series(result: object, date_from: datetime, date_to: datetime) -> object:
    """The part of series result ``result`` that is window ``[date_from, date_to)``'s: its
    points starting in the window (and the one holding ``date_from``). Any other result is
    returned as it is."""
    return _slice(result, date_from, date_to, None)


class Slicer:
    """`slice_series` of one result for many windows: each series' period starts are
    read once and, when in order (as a server sends them), each window is found by
    bisection rather than a pass over every point."""

    def __init__(self, result: object) -> None:
        self.result = result
        self._starts: dict[int, list[datetime] | None] = {}
        """By ``id`` of a series of ``result`` (alive as long as this is)."""

    def _index(self, points: Sequence[Any]) -> list[datetime] | None:
        key = id(points)
        if key not in self._starts:
            starts = [_start(p) for p in points]
            ordered = all(a <= b for a, b in pairwise(starts))
            self._starts[key] = starts if ordered else None
        return self._starts[key]

    def __call__(self, date_from: datetime, date_to: datetime) -> object:
        """``slice_series(result, date_from, date_to)``."""
        return _slice(self.result, date_from, date_to, self._index)
