"""The sandbox's reports, each computed from the token's world (`_world`) by the
reference's definitions.

The account (users, groups, forms) is the same for every token and holds every id the
reference's examples use (users 12345, 123 and 789; groups 123, 456 and 789; NPS surveys 55
and 123), so its curl examples work as written. Each token has its own events. A message
counts in the range its *arrival* falls in, in the state it has reached by "now"; a case
counts in the range it *closed* in (24 h after its last activity); an NPS invitation in the
range it was *sent* in, as received when answered by "now". Filters: ``users`` keeps the
messages assigned to those agents (cases any of them replied in, surveys of their
customers), ``groups`` those routed to those groups; both together intersect; an empty list
or an unknown id keeps nothing. Other body fields (``forms`` on a non-NPS report,
``extra_filters``) do not change the data.

Hence additive metrics (counts, sums) of a range are the sum over any split of it, a filter
never adds data, and:
- times in seconds, ``*_min`` = seconds / 60, min <= median <= max, min <= avg <= max;
  medians are the middle of the values themselves;
- responded_to <= volume, broke_sla and broke_action_sla <= responded_to; the SLA is broken
  by a customer wait over `SLA_SECONDS` and an agent response time (assignment to response)
  over `ACTION_SLA_SECONDS`;
- user_summary fractions divide by responded_to, except fraction_responded_to
  (by mentions_assigned); 0.0 when dividing by zero (the reference's prose divides
  fraction_responded_to_in_private by mentions_assigned, its examples by responded_to);
- user_volume ``all_states`` = sum of the states, ``all_closed_states`` = the sum of
  `CLOSED_STATES` (closed, irrelevant, duplicate, no_response_required);
- classifications' ``all_states`` = sum of that classification's per-state volumes;
- the workflow-state totals equal the sums of states_volume's series, and their sum is
  summary's ``total_volume``;
- case_summary's ``total_cases`` is the number of case_details rows for the same range;
- NPS: promoters + passives + detractors = received <= sent; nps_score is the Net Promoter
  Score (the reference calls it "average nps score", but its example is the NPS:
  9 promoters and 2 detractors of 12 give 58.33); nps_summary equals the sum of
  nps_volume's days.

Series periods are labelled on the wall clock of the request's ``date_from`` offset and cover
the range exactly (first period contains date_from, last contains date_to); each period's
value is computed over its part of the range. case_volume counts the cases open at some
moment of each day. nps_volume has one entry per local day the range touches; ``date`` is
that day's local midnight in UTC, so April 1 at +11:00 is ``2018-03-31T13:00:00+00:00`` (the
reference's example list starts a day later; its values are all zero and its range
truncated, so we read it as illustrative).
"""

from __future__ import annotations

import hashlib
import json
import random
from bisect import bisect_left, bisect_right
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Any

from .. import reports
from . import _world as w
from ._world import ACTION_SLA_SECONDS, SLA_SECONDS, STATES, Filters, epoch, median

__all__ = [
    "STATES",
    "CLOSED_STATES",
    "USERS",
    "GROUPS",
    "FORMS",
    "NPS_FORM_IDS",
    "rng_for",
    "periods",
    "local_days",
    "DEFAULT_DAILY_VOLUME",
    "SLA_SECONDS",
    "ACTION_SLA_SECONDS",
    "filters_from",
    "build_report",
    "report_body",
]

DEFAULT_DAILY_VOLUME = 24
"""Messages a token's world receives on a weekday, on average (60 % of that at weekends)."""

CLOSED_STATES = ("closed", "irrelevant", "duplicate", "no_response_required")

USERS: tuple[dict[str, Any], ...] = (
    {
        "id": 12345,
        "email": "jane.remington@example.com",
        "first_name": "Jane",
        "last_name": "Remington",
        "timezone": "Australia/Sydney",
        "gmtoffset": 10,
        "sign_in_count": 76,
        "last_sign_in_at": "2018-03-21T06:09:01Z",
        "archived": False,
        "groups": [123, 456, 789],
    },
    {
        "id": 123,
        "email": "jane.pear@example.com",
        "first_name": "Jane",
        "last_name": "Pear",
        "timezone": "Australia/Melbourne",
        "gmtoffset": 10,
        "sign_in_count": 12,
        "last_sign_in_at": "2018-04-02T01:15:44Z",
        "archived": False,
        "groups": [123],
    },
    {
        "id": 789,
        "email": "barry.banana@example.com",
        "first_name": "Barry",
        "last_name": "Banana",
        "timezone": "Europe/London",
        "gmtoffset": 0,
        "sign_in_count": 3,
        "last_sign_in_at": None,
        "archived": True,
        "groups": [456],
    },
    {
        "id": 4242,
        "email": "zoe.otsuka@example.com",
        "first_name": "Zoë",
        "last_name": "Ōtsuka",
        "timezone": "Asia/Tokyo",
        "gmtoffset": 9,
        "sign_in_count": 41,
        "last_sign_in_at": "2019-01-10T22:00:00Z",
        "archived": False,
        "groups": [789],
    },
)

GROUPS: tuple[dict[str, Any], ...] = (
    {"id": 123, "name": "Social Customer Care", "comment": "Social customer care team members"},
    {"id": 456, "name": "Escalations", "comment": 'Complaints, refunds, "urgent" cases'},
    {"id": 789, "name": "APAC", "comment": None},
)

FORMS: tuple[dict[str, Any], ...] = (
    {
        "id": 55,
        "name": "NPS Survey",
        "title": "Lexer NPS Survey",
        "archived": False,
        "created_at": "2018-05-26T21:54:19Z",
        "groups": [123],
        "nps": True,
        "form_url": "https://forms.example.invalid/55/1/form",
    },
    {
        "id": 56,
        "name": "Post-case NPS",
        "title": "How did we do?",
        "archived": False,
        "created_at": "2019-02-01T03:00:00Z",
        "groups": [123, 456],
        "nps": True,
        "form_url": "https://forms.example.invalid/56/1/form",
    },
    {
        "id": 57,
        "name": "Competition entry",
        "title": "Win a trip",
        "archived": True,
        "created_at": "2017-11-11T11:11:11Z",
        "groups": [],
        "nps": False,
        "form_url": "https://forms.example.invalid/57/1/form",
    },
    {
        "id": 123,
        "name": "Customer NPS",
        "title": "How likely are you to recommend us?",
        "archived": False,
        "created_at": "2018-03-01T00:00:00Z",
        "groups": [123, 456, 789],
        "nps": True,
        "form_url": "https://forms.example.invalid/123/1/form",
    },
)

_USER_IDS: tuple[int, ...] = tuple(user["id"] for user in USERS)

NPS_FORM_IDS = frozenset(form["id"] for form in FORMS if form["nps"])

CLASSIFICATIONS: tuple[tuple[int, str], ...] = (
    (123, "amusing"),
    (143, "customer service"),
    (466, "positive"),
    (526, "social nps"),
    (528, "feedback"),
    (1246, "amusing"),
    (1465, "image"),
    (1467, "loyalty"),
    (1472, "bot"),
)


def rng_for(*parts: object) -> random.Random:
    """A generator seeded from a sha256 of ``parts`` (JSON-encoded), so it is reproducible
    across processes (unlike ``hash``)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return random.Random(int.from_bytes(hashlib.sha256(blob.encode()).digest()[:16], "big"))


def _truncate(moment: datetime, hourly: bool) -> datetime:
    if hourly:
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def periods(start: datetime, end: datetime, hourly: bool) -> list[datetime]:
    """Period starts covering [start, end] exactly, in ``start``'s UTC offset: the first
    contains ``start``, the last contains ``end``, one per hour (or day), no gaps."""
    tz = start.tzinfo
    assert tz is not None
    step = timedelta(hours=1) if hourly else timedelta(days=1)
    current = _truncate(start, hourly)
    last = _truncate(end.astimezone(tz), hourly)
    out = []
    while current <= last:
        out.append(current)
        current = current + step
    return out


def local_days(start: datetime, end: datetime) -> list[datetime]:
    """Local midnights (in ``start``'s offset) of every day the range touches."""
    return periods(start, end, hourly=False)


def _period_label(moment: datetime) -> str:
    """``%Y-%m-%d %H:%M`` (isoformat's is the same text, faster; not so before year 1000)."""
    if moment.year < 1000:
        return moment.strftime("%Y-%m-%d %H:%M")
    return moment.isoformat(" ", "minutes")[:16]


def _frac(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _ids(value: object) -> frozenset[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        raise ValueError("a users/groups filter must be a list of integer ids")
    return frozenset(value)


def filters_from(params: Mapping[str, Any]) -> Filters:
    """The users/groups filters of a request body; ValueError when one is not a list of ids."""
    return Filters(_ids(params.get("users")), _ids(params.get("groups")))


class _Calendar:
    """A range's period starts, their epoch seconds, and (made when first asked) their
    labels and the UTC dates of nps_volume. Periods are determined by the range's epoch
    seconds and UTC offset, so one calendar serves every request for that range."""

    __slots__ = ("_labels", "_utc", "bounds", "fixed", "starts")

    def __init__(self, starts: list[datetime], hourly: bool) -> None:
        self.starts = starts
        self.fixed = bool(starts) and isinstance(starts[0].tzinfo, timezone)
        if self.fixed:
            # A fixed offset: periods of exactly one hour (or day) each.
            step, first = 3600 if hourly else w.DAY, epoch(starts[0])
            self.bounds = list(range(first, first + step * len(starts), step))
        else:
            self.bounds = [epoch(p) for p in starts]
        self._labels: list[str] | None = None
        self._utc: list[tuple[str, int]] | None = None

    @property
    def labels(self) -> list[str]:
        """Each period's ``date_from`` label."""
        if self._labels is None:
            self._labels = [_period_label(p) for p in self.starts]
        return self._labels

    @property
    def utc(self) -> list[tuple[str, int]]:
        """Each period start in UTC: its isoformat and epoch seconds."""
        if self._utc is None:
            starts = self.starts
            if self.fixed and len(starts) > 1 and self.bounds[1] - self.bounds[0] == w.DAY:
                # Local midnights of one offset: one UTC time of day, one more date each.
                first = starts[0].astimezone(timezone.utc)
                time_of_day = first.isoformat()[10:]
                ordinal = first.toordinal()
                self._utc = [
                    (date.fromordinal(ordinal + i).isoformat() + time_of_day, stamp)
                    for i, stamp in enumerate(self.bounds)
                ]
            else:
                moments = [p.astimezone(timezone.utc) for p in starts]
                self._utc = [(m.isoformat(), int(m.timestamp())) for m in moments]
        return self._utc


_CALENDARS: OrderedDict[tuple[int, int, timedelta | None, bool], _Calendar] = OrderedDict()
_CALENDARS_KEPT = 64


class _Query:
    """One request against one token's world: the range and "now" in epoch seconds."""

    def __init__(
        self,
        key: str,
        start: datetime,
        end: datetime,
        params: Mapping[str, Any],
        now: datetime,
        volume: int,
    ) -> None:
        self.key, self.start, self.end, self.volume = key, start, end, volume
        self.first, self.last, self.now = epoch(start), epoch(end), epoch(now)
        self.params = params
        self.filters = filters_from(params)

    def messages(self) -> list[w.Message]:
        return list(
            w.messages(self.key, self.volume, self.first, self.last, self.now, self.filters)
        )

    def closed_cases(self) -> list[w.Case]:
        stop = min(self.last, self.now)
        found = w.cases(self.key, self.volume, self.first, stop, self.now, self.filters)
        return [c for c in found if c.closed_at <= stop]

    def surveys(self, form: int) -> list[w.Survey]:
        return list(
            w.surveys(self.key, self.volume, form, self.first, self.last, self.now, self.filters)
        )

    def buckets(self, hourly: bool) -> _Calendar:
        """The range's periods (hourly or daily); the same range asked again (in a fixed
        offset) gets the same `_Calendar`."""
        tz = self.start.tzinfo
        if not isinstance(tz, timezone):
            return _Calendar(periods(self.start, self.end, hourly), hourly)
        key = (self.first, self.last, tz.utcoffset(None), hourly)
        found = _CALENDARS.get(key)
        if found is None:
            found = _CALENDARS[key] = _Calendar(periods(self.start, self.end, hourly), hourly)
            if len(_CALENDARS) > _CALENDARS_KEPT:
                _CALENDARS.popitem(last=False)
        return found

    def responded(self, m: w.Message) -> bool:
        return 0 < m.responded_at <= self.now


def _stats(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(min, median, max, avg) of ``values``; zeros when there are none."""
    if not values:
        return 0.0, 0.0, 0.0, 0.0
    return min(values), median(values), max(values), sum(values) / len(values)


def _stats_over(values: Sequence[float], limit: float) -> tuple[float, float, float, float, int]:
    """`_stats` of ``values`` and how many are over ``limit``, sorting them once."""
    if not values:
        return 0.0, 0.0, 0.0, 0.0, 0
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    med = float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    over = n - bisect_right(ordered, limit)
    return min(values), med, max(values), sum(values) / n, over


# Each report is computed in two steps: gathering (record by record, or from the days'
# digests for an unfiltered query, see "Digests" below) and one function that makes the
# payload from what was gathered, so both ways give the same bytes.


def _summary_of(total: int, waits: list[float], actions: list[float]) -> dict[str, Any]:
    lo, med, hi, avg, broke = _stats_over(waits, SLA_SECONDS)
    alo, amed, ahi, aavg, broke_action = _stats_over(actions, ACTION_SLA_SECONDS)
    return {
        "total_volume": total,
        "avg_response_time": avg,
        "avg_action_response_time": aavg,
        "total_responded_to": len(waits),
        "broke_sla": broke,
        "broke_action_sla": broke_action,
        "min_response_time": lo,
        "median_response_time": med,
        "max_response_time": hi,
        "min_action_response_time": alo,
        "median_action_response_time": amed,
        "max_action_response_time": ahi,
        "avg_action_response_time_min": aavg / 60,
        "avg_response_time_min": avg / 60,
        "median_action_response_time_min": amed / 60,
        "median_response_time_min": med / 60,
    }


def _summary(q: _Query) -> dict[str, Any]:
    msgs = q.messages()
    answered = [m for m in msgs if q.responded(m)]
    waits = [m.responded_at - m.at for m in answered]
    actions = [m.responded_at - m.assigned_at for m in answered]
    return _summary_of(len(msgs), waits, actions)


def _states_volume_of(cal: _Calendar, counts: Sequence[Sequence[int]]) -> Any:
    """``counts[code][period]``: messages in each state (by code) per period."""
    labels = cal.labels
    return {
        state: [
            {"state": state, "value": value, "date_range": {"date_from": label}}
            for value, label in zip(values, labels, strict=True)
        ]
        for state, values in zip(STATES, counts, strict=True)
    }


def _states_volume_counts(q: _Query) -> tuple[_Calendar, list[list[int]]]:
    cal = q.buckets(reports.hourly_states_volume(q.start, q.end))
    bounds = cal.bounds
    counts = {state: [0] * len(cal.starts) for state in STATES}
    for m in q.messages():
        counts[m.state(q.now)][bisect_right(bounds, m.at) - 1] += 1
    return cal, list(counts.values())


def _state_counts(q: _Query, msgs: Iterable[w.Message]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for m in msgs:
        counts[m.state(q.now)] += 1
    return counts


def _workflow_states_of(counts: Mapping[str, int]) -> list[Any]:
    kept = [{"state": s, "volume": v} for s, v in counts.items() if v > 0]
    return sorted(kept, key=lambda row: -int(row["volume"]))


def _workflow_states(q: _Query) -> list[Any]:
    return _workflow_states_of(_state_counts(q, q.messages()))


_CLASS_NAMES = dict(CLASSIFICATIONS)


def _classifications_of(by_class: Mapping[int, Mapping[str, int]]) -> list[Any]:
    """``by_class[cid][state]``: messages (> 0) of that classification in that state."""
    out: list[dict[str, Any]] = []
    for cid in sorted(by_class):
        name = _CLASS_NAMES[cid]
        states = by_class[cid]
        for state in STATES:
            if state in states:
                out.append(
                    {
                        "classification_id": cid,
                        "classification": name,
                        "state": state,
                        "volume": states[state],
                    }
                )
        out.append(
            {
                "classification_id": cid,
                "classification": name,
                "state": "all_states",
                "volume": sum(states.values()),
            }
        )
    return out


def _classifications(q: _Query) -> list[Any]:
    by_class: dict[int, dict[str, int]] = {}
    for m in q.messages():
        if m.classes:
            state = m.state(q.now)
            for cid in m.classes:
                states = by_class.setdefault(cid, {})
                states[state] = states.get(state, 0) + 1
    return _classifications_of(by_class)


def _response_volume_of(cal: _Calendar, sums: list[float], counts: list[int]) -> Any:
    return {
        "avg_response_time": [
            {"value": total / n if n else 0.0, "date_range": {"date_from": label}}
            for label, total, n in zip(cal.labels, sums, counts, strict=True)
        ]
    }


def _response_volume_sums(q: _Query) -> tuple[_Calendar, list[float], list[int]]:
    cal = q.buckets(reports.hourly_response_volume(q.start, q.end))
    bounds = cal.bounds
    sums = [0.0] * len(cal.starts)
    counts = [0] * len(cal.starts)
    for m in q.messages():
        if q.responded(m):
            index = bisect_right(bounds, m.at) - 1
            sums[index] += m.responded_at - m.at
            counts[index] += 1
    return cal, sums, counts


def _team(q: _Query) -> list[dict[str, Any]]:
    """The users the filters keep: named ones, and members of the named groups."""
    users, groups = q.filters
    return [
        user
        for user in USERS
        if (users is None or user["id"] in users)
        and (groups is None or not groups.isdisjoint(user["groups"]))
    ]


def _by_agent(msgs: Iterable[w.Message]) -> dict[int, list[w.Message]]:
    out: dict[int, list[w.Message]] = {}
    for m in msgs:
        if m.agent:
            out.setdefault(m.agent, []).append(m)
    return out


def _user_summary_row(
    user: Mapping[str, Any], assigned: int, waits: list[float], actions: list[float], private: int
) -> dict[str, Any]:
    """One user's row from their messages assigned by "now" and, of those answered, the
    waits, agent response times and how many answers were private."""
    lo, _, hi, avg, broke = _stats_over(waits, SLA_SECONDS)
    alo, _, ahi, aavg, broke_action = _stats_over(actions, ACTION_SLA_SECONDS)
    responded = len(waits)
    return {
        "first_name": user["first_name"],
        "last_name": user["last_name"],
        "mentions_assigned": assigned,
        "user_id": str(user["id"]),
        "responded_to": responded,
        "responded_to_in_private": private,
        "avg_response_time": avg,
        "min_response_time": lo,
        "max_response_time": hi,
        "avg_action_response_time": aavg,
        "min_action_response_time": alo,
        "max_action_response_time": ahi,
        "total_responded_to": responded,
        "broke_sla": broke,
        "broke_action_sla": broke_action,
        "avg_response_time_min": avg / 60,
        "avg_action_response_time_min": aavg / 60,
        "fraction_responded_to": _frac(responded, assigned),
        "fraction_responded_to_in_private": _frac(private, responded),
        "fraction_broke_sla": _frac(broke, responded),
        "fraction_broke_action_sla": _frac(broke_action, responded),
    }


def _user_summary(q: _Query) -> list[Any]:
    mine = _by_agent(m for m in q.messages() if 0 < m.assigned_at <= q.now)
    out = []
    for user in _team(q):
        assigned = mine.get(user["id"], [])
        answered = [m for m in assigned if q.responded(m)]
        waits = [m.responded_at - m.at for m in answered]
        actions = [m.responded_at - m.assigned_at for m in answered]
        private = sum(1 for m in answered if m.private)
        out.append(_user_summary_row(user, len(assigned), waits, actions, private))
    return out


def _user_volume_row(user: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, Any]:
    states = {
        "all_states": sum(counts.values()),
        "all_closed_states": sum(counts[s] for s in CLOSED_STATES),
        **counts,
    }
    return {
        "user_id": user["id"],
        "first_name": user["first_name"],
        "last_name": user["last_name"],
        "states": states,
    }


def _user_volume(q: _Query) -> list[Any]:
    mine = _by_agent(m for m in q.messages() if 0 < m.assigned_at <= q.now)
    return [_user_volume_row(user, _state_counts(q, mine.get(user["id"], []))) for user in _team(q)]


def _case_summary_of(
    n: int, firsts: list[float], resolutions: list[float], interactions: int, involved: int
) -> dict[str, Any]:
    """From the closed cases' count, first-reply and resolution times (in order), and their
    total agent interactions and agents involved."""
    return {
        "total_cases": n,
        "first_reply_time": sum(firsts) / n if n else 0.0,
        "resolution_time": sum(resolutions) / n if n else 0.0,
        "median_first_reply_time": median(firsts),
        "median_resolution_time": median(resolutions),
        "agent_interactions": interactions / n if n else 0.0,
        "agents_involved": involved / n if n else 0.0,
    }


def _case_summary(q: _Query) -> dict[str, Any]:
    closed = q.closed_cases()
    return _case_summary_of(
        len(closed),
        [c.first_reply_at - c.created_at for c in closed],
        [c.last_reply_at - c.created_at for c in closed],
        sum(len(c.agents) for c in closed),
        sum(len(set(c.agents)) for c in closed),
    )


def _case_volume_of(cal: _Calendar, counts: list[int]) -> Any:
    return {
        "open": [
            {"value": n, "date_range": {"date_from": label}}
            for label, n in zip(cal.labels, counts, strict=True)
        ]
    }


def _case_periods(q: _Query) -> tuple[_Calendar, list[int], list[int], list[int]]:
    """Daily period starts (and in epoch seconds) and each period's part of the range,
    [low, high] (by "now"; empty, low > high, from the first period after "now")."""
    cal = q.buckets(hourly=False)
    bounds = cal.bounds
    stop = min(q.last, q.now)
    # Each period runs from its start (or the range's) to the next period's start - 1 s.
    lows = [max(b, q.first) for b in bounds]
    highs = [min(b - 1, stop) for b in bounds[1:]] + [stop]
    return cal, bounds, lows, highs


def _case_volume_counts(q: _Query) -> tuple[_Calendar, list[int]]:
    """Cases open at some moment of each day's part of the range (and by "now")."""
    cal, bounds, lows, highs = _case_periods(q)
    stop = min(q.last, q.now)
    counts = [0] * len(cal.starts)
    for c in w.cases(q.key, q.volume, q.first, stop, q.now, q.filters):
        for i in range(max(0, bisect_right(bounds, c.created_at) - 1), len(counts)):
            if lows[i] > highs[i] or c.closed_at < lows[i]:
                break
            counts[i] += 1
    return cal, counts


def _case_classifications_of(counts: Mapping[int, int]) -> list[Any]:
    return [
        {"classification_id": cid, "classification": _CLASS_NAMES[cid], "volume": counts[cid]}
        for cid in sorted(counts)
    ]


def _case_classifications(q: _Query) -> list[Any]:
    counts: dict[int, int] = {}
    for c in q.closed_cases():
        for cid in c.classes:
            counts[cid] = counts.get(cid, 0) + 1
    return _case_classifications_of(counts)


_CATEGORY_OF = {
    "promoters": "total_promoters",
    "passives": "total_passives",
    "detractors": "total_detractors",
}


def nps_category(score: int) -> str:
    """promoters (9-10), passives (7-8) or detractors (0-6)."""
    return "promoters" if score >= 9 else "passives" if score >= 7 else "detractors"


def nps_summary_from(counts: Mapping[str, int]) -> dict[str, Any]:
    """An NPS summary from its counts; nps_score = 100 * (promoters - detractors) / received."""
    received = counts["total_received"]
    score = _frac(100 * (counts["total_promoters"] - counts["total_detractors"]), received)
    return {**counts, "nps_score": float(score)}


def _nps_counts_of(sent: int, received: Sequence[int], category: str) -> dict[str, int]:
    """From invitations sent and answers received by "now" (promoters, passives,
    detractors), the counts of ``category`` ("all" or one of them)."""
    counts = {"total_sent": sent, "total_received": 0}
    counts.update(dict.fromkeys(_CATEGORY_OF.values(), 0))
    for (name, total), n in zip(_CATEGORY_OF.items(), received, strict=True):
        if category in ("all", name):
            counts[total] += n
            counts["total_received"] += n
    return counts


def _nps_counts(q: _Query, found: Iterable[w.Survey], category: str) -> dict[str, int]:
    sent = 0
    received = dict.fromkeys(_CATEGORY_OF, 0)
    for s in found:
        sent += 1
        if 0 < s.submitted_at <= q.now:
            received[nps_category(s.score)] += 1
    return _nps_counts_of(sent, list(received.values()), category)


def _nps_days_of(cal: _Calendar, per_day: Iterable[dict[str, int]]) -> list[Any]:
    return [
        {"date": date, "timestamp": stamp, "data": nps_summary_from(counts)}
        for (date, stamp), counts in zip(cal.utc, per_day, strict=True)
    ]


def _nps_day_counts(q: _Query, form: int, category: str) -> tuple[_Calendar, list[Any]]:
    cal = q.buckets(hourly=False)
    bounds = cal.bounds
    per_day: list[list[w.Survey]] = [[] for _ in bounds]
    for s in q.surveys(form):
        per_day[bisect_right(bounds, s.sent_at) - 1].append(s)
    return cal, [_nps_counts(q, found, category) for found in per_day]


# -- Digests: unfiltered reports from `_world.digest`, the same bytes ----------------------


def _split(
    times: Sequence[int], first: int, last: int, bounds: Sequence[int]
) -> Iterator[tuple[int, int, int]]:
    """(period, lo, hi): the slices of sorted ``times`` in [first, last] by the period
    (``bounds``: period starts, the first <= first) each time falls in."""
    lo, hi = bisect_left(times, first), bisect_right(times, last)
    periods = len(bounds)
    while lo < hi:
        index = bisect_right(bounds, times[lo]) - 1
        end = hi if index + 1 >= periods else bisect_left(times, bounds[index + 1], lo, hi)
        yield index, lo, end
        lo = end


def _span(times: Sequence[int], first: int, last: int) -> tuple[int, int]:
    return bisect_left(times, first), bisect_right(times, last)


class _Digests:
    """The digests of the days an unfiltered query reads, and its range by "now"."""

    def __init__(self, q: _Query) -> None:
        self.q = q
        self.first, self.last = q.first, min(q.last, q.now)

    def messages(self) -> list[w.Digest]:
        """The days whose messages may arrive in the range (one day back: a
        conversation's later messages arrive up to 12 hours into the next day)."""
        return self.days(self.first // w.DAY - 1)

    def surveys(self) -> list[w.Digest]:
        return self.days(self.first // w.DAY)

    def days(self, begin: int) -> list[w.Digest]:
        if self.last < self.first:
            return []
        q = self.q
        return [
            w.digest(q.key, ordinal, q.volume, q.now)
            for ordinal in range(begin, self.last // w.DAY + 1)
        ]

    def cases(self) -> list[w.CaseDigest]:
        """The cases that may close in the range (`LAG_DAYS` back)."""
        if self.last < self.first:
            return []
        q = self.q
        return [
            w.case_digest(q.key, ordinal, q.volume)
            for ordinal in range(self.first // w.DAY - w.LAG_DAYS, self.last // w.DAY + 1)
        ]

    def closed(self) -> Iterator[tuple[w.CaseDigest, Sequence[int] | None]]:
        """Each day's cases with the indices of those closed in the range (None: all)."""
        first, last = self.first, self.last
        for c in self.cases():
            if not c.created:
                continue
            if first <= c.closed_sorted[0] and c.closed_sorted[-1] <= last:
                yield c, None
            else:
                yield c, [i for i, at in enumerate(c.closed) if first <= at <= last]


def _fast_summary(q: _Query) -> dict[str, Any]:
    f = _Digests(q)
    total = 0
    waits: list[float] = []
    actions: list[float] = []
    for g in f.messages():
        lo, hi = _span(g.times, f.first, f.last)
        total += hi - lo
        a = g.answers
        lo, hi = _span(a.times, f.first, f.last)
        waits += a.waits[lo:hi]
        actions += a.actions[lo:hi]
    return _summary_of(total, waits, actions)


def _fast_states_volume_counts(q: _Query) -> tuple[_Calendar, list[list[int]]]:
    cal = q.buckets(reports.hourly_states_volume(q.start, q.end))
    bounds = cal.bounds
    f = _Digests(q)
    pieces: list[list[bytes]] = [[] for _ in bounds]
    for g in f.messages():
        for index, lo, hi in _split(g.times, f.first, f.last, bounds):
            pieces[index].append(g.states[lo:hi])
    counts = [[0] * len(cal.starts) for _ in STATES]
    codes = range(len(STATES))
    for index, parts in enumerate(pieces):
        if parts:
            joined = b"".join(parts)
            for code in codes:
                counts[code][index] = joined.count(code)
    return cal, counts


def _fast_state_counts(f: _Digests) -> dict[str, int]:
    joined = b"".join(g.states[slice(*_span(g.times, f.first, f.last))] for g in f.messages())
    return {state: joined.count(code) for code, state in enumerate(STATES)}


def _fast_workflow_states(q: _Query) -> list[Any]:
    return _workflow_states_of(_fast_state_counts(_Digests(q)))


def _fast_classifications(q: _Query) -> list[Any]:
    f = _Digests(q)
    joined = b"".join(g.pairs[slice(*_span(g.pair_times, f.first, f.last))] for g in f.messages())
    by_class: dict[int, dict[str, int]] = {}
    width = len(STATES)
    for code, n in Counter(joined).items():
        cid, state = divmod(code, width)
        by_class.setdefault(w.CLASS_IDS[cid], {})[STATES[state]] = n
    return _classifications_of(by_class)


def _fast_response_volume_sums(q: _Query) -> tuple[_Calendar, list[float], list[int]]:
    cal = q.buckets(reports.hourly_response_volume(q.start, q.end))
    bounds = cal.bounds
    f = _Digests(q)
    sums = [0.0] * len(cal.starts)
    counts = [0] * len(cal.starts)
    for g in f.messages():
        a = g.answers
        for index, lo, hi in _split(a.times, f.first, f.last, bounds):
            total = sums[index]
            for wait in a.waits[lo:hi]:  # in arrival order, as record by record
                total += wait
            sums[index] = total
            counts[index] += hi - lo
    return cal, sums, counts


def _fast_user_summary(q: _Query) -> list[Any]:
    f = _Digests(q)
    assigned = dict.fromkeys(_USER_IDS, 0)
    private = dict.fromkeys(_USER_IDS, 0)
    waits: dict[int, list[float]] = {uid: [] for uid in _USER_IDS}
    actions: dict[int, list[float]] = {uid: [] for uid in _USER_IDS}
    first, last = f.first, f.last
    for g in f.messages():
        for uid, mine in g.agents.items():
            lo, hi = _span(mine.times, first, last)
            assigned[uid] += hi - lo
            a = mine.answers
            lo, hi = _span(a.times, first, last)
            if lo < hi:
                waits[uid] += a.waits[lo:hi]
                actions[uid] += a.actions[lo:hi]
                private[uid] += a.private.count(1, lo, hi)
    return [
        _user_summary_row(user, assigned[uid], waits[uid], actions[uid], private[uid])
        for user, uid in zip(USERS, _USER_IDS, strict=True)
    ]


def _fast_user_volume(q: _Query) -> list[Any]:
    f = _Digests(q)
    days = f.messages()
    out = []
    for user in USERS:
        parts = []
        for g in days:
            mine = g.agents.get(user["id"])
            if mine is not None:
                parts.append(mine.states[slice(*_span(mine.times, f.first, f.last))])
        joined = b"".join(parts)
        counts = {state: joined.count(code) for code, state in enumerate(STATES)}
        out.append(_user_volume_row(user, counts))
    return out


def _fast_case_summary(q: _Query) -> dict[str, Any]:
    n = interactions = involved = 0
    firsts: list[float] = []
    resolutions: list[float] = []
    for c, kept in _Digests(q).closed():
        if kept is None:
            n += len(c.created)
            firsts += c.first_replies
            resolutions += c.resolutions
            interactions += sum(c.interactions)
            involved += sum(c.involved)
        else:
            n += len(kept)
            firsts += [c.first_replies[i] for i in kept]
            resolutions += [c.resolutions[i] for i in kept]
            interactions += sum(c.interactions[i] for i in kept)
            involved += sum(c.involved[i] for i in kept)
    return _case_summary_of(n, firsts, resolutions, interactions, involved)


def _fast_case_classifications(q: _Query) -> list[Any]:
    counts: Counter[int] = Counter()
    for c, kept in _Digests(q).closed():
        if kept is None:
            counts.update(dict(c.class_counts))
        else:
            for i in kept:
                counts.update(c.classes[i])
    return _case_classifications_of(counts)


def _fast_case_volume_counts(q: _Query) -> tuple[_Calendar, list[int]]:
    """As `_case_volume_counts`: a case is open in a period's part [low, high] when created
    by high and closed at or after low; as it closes after it is created, that count is
    (created by high) - (closed before low), over any set of cases holding those (the cases
    closed before the range, or created after it, cancel out)."""
    cal, _, lows, highs = _case_periods(q)
    counts = [0] * len(cal.starts)
    created: list[int] = []
    closed: list[float] = []
    for c in _Digests(q).cases():
        created += c.created  # the days in order, each by creation: sorted
        closed += c.closed_sorted
    if not created:
        return cal, counts
    closed.sort()
    for index, (low, high) in enumerate(zip(lows, highs, strict=True)):
        if low > high:
            break
        counts[index] = bisect_right(created, high) - bisect_left(closed, low)
    return cal, counts


def _fast_nps_counts(f: _Digests, form: int, bounds: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Per period: (invitations sent, [promoters, passives, detractors] received)."""
    out = [(0, [0, 0, 0]) for _ in bounds]
    for g in f.surveys():
        found = g.surveys.get(form)
        if found is None:
            continue
        for index, lo, hi in _split(found.times, f.first, f.last, bounds):
            sent, received = out[index]
            codes = found.codes
            for code in (1, 2, 3):
                received[code - 1] += codes.count(code, lo, hi)
            out[index] = (sent + hi - lo, received)
    return out


def _fast_nps_summary(q: _Query, form: int, category: str) -> dict[str, Any]:
    ((sent, received),) = _fast_nps_counts(_Digests(q), form, [q.first])
    return nps_summary_from(_nps_counts_of(sent, received, category))


def _fast_nps_day_counts(
    q: _Query, form: int, category: str
) -> tuple[_Calendar, list[dict[str, int]]]:
    cal = q.buckets(hourly=False)
    bounds = cal.bounds
    found = _fast_nps_counts(_Digests(q), form, bounds)
    return cal, [_nps_counts_of(sent, received, category) for sent, received in found]


# -- Bodies: the series reports' JSON written directly, as json.dumps would --------------


def _states_volume_body(cal: _Calendar, counts: Sequence[Sequence[int]]) -> str:
    tails = [f', "date_range": {{"date_from": "{label}"}}}}' for label in cal.labels]
    parts = []
    for state, values in zip(STATES, counts, strict=True):
        head = f'{{"state": "{state}", "value": '
        items = ", ".join([f"{head}{v}{tail}" for v, tail in zip(values, tails, strict=True)])
        parts.append(f'"{state}": [{items}]')
    return "{" + ", ".join(parts) + "}"


def _values_body(name: str, cal: _Calendar, values: Iterable[float | int]) -> str:
    items = ", ".join(
        [
            f'{{"value": {v!r}, "date_range": {{"date_from": "{label}"}}}}'
            for v, label in zip(values, cal.labels, strict=True)
        ]
    )
    return f'{{"{name}": [{items}]}}'


def _nps_days_body(cal: _Calendar, found: Iterable[tuple[int, list[int]]], category: str) -> str:
    """As `_nps_days_of` of `_nps_counts_of` each day, written directly."""
    keep = [category in ("all", name) for name in _CATEGORY_OF]
    items = []
    for (date_, stamp), (sent, (promoters, passives, detractors)) in zip(
        cal.utc, found, strict=True
    ):
        promoters = promoters if keep[0] else 0
        passives = passives if keep[1] else 0
        detractors = detractors if keep[2] else 0
        received = promoters + passives + detractors
        score = float(_frac(100 * (promoters - detractors), received))
        items.append(
            f'{{"date": "{date_}", "timestamp": {stamp}, "data": {{"total_sent": {sent}, '
            f'"total_received": {received}, "total_promoters": {promoters}, '
            f'"total_passives": {passives}, "total_detractors": {detractors}, '
            f'"nps_score": {score!r}}}}}'
        )
    return "[" + ", ".join(items) + "]"


def _averages(sums: Sequence[float], counts: Sequence[int]) -> list[float]:
    return [total / n if n else 0.0 for total, n in zip(sums, counts, strict=True)]


_Builder = Callable[[_Query], Any]

_RECORDS: dict[reports.ReportType, _Builder] = {
    reports.ReportType.SUMMARY: _summary,
    reports.ReportType.STATES_VOLUME: lambda q: _states_volume_of(*_states_volume_counts(q)),
    reports.ReportType.WORKFLOW_STATES: _workflow_states,
    reports.ReportType.CLASSIFICATIONS: _classifications,
    reports.ReportType.RESPONSE_VOLUME: lambda q: _response_volume_of(*_response_volume_sums(q)),
    reports.ReportType.USER_SUMMARY: _user_summary,
    reports.ReportType.USER_VOLUME: _user_volume,
    reports.ReportType.CASE_SUMMARY: _case_summary,
    reports.ReportType.CASE_VOLUME: lambda q: _case_volume_of(*_case_volume_counts(q)),
    reports.ReportType.CASE_CLASSIFICATIONS: _case_classifications,
    reports.ReportType.NPS_SUMMARY: lambda q: nps_summary_from(
        _nps_counts(q, q.surveys(_form(q)), _category(q))
    ),
    reports.ReportType.NPS_VOLUME: lambda q: _nps_days_of(
        *_nps_day_counts(q, _form(q), _category(q))
    ),
}
"""Each report computed record by record (any filters)."""

_DIGESTED: dict[reports.ReportType, _Builder] = {
    reports.ReportType.SUMMARY: _fast_summary,
    reports.ReportType.STATES_VOLUME: lambda q: _states_volume_of(*_fast_states_volume_counts(q)),
    reports.ReportType.WORKFLOW_STATES: _fast_workflow_states,
    reports.ReportType.CLASSIFICATIONS: _fast_classifications,
    reports.ReportType.RESPONSE_VOLUME: lambda q: _response_volume_of(
        *_fast_response_volume_sums(q)
    ),
    reports.ReportType.USER_SUMMARY: _fast_user_summary,
    reports.ReportType.USER_VOLUME: _fast_user_volume,
    reports.ReportType.CASE_SUMMARY: _fast_case_summary,
    reports.ReportType.CASE_VOLUME: lambda q: _case_volume_of(*_fast_case_volume_counts(q)),
    reports.ReportType.CASE_CLASSIFICATIONS: _fast_case_classifications,
    reports.ReportType.NPS_SUMMARY: lambda q: _fast_nps_summary(q, _form(q), _category(q)),
    reports.ReportType.NPS_VOLUME: lambda q: _nps_days_of(
        *_fast_nps_day_counts(q, _form(q), _category(q))
    ),
}
"""Each unfiltered report from the days' digests: the same payload."""


def _series_body(kind: reports.ReportType, q: _Query) -> str | None:
    """The JSON text of an unfiltered series report, or None for the other reports."""
    R = reports.ReportType
    if kind is R.STATES_VOLUME:
        return _states_volume_body(*_fast_states_volume_counts(q))
    if kind is R.RESPONSE_VOLUME:
        cal, sums, counts = _fast_response_volume_sums(q)
        return _values_body("avg_response_time", cal, _averages(sums, counts))
    if kind is R.CASE_VOLUME:
        return _values_body("open", *_fast_case_volume_counts(q))
    if kind is R.NPS_VOLUME:
        form, category = _form(q), _category(q)
        cal = q.buckets(hourly=False)
        return _nps_days_body(cal, _fast_nps_counts(_Digests(q), form, cal.bounds), category)
    return None


def _form(q: _Query) -> int:
    return int(q.params["form"])


def _category(q: _Query) -> str:
    return str(q.params.get("nps_category", "all"))


def build_report(
    kind: reports.ReportType,
    key: str,
    start: datetime,
    end: datetime,
    params: Mapping[str, Any],
    *,
    now: datetime | None = None,
    volume: int = DEFAULT_DAILY_VOLUME,
    digests: bool = True,
) -> Any:
    """The JSON payload of report ``kind`` for token ``key`` over [start, end], computed from
    that token's world as it stands at ``now`` (default: the current time).

    ``params`` are the body's other fields (form, nps_category, users, groups); a users or
    groups filter that is not a list of ids raises ValueError. An unfiltered report is
    read from the days' digests unless ``digests`` is False (record by record: the same
    payload, slower).
    """
    q = _Query(key, start, end, params, now or datetime.now(timezone.utc), volume)
    table = _DIGESTED if digests and q.filters.unfiltered else _RECORDS
    return table[kind](q)


def report_body(
    kind: reports.ReportType,
    key: str,
    start: datetime,
    end: datetime,
    params: Mapping[str, Any],
    *,
    now: datetime | None = None,
    volume: int = DEFAULT_DAILY_VOLUME,
) -> bytes:
    """``json.dumps(build_report(...), ensure_ascii=False)`` in UTF-8, what the sandbox
    sends; the series reports' text is written without building their payloads."""
    q = _Query(key, start, end, params, now or datetime.now(timezone.utc), volume)
    text = _series_body(kind, q) if q.filters.unfiltered else None
    if text is None:
        table = _DIGESTED if q.filters.unfiltered else _RECORDS
        text = json.dumps(table[kind](q), ensure_ascii=False)
    return text.encode("utf-8")
