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
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from .. import reports
from . import _world as w
from ._world import ACTION_SLA_SECONDS, SLA_SECONDS, Filters, epoch, median

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
]

DEFAULT_DAILY_VOLUME = 24
"""Messages a token's world receives on a weekday, on average (60 % of that at weekends)."""

STATES = (
    "new",
    "assigned",
    "in_progress",
    "responded",
    "awaiting_approval",
    "redirected",
    "irrelevant",
    "duplicate",
    "closed",
    "no_response_required",
)
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
    return moment.strftime("%Y-%m-%d %H:%M")


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

    def buckets(self, hourly: bool) -> tuple[list[datetime], list[int]]:
        """Period starts (labels) and their epoch seconds."""
        starts = periods(self.start, self.end, hourly)
        return starts, [epoch(p) for p in starts]

    def responded(self, m: w.Message) -> bool:
        return 0 < m.responded_at <= self.now


def _stats(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(min, median, max, avg) of ``values``; zeros when there are none."""
    if not values:
        return 0.0, 0.0, 0.0, 0.0
    return min(values), median(values), max(values), sum(values) / len(values)


def _summary(q: _Query) -> dict[str, Any]:
    msgs = q.messages()
    answered = [m for m in msgs if q.responded(m)]
    waits = [m.responded_at - m.at for m in answered]
    actions = [m.responded_at - m.assigned_at for m in answered]
    lo, med, hi, avg = _stats(waits)
    alo, amed, ahi, aavg = _stats(actions)
    return {
        "total_volume": len(msgs),
        "avg_response_time": avg,
        "avg_action_response_time": aavg,
        "total_responded_to": len(answered),
        "broke_sla": sum(1 for t in waits if t > SLA_SECONDS),
        "broke_action_sla": sum(1 for t in actions if t > ACTION_SLA_SECONDS),
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


def _states_volume(q: _Query) -> dict[str, Any]:
    starts, bounds = q.buckets(reports.hourly_states_volume(q.start, q.end))
    counts = {state: [0] * len(starts) for state in STATES}
    for m in q.messages():
        counts[m.state(q.now)][bisect_right(bounds, m.at) - 1] += 1
    labels = [_period_label(p) for p in starts]
    return {
        state: [
            {"state": state, "value": value, "date_range": {"date_from": label}}
            for value, label in zip(values, labels, strict=True)
        ]
        for state, values in counts.items()
    }


def _state_counts(q: _Query, msgs: Iterable[w.Message]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for m in msgs:
        counts[m.state(q.now)] += 1
    return counts


def _workflow_states(q: _Query) -> list[Any]:
    counts = _state_counts(q, q.messages())
    kept = [{"state": s, "volume": v} for s, v in counts.items() if v > 0]
    return sorted(kept, key=lambda row: -int(row["volume"]))


_CLASS_NAMES = dict(CLASSIFICATIONS)


def _classifications(q: _Query) -> list[Any]:
    by_class: dict[int, dict[str, int]] = {}
    for m in q.messages():
        if m.classes:
            state = m.state(q.now)
            for cid in m.classes:
                states = by_class.setdefault(cid, {})
                states[state] = states.get(state, 0) + 1
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


def _response_volume(q: _Query) -> dict[str, Any]:
    starts, bounds = q.buckets(reports.hourly_response_volume(q.start, q.end))
    sums = [0.0] * len(starts)
    counts = [0] * len(starts)
    for m in q.messages():
        if q.responded(m):
            index = bisect_right(bounds, m.at) - 1
            sums[index] += m.responded_at - m.at
            counts[index] += 1
    return {
        "avg_response_time": [
            {"value": total / n if n else 0.0, "date_range": {"date_from": _period_label(p)}}
            for p, total, n in zip(starts, sums, counts, strict=True)
        ]
    }


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


def _user_summary(q: _Query) -> list[Any]:
    mine = _by_agent(m for m in q.messages() if 0 < m.assigned_at <= q.now)
    out = []
    for user in _team(q):
        assigned = mine.get(user["id"], [])
        answered = [m for m in assigned if q.responded(m)]
        waits = [m.responded_at - m.at for m in answered]
        actions = [m.responded_at - m.assigned_at for m in answered]
        lo, _, hi, avg = _stats(waits)
        alo, _, ahi, aavg = _stats(actions)
        responded = len(answered)
        private = sum(1 for m in answered if m.private)
        broke = sum(1 for t in waits if t > SLA_SECONDS)
        broke_action = sum(1 for t in actions if t > ACTION_SLA_SECONDS)
        out.append(
            {
                "first_name": user["first_name"],
                "last_name": user["last_name"],
                "mentions_assigned": len(assigned),
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
                "fraction_responded_to": _frac(responded, len(assigned)),
                "fraction_responded_to_in_private": _frac(private, responded),
                "fraction_broke_sla": _frac(broke, responded),
                "fraction_broke_action_sla": _frac(broke_action, responded),
            }
        )
    return out


def _user_volume(q: _Query) -> list[Any]:
    mine = _by_agent(m for m in q.messages() if 0 < m.assigned_at <= q.now)
    out = []
    for user in _team(q):
        counts = _state_counts(q, mine.get(user["id"], []))
        states = {
            "all_states": sum(counts.values()),
            "all_closed_states": sum(counts[s] for s in CLOSED_STATES),
            **counts,
        }
        out.append(
            {
                "user_id": user["id"],
                "first_name": user["first_name"],
                "last_name": user["last_name"],
                "states": states,
            }
        )
    return out


def _case_summary(q: _Query) -> dict[str, Any]:
    closed = q.closed_cases()
    firsts = [c.first_reply_at - c.created_at for c in closed]
    resolutions = [c.last_reply_at - c.created_at for c in closed]
    n = len(closed)
    return {
        "total_cases": n,
        "first_reply_time": sum(firsts) / n if n else 0.0,
        "resolution_time": sum(resolutions) / n if n else 0.0,
        "median_first_reply_time": median(firsts),
        "median_resolution_time": median(resolutions),
        "agent_interactions": sum(len(c.agents) for c in closed) / n if n else 0.0,
        "agents_involved": sum(len(set(c.agents)) for c in closed) / n if n else 0.0,
    }


def _case_volume(q: _Query) -> dict[str, Any]:
    """Cases open at some moment of each day's part of the range (and by "now")."""
    starts, bounds = q.buckets(hourly=False)
    stop = min(q.last, q.now)
    # Each period runs from its start (or the range's) to the next period's start - 1 s.
    lows = [max(b, q.first) for b in bounds]
    highs = [min(b - 1, stop) for b in bounds[1:]] + [stop]
    counts = [0] * len(starts)
    for c in w.cases(q.key, q.volume, q.first, stop, q.now, q.filters):
        for i in range(max(0, bisect_right(bounds, c.created_at) - 1), len(starts)):
            if lows[i] > highs[i] or c.closed_at < lows[i]:
                break
            counts[i] += 1
    return {
        "open": [
            {"value": n, "date_range": {"date_from": _period_label(p)}}
            for p, n in zip(starts, counts, strict=True)
        ]
    }


def _case_classifications(q: _Query) -> list[Any]:
    counts: dict[int, int] = {}
    for c in q.closed_cases():
        for cid in c.classes:
            counts[cid] = counts.get(cid, 0) + 1
    return [
        {"classification_id": cid, "classification": _CLASS_NAMES[cid], "volume": counts[cid]}
        for cid in sorted(counts)
    ]


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


def _nps_counts(q: _Query, found: Iterable[w.Survey], category: str) -> dict[str, int]:
    counts = {"total_sent": 0, "total_received": 0}
    counts.update(dict.fromkeys(_CATEGORY_OF.values(), 0))
    for s in found:
        counts["total_sent"] += 1
        if 0 < s.submitted_at <= q.now:
            name = nps_category(s.score)
            if category in ("all", name):
                counts[_CATEGORY_OF[name]] += 1
                counts["total_received"] += 1
    return counts


def _nps_days(q: _Query, form: int, category: str) -> list[Any]:
    starts, bounds = q.buckets(hourly=False)
    per_day: list[list[w.Survey]] = [[] for _ in starts]
    for s in q.surveys(form):
        per_day[bisect_right(bounds, s.sent_at) - 1].append(s)
    out = []
    for day, found in zip(starts, per_day, strict=True):
        utc = day.astimezone(timezone.utc)
        out.append(
            {
                "date": utc.isoformat(),
                "timestamp": int(utc.timestamp()),
                "data": nps_summary_from(_nps_counts(q, found, category)),
            }
        )
    return out


def build_report(
    kind: reports.ReportType,
    key: str,
    start: datetime,
    end: datetime,
    params: Mapping[str, Any],
    *,
    now: datetime | None = None,
    volume: int = DEFAULT_DAILY_VOLUME,
) -> Any:
    """The JSON payload of report ``kind`` for token ``key`` over [start, end], computed from
    that token's world as it stands at ``now`` (default: the current time).

    ``params`` are the body's other fields (form, nps_category, users, groups); a users or
    groups filter that is not a list of ids raises ValueError.
    """
    q = _Query(key, start, end, params, now or datetime.now(timezone.utc), volume)
    R = reports.ReportType
    if kind is R.SUMMARY:
        return _summary(q)
    if kind is R.STATES_VOLUME:
        return _states_volume(q)
    if kind is R.WORKFLOW_STATES:
        return _workflow_states(q)
    if kind is R.CLASSIFICATIONS:
        return _classifications(q)
    if kind is R.RESPONSE_VOLUME:
        return _response_volume(q)
    if kind is R.USER_SUMMARY:
        return _user_summary(q)
    if kind is R.USER_VOLUME:
        return _user_volume(q)
    if kind is R.CASE_SUMMARY:
        return _case_summary(q)
    if kind is R.CASE_VOLUME:
        return _case_volume(q)
    if kind is R.CASE_CLASSIFICATIONS:
        return _case_classifications(q)
    form, category = int(params["form"]), str(params.get("nps_category", "all"))
    if kind is R.NPS_SUMMARY:
        return nps_summary_from(_nps_counts(q, q.surveys(form), category))
    return _nps_days(q, form, category)
