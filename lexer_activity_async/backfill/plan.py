"""The plan: a spec's range resolved against "now", cut into windows and units (token x
window x report or export), which windows are provisional, the fetches that serve them
(adjacent windows of a series report joined into one request), and the least time the
rate limit allows for them (the floor)."""

from __future__ import annotations

import functools
import math
from array import array
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import attrs

from ..reports import add_months, format_datetime, split_range, window_stamp
from .slicing import SERIES_REPORTS, can_join, is_daily
from .spec import BackfillSpec, SpecError, check_spans

__all__ = [
    "Unit",
    "FetchGroup",
    "Fetches",
    "Plan",
    "plan",
    "fetch_groups",
    "window_order",
    "requests_of",
    "rate_limit_floor",
    "EXPORT_POLLS_ESTIMATE",
    "ExportWindowCost",
    "EXPORT_WINDOW_CHOICES",
    "export_window_costs",
]

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

    @property
    def stamp(self) -> str:
        return window_stamp(self.date_from, self.date_to)

    @property
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
class FetchGroup:
    """Adjacent windows of one token's series report, fetched in one request (from the
    first window's start to the last one's `Unit.fetch_to`) and sliced into one file per
    window (see `slicing`)."""

    units: tuple[Unit, ...]

    @property
    def name(self) -> str:
        return self.units[0].name

    @property
    def date_from(self) -> datetime:
        return self.units[0].date_from

    @property
    def fetch_to(self) -> datetime:
        return self.units[-1].fetch_to


def _joins(group: list[Unit], unit: Unit) -> bool:
    last = group[-1]
    return (
        unit.name == last.name
        and not unit.is_export
        and last.until is None  # a window reaching past now ends its group
        and last.date_to == unit.date_from
        and can_join(unit.name, group[0].date_from, unit.date_from, unit.fetch_to)
    )


def fetch_groups(units: Iterable[Unit], *, join: bool = True) -> list[Unit | FetchGroup]:
    """The fetches serving ``units`` (one token's, in plan order): each adjacent run of
    windows of one series report joined into a `FetchGroup` while the joined range stays
    within 12 months and every window is daily on its own, each other unit alone. A
    group sits where its first window's unit was. Only the units given are joined, so a
    window already done never joins a fetch. ``join=False``: every unit alone."""
    items: list[Unit | list[Unit]] = []
    open_groups: dict[str, list[Unit]] = {}
    for unit in units:
        if not join or unit.is_export or unit.name not in SERIES_REPORTS:
            items.append(unit)
            continue
        group = open_groups.get(unit.name)
        if group is not None and _joins(group, unit):
            group.append(unit)
        elif is_daily(unit.name, unit.date_from, unit.fetch_to):
            open_groups[unit.name] = [unit]
            items.append(open_groups[unit.name])
        else:
            open_groups.pop(unit.name, None)
            items.append(unit)
    return [
        item if isinstance(item, Unit) else item[0] if len(item) == 1 else FetchGroup(tuple(item))
        for item in items
    ]


def window_order(fetches: list[Unit | FetchGroup], share: int) -> list[Unit | FetchGroup]:
    """``fetches`` (one token's, in plan order) reordered so that its joined fetches, the
    costly ones (a response of up to 12 months to decode, slice and write per window),
    come at the end of the token's first rate windows, off the chain its run's end waits
    on, where there is room.

    A token's run ends with its last window of ``share`` requests (the bulk slots of a
    rate window), which holds its last ``tail`` requests. Those take the slots freed
    first in the window before, W after the responses of that window's first ``tail``
    requests, which took the slots of the first ``tail`` of the window before that, and
    so on: the first ``tail`` requests of every window and the whole last one are the
    chain. When the client's CPU is the bottleneck (many tokens' windows opening at once),
    a joined fetch in that chain, or served while other tokens' chain requests wait,
    delays the end by its service time; at the end of a window it overlaps the wait for
    the next one. Every other fetch keeps its order; a plan of one window is left as is."""
    total = requests_of(fetches)
    joined = [f for f in fetches if isinstance(f, FetchGroup)]
    if total <= share or not joined:
        return fetches
    windows = math.ceil(total / share)
    tail = total - (windows - 1) * share
    # Where each earlier window's joined fetches begin: as late in it as they fit.
    starts: list[int] = []
    left = len(joined)
    for window in range(windows - 1):
        here = min(left, share - tail)
        starts.append((window + 1) * share - here)
        left -= here
    others = [f for f in fetches if not isinstance(f, FetchGroup)]
    ordered: list[Unit | FetchGroup] = []
    position = joined_at = others_at = 0
    while joined_at < len(joined) or others_at < len(others):
        window = position // share
        off_chain = window < len(starts) and position >= starts[window]
        if others_at == len(others) or (joined_at < len(joined) and off_chain):
            ordered.append(joined[joined_at])
            joined_at += 1
        else:
            ordered.append(others[others_at])
            others_at += 1
        position += requests_of(ordered[-1:])
    return ordered


class Fetches:
    """One token's fetches of a plan, in run order, each kept as one integer: a token's
    units held as objects cost about 100 bytes each, as codes 8 bytes a fetch. Each is
    made again as it is taken (`popleft`)."""

    def __init__(self, the_plan: Plan, label: str, fetches: Iterable[Unit | FetchGroup]) -> None:
        self._plan, self._label = the_plan, label
        self._codes = array("q", (the_plan._encode(fetch) for fetch in fetches))
        self._next = 0

    def __len__(self) -> int:
        return len(self._codes) - self._next

    def popleft(self) -> Unit | FetchGroup:
        """The next fetch (IndexError when none is left)."""
        if not self:
            raise IndexError("no fetch left")
        self._next += 1
        return self._plan._decode(self._label, self._codes[self._next - 1])

    def units(self) -> Iterator[Unit]:
        """The units of the fetches not yet taken, in order."""
        for code in self._codes[self._next :]:
            fetch = self._plan._decode(self._label, code)
            yield from fetch.units if isinstance(fetch, FetchGroup) else (fetch,)

    def clear(self) -> None:
        """Drop every fetch not yet taken."""
        self._codes, self._next = array("q"), 0


def requests_of(fetches: Iterable[Unit | FetchGroup]) -> int:
    """Estimated requests of ``fetches``: one per report fetch, 1 + `EXPORT_POLLS_ESTIMATE`
    per export."""
    return sum(
        1 + EXPORT_POLLS_ESTIMATE if isinstance(f, Unit) and f.is_export else 1 for f in fetches
    )


Window = tuple[datetime, datetime]


@attrs.frozen
class Plan:
    """The units of a spec at ``now``, and what they cost in requests and rate-limit
    time. ``notices`` say what the planner changed (a future ``date_to`` clipped).

    Units are made on demand, token by token (`units_of`), from the windows: a plan of
    many tokens holds its windows once, not a unit object per token x window x report.
    Export units use ``export_windows`` (the spec's `export_window_months`)."""

    spec: BackfillSpec
    windows: tuple[Window, ...]
    now: datetime = attrs.field(factory=lambda: datetime.now(timezone.utc))
    notices: tuple[str, ...] = ()
    export_windows: tuple[Window, ...] = ()

    @functools.cached_property
    def _labels(self) -> frozenset[str]:
        return frozenset(source.label for source in self.spec.tokens)

    @functools.cached_property
    def _slots(self) -> tuple[tuple[datetime, bool, datetime, datetime | None], ...]:
        """(from, is_export, to, until) of every window of a token, in the order its units
        are run: by window start, a window's reports before the exports starting with it."""
        now = self.now
        slots = [(lo, False, hi, now if hi > now else None) for lo, hi in self.windows]
        if self.spec.exports:
            slots += [(lo, True, hi, now if hi > now else None) for lo, hi in self.export_windows]
        slots.sort(key=lambda slot: (slot[0], slot[1]))
        return tuple(slots)

    def units_of(self, label: str) -> list[Unit]:
        """The token's units, in the order they are run (made afresh on each call)."""
        if label not in self._labels:
            return []
        return list(self.iter_units(label))

    def iter_units(self, label: str) -> Iterator[Unit]:
        """The token's units one at a time (nothing kept)."""
        reports, exports = self.spec.reports, [e.kind.value for e in self.spec.exports]
        for lo, is_export, hi, until in self._slots:
            for name in exports if is_export else reports:
                if is_export:
                    yield Unit(label, name, True, lo, hi, until, self.spec.export_format)
                else:
                    yield Unit(label, name, False, lo, hi, until)

    @functools.cached_property
    def _index(self) -> tuple[tuple[dict[datetime, int], dict[str, int]], ...]:
        """Per kind (reports, exports): window index by start, name index by name."""
        exports = [e.kind.value for e in self.spec.exports]
        kinds = ((self.windows, self.spec.reports), (self.export_windows, exports))
        return tuple(
            ({lo: i for i, (lo, _) in enumerate(windows)}, {n: i for i, n in enumerate(names)})
            for windows, names in kinds
        )

    def _encode(self, fetch: Unit | FetchGroup) -> int:
        """A fetch of this plan as an integer: windows - 1, first window, kind, name."""
        first = fetch.units[0] if isinstance(fetch, FetchGroup) else fetch
        count = len(fetch.units) if isinstance(fetch, FetchGroup) else 1
        windows, names = self._index[first.is_export]
        return (
            (count - 1) << 33
            | windows[first.date_from] << 9
            | first.is_export << 8
            | names[first.name]
        )

    def _decode(self, label: str, code: int) -> Unit | FetchGroup:
        """The fetch `_encode` made ``code`` of, for token ``label``."""
        count, window, is_export = (code >> 33) + 1, (code >> 9) & 0xFFFFFF, bool(code >> 8 & 1)
        if is_export:
            name, windows = self.spec.exports[code & 0xFF].kind.value, self.export_windows
        else:
            name, windows = self.spec.reports[code & 0xFF], self.windows
        units = []
        for lo, hi in windows[window : window + count]:
            until = self.now if hi > self.now else None
            if is_export:
                units.append(Unit(label, name, True, lo, hi, until, self.spec.export_format))
            else:
                units.append(Unit(label, name, False, lo, hi, until))
        return units[0] if count == 1 else FetchGroup(tuple(units))

    @property
    def units(self) -> tuple[Unit, ...]:
        """Every token's units, token by token in the spec's order (made on each call)."""
        return tuple(u for source in self.spec.tokens for u in self.iter_units(source.label))

    @functools.cached_property
    def units_per_token(self) -> int:
        """How many units each token has."""
        reports, exports = len(self.spec.reports), len(self.spec.exports)
        return len(self.windows) * reports + (len(self.export_windows) * exports)

    def is_provisional(self, unit: Unit) -> bool:
        """Whether ``unit``'s data may still change: its window ends after now - settle."""
        return unit.date_to > self.now - self.spec.settle_period

    def settles_at(self, unit: Unit) -> datetime:
        """When ``unit`` stops being provisional: the first run after this makes it final."""
        return unit.date_to + self.spec.settle_period

    def in_lookback(self, unit: Unit) -> bool:
        """Whether ``unit``'s window ended within the spec's ``lookback`` before now."""
        return bool(self.spec.lookback) and unit.date_to > self.now - self.spec.lookback

    def requests_of(self, label: str, *, join: bool = True) -> int:
        """Estimated requests of a first run: one per report fetch (adjacent windows of a
        series report joined unless ``join=False``, the window-by-window plan), 1 +
        `EXPORT_POLLS_ESTIMATE` per export. Every token has the same."""
        if label not in self._labels:
            return 0
        return self._requests_joined if join else self._requests_each

    @functools.cached_property
    def _requests_joined(self) -> int:
        units = self.iter_units(self.spec.tokens[0].label)
        return requests_of(fetch_groups(units, join=self.spec.format != "raw"))

    @functools.cached_property
    def _requests_each(self) -> int:
        return self.units_per_token + EXPORT_POLLS_ESTIMATE * len(self.export_windows) * len(
            self.spec.exports
        )

    def least_seconds(self, label: str, *, join: bool = True) -> float:
        """The least time the rate limit allows for the token's requests: N (less the
        reserve: a backfill is bulk work) go at once, then each further N wait a window
        (ignoring latency)."""
        requests = self.requests_of(label, join=join)
        return rate_limit_floor(requests, self.spec.bulk_max_requests, self.spec.window)


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


def _cut(
    spec: BackfillSpec, start: datetime, now: datetime, months: int
) -> list[tuple[datetime, datetime]]:
    """The windows of ``months`` from ``start`` to the spec's ``date_to`` (or now)."""
    if spec.date_to is not None and spec.date_to <= now:
        return split_range(start, spec.date_to, months=months)
    return _windows(start, spec.date_to, now, months)


def plan(spec: BackfillSpec, *, now: datetime | None = None) -> Plan:
    """Cut ``spec`` into windows and units at ``now`` (default: the clock), token by
    token in the spec's order. `SpecError` if the resolved range is empty or shorter
    than the spec's ``settle`` or ``lookback``.

    Export windows are the report windows unless the spec's `export_window_months`
    differs; with a relative ``date_from`` they keep to their own grid (`grid_start`), so
    they too stay the same from run to run."""
    now = now or datetime.now(timezone.utc)
    relative = not isinstance(spec.date_from, datetime)
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
        end = now
    check_spans(spec, end - start)
    windows = _cut(spec, start, now, spec.window_months)
    export_windows: list[tuple[datetime, datetime]] = []
    if spec.exports:
        months = spec.export_window_months or spec.window_months
        if months == spec.window_months:
            export_windows = windows
        else:
            export_start = start
            if relative:
                assert not isinstance(spec.date_from, datetime)
                export_start = grid_start(now + spec.date_from, months)
            export_windows = _cut(spec, export_start, now, months)
    return Plan(spec, tuple(windows), now, tuple(notices), tuple(export_windows))


@attrs.frozen
class ExportWindowCost:
    """What one choice of `BackfillSpec.export_window_months` costs a token: its export
    windows, and the token's estimated requests and least time with that choice."""

    months: int
    windows: int
    requests: int
    least_seconds: float


EXPORT_WINDOW_CHOICES = (1, 3, 6, 12)
"""The export window lengths `export_window_costs` compares (with the spec's own)."""


def export_window_costs(the_plan: Plan) -> list[ExportWindowCost]:
    """The cost of each export window length in `EXPORT_WINDOW_CHOICES` (and the spec's),
    for the plan's first token, everything else as planned; empty without exports."""
    spec = the_plan.spec
    if not spec.exports:
        return []
    chosen = spec.export_window_months or spec.window_months
    label = spec.tokens[0].label
    costs = []
    for months in sorted({*EXPORT_WINDOW_CHOICES, chosen}):
        other = plan(attrs.evolve(spec, export_window_months=months), now=the_plan.now)
        costs.append(
            ExportWindowCost(
                months,
                len(other.export_windows),
                other.requests_of(label),
                other.least_seconds(label),
            )
        )
    return costs
