"""The plan: a spec cut into windows and units (token x window x report or export), and
the least time the rate limit allows for them (the floor)."""

from __future__ import annotations

import functools
import math
from datetime import datetime
from pathlib import Path

import attrs

from ..reports import split_range, window_stamp
from .spec import BackfillSpec

__all__ = ["Unit", "Plan", "plan", "rate_limit_floor", "EXPORT_POLLS_ESTIMATE"]

EXPORT_POLLS_ESTIMATE = 2
"""Status polls assumed per export job when estimating requests for ``--dry-run``."""


@attrs.frozen
class Unit:
    """One token x window x report-or-export."""

    label: str
    name: str
    is_export: bool
    date_from: datetime
    date_to: datetime

    @functools.cached_property
    def stamp(self) -> str:
        return window_stamp(self.date_from, self.date_to)

    @functools.cached_property
    def id(self) -> str:
        return f"{self.label}/{'exports' if self.is_export else 'reports'}/{self.name}/{self.stamp}"

    def path(self, output: Path) -> Path:
        suffix = ".csv" if self.is_export else ".json"
        return output / (self.id + suffix)


@attrs.frozen
class Plan:
    """The units of a spec, and what they cost in requests and rate-limit time."""

    spec: BackfillSpec
    units: tuple[Unit, ...]
    windows: tuple[tuple[datetime, datetime], ...]

    @functools.cached_property
    def _by_label(self) -> dict[str, list[Unit]]:
        # Built once: scanning every unit per token is quadratic (200 tokens: ~2 s).
        groups: dict[str, list[Unit]] = {}
        for unit in self.units:
            groups.setdefault(unit.label, []).append(unit)
        return groups

    def units_of(self, label: str) -> list[Unit]:
        return list(self._by_label.get(label, ()))

    def requests_of(self, label: str) -> int:
        """Estimated requests: one per report, 1 + `EXPORT_POLLS_ESTIMATE` per export."""
        return sum(1 + EXPORT_POLLS_ESTIMATE if u.is_export else 1 for u in self.units_of(label))

    def least_seconds(self, label: str) -> float:
        """The least time the rate limit allows for the token's requests: N go at once,
        then each further N wait a window (ignoring latency)."""
        return rate_limit_floor(self.requests_of(label), self.spec.max_requests, self.spec.window)


def rate_limit_floor(requests: int, max_requests: int, window: float) -> float:
    """Least seconds for ``requests`` under N per W: ``(ceil(R/N) - 1) * W``."""
    return max(0, math.ceil(requests / max_requests) - 1) * window


def plan(spec: BackfillSpec) -> Plan:
    """Cut ``spec`` into windows and units, token by token in the spec's order."""
    windows = tuple(split_range(spec.date_from, spec.date_to, months=spec.window_months))
    units = []
    for source in spec.tokens:
        for lo, hi in windows:
            for name in spec.reports:
                units.append(Unit(source.label, name, False, lo, hi))
            for item in spec.exports:
                units.append(Unit(source.label, item.kind.value, True, lo, hi))
    return Plan(spec, tuple(units), windows)
