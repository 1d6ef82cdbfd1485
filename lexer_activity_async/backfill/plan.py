"""The plan: a spec's range resolved against "now", cut into windows and units (token x
window x report or export), which windows are provisional, and the least time the rate
limit allows for them (the floor)."""

from __future__ import annotations

import functools
import math
from datetime import datetime, timezone
from pathlib import Path

import attrs

from ..reports import add_months, format_datetime, split_range, window_stamp
from .spec import BackfillSpec, SpecError, check_spans

__all__ = ["Unit", "Plan", "plan", "rate_limit_floor", "EXPORT_POLLS_ESTIMATE"]

EXPORT_POLLS_ESTIMATE = 2
"""Status polls assumed per export job when estimating requests for ``--dry-run``."""


@attrs.frozen
class Unit:
    """One token x window x report-or-export. ``until`` is set when the window reaches
    past now: the request ends there, while the window (and so the file) keeps its
    full span, the same from run to run. ``export_format`` is the spec's: an export unit's
    file is its CSV, or Parquet converted from it."""

    label: str
    name: str
    is_export: bool
    date_from: datetime
    date_to: datetime
    until: datetime | None = attrs.field(default=None, eq=False)
    export_format: str = attrs.field(default="csv", eq=False)

    @functools.cached_property
    def stamp(self) -> str:
        return window_stamp(self.date_from, self.date_to)

    @functools.cached_property
    def id(self) -> str:
        return f"{self.label}/{'exports' if self.is_export else 'reports'}/{self.name}/{self.stamp}"

    @property
    def fetch_to(self) -> datetime:
        """Where the request for this unit ends: the window's end, or now."""
        return self.until or self.date_to

    def path(self, output: Path) -> Path:
        """The unit's file, the one the checkpoint records."""
        if not self.is_export:
            return output / (self.id + ".json")
        return output / (self.id + (".parquet" if self.export_format == "parquet" else ".csv"))

    def csv_path(self, output: Path) -> Path:
        """Where an export unit's CSV is downloaded (its file, unless Parquet)."""
        return output / (self.id + ".csv")


@attrs.frozen
class Plan:
    """The units of a spec at ``now``, and what they cost in requests and rate-limit
    time. ``notices`` say what the planner changed (a future ``date_to`` clipped)."""

    spec: BackfillSpec
    units: tuple[Unit, ...]
    windows: tuple[tuple[datetime, datetime], ...]
    now: datetime = attrs.field(factory=lambda: datetime.now(timezone.utc))
    notices: tuple[str, ...] = ()

    @functools.cached_property
    def _by_label(self) -> dict[str, list[Unit]]:
        # Built once: scanning every unit per token is quadratic (200 tokens: ~2 s).
        groups: dict[str, list[Unit]] = {}
        for unit in self.units:
            groups.setdefault(unit.label, []).append(unit)
        return groups

    def units_of(self, label: str) -> list[Unit]:
        return list(self._by_label.get(label, ()))

    def is_provisional(self, unit: Unit) -> bool:
        """Whether ``unit``'s data may still change: its window ends after now - settle."""
        return unit.date_to > self.now - self.spec.settle_period

    def settles_at(self, unit: Unit) -> datetime:
        """When ``unit`` stops being provisional: the first run after this makes it final."""
        return unit.date_to + self.spec.settle_period

    def in_lookback(self, unit: Unit) -> bool:
        """Whether ``unit``'s window ended within the spec's ``lookback`` before now."""
        return bool(self.spec.lookback) and unit.date_to > self.now - self.spec.lookback

    def requests_of(self, label: str) -> int:
        """Estimated requests: one per report, 1 + `EXPORT_POLLS_ESTIMATE` per export."""
        return sum(1 + EXPORT_POLLS_ESTIMATE if u.is_export else 1 for u in self.units_of(label))

    def least_seconds(self, label: str) -> float:
        """The least time the rate limit allows for the token's requests: N (less the
        reserve: a backfill is bulk work) go at once, then each further N wait a window
        (ignoring latency)."""
        n = self.spec.bulk_max_requests
        return rate_limit_floor(self.requests_of(label), n, self.spec.window)


def rate_limit_floor(requests: int, max_requests: int, window: float) -> float:
    """Least seconds for ``requests`` under N per W: ``(ceil(R/N) - 1) * W``."""
    return max(0, math.ceil(requests / max_requests) - 1) * window


def grid_start(moment: datetime, months: int) -> datetime:
    """The start of the ``months``-long window holding ``moment`` on the UTC calendar
    grid (months counted from January of year 1): a relative ``date_from`` rounded down
    so that the windows stay the same from run to run."""
    utc = moment.astimezone(timezone.utc)
    index = (utc.year * 12 + utc.month - 1) // months * months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=timezone.utc)


def _windows(
    start: datetime, end: datetime | None, now: datetime, months: int
) -> list[tuple[datetime, datetime]]:
    """Windows from ``start`` on its grid up to ``end`` (None: open), none starting at or
    after ``now``; the last may reach past now."""
    windows = []
    lo, step = start, 1
    while lo < now and (end is None or lo < end):
        hi = add_months(start, months * step)
        windows.append((lo, hi if end is None else min(hi, end)))
        lo, step = hi, step + 1
    return windows


def plan(spec: BackfillSpec, *, now: datetime | None = None) -> Plan:
    """Cut ``spec`` into windows and units at ``now`` (default: the clock), token by
    token in the spec's order. `SpecError` if the resolved range is empty or shorter
    than the spec's ``settle`` or ``lookback``."""
    now = now or datetime.now(timezone.utc)
    start = spec.date_from
    if not isinstance(start, datetime):
        start = grid_start(now + start, spec.window_months)
    notices: list[str] = []
    if spec.date_to is not None and spec.date_to <= now:
        if start >= spec.date_to:
            raise SpecError(
                f"date_from must be before date_to (date_from is {format_datetime(start)} "
                f"in this run, date_to {format_datetime(spec.date_to)})"
            )
        windows = split_range(start, spec.date_to, months=spec.window_months)
        end = spec.date_to
    else:
        if spec.date_to is not None:
            notices.append(
                f"date_to {format_datetime(spec.date_to)} is in the future: clipped to now "
                f"({format_datetime(now)}); the window holding now is provisional"
            )
        if start >= now:
            raise SpecError(
                f"date_from {format_datetime(start)} is in the future: nothing to fetch yet"
            )
        windows = _windows(start, spec.date_to, now, spec.window_months)
        end = now
    check_spans(spec, end - start)
    units = []
    for source in spec.tokens:
        for lo, hi in windows:
            until = now if hi > now else None
            for name in spec.reports:
                units.append(Unit(source.label, name, False, lo, hi, until))
            for item in spec.exports:
                units.append(
                    Unit(source.label, item.kind.value, True, lo, hi, until, spec.export_format)
                )
    return Plan(spec, tuple(units), tuple(windows), now, tuple(notices))
