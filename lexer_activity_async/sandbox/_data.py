"""Deterministic, internally consistent synthetic data for the sandbox's reports.

Every report is a pure function of (token key, report type, range, other body fields):
a `random.Random` is seeded from a sha256 of those, so the same request always gets the
same bytes. The account (users, groups, forms) is the same for every token, so tests and
benchmarks can use the reference's ids (form 55 is an NPS survey) without a lookup.

Consistency rules kept (asserted by ``tests/test_sandbox.py``):
- times in seconds, ``*_min`` = seconds / 60, min <= median <= max, min <= avg <= max;
- responded_to <= volume, broke_sla and broke_action_sla <= responded_to;
- user_summary fractions divide by responded_to, except fraction_responded_to
  (by mentions_assigned), as the reference's examples do; 0.0 when dividing by zero;
- user_volume ``all_states`` = sum of the states, ``all_closed_states`` = the sum of
  `CLOSED_STATES` (closed, irrelevant, duplicate, no_response_required: the states that
  end a message's handling);
- classifications' ``all_states`` = sum of that classification's per-state volumes;
- the workflow-state totals equal the sums of states_volume's series for the same range;
- NPS: promoters + passives + detractors = received <= sent; nps_score is the Net Promoter
  Score, not the average its description says; nps_summary equals the sum of nps_volume's days.

Series periods are labelled on the wall clock of the request's ``date_from`` offset and cover
the range exactly (first period contains date_from, last contains date_to). nps_volume has
one entry per local day the range touches; ``date`` is that day's local midnight in UTC, so
April 1 at +11:00 is ``2018-03-31T13:00:00+00:00`` (the reference's example list starts a
day later; its values are all zero and its range truncated, so we read it as illustrative).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from .. import reports

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
    "build_report",
]

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
)

NPS_FORM_IDS = frozenset(form["id"] for form in FORMS if form["nps"])

CLASSIFICATIONS: tuple[tuple[int, str], ...] = (
    (123, "amusing"),
    (143, "customer service"),
    (466, "positive"),
    (526, "social nps"),
    (528, "feedback"),
    (1246, "complaint"),
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


def _scale(start: datetime, end: datetime) -> int:
    return max(1, round((end - start).total_seconds() / 86400))


def _times(rng: random.Random, count: int) -> tuple[float, float, float, float]:
    """(min, median, max, avg) of ``count`` response times in seconds; zeros when none."""
    if count == 0:
        return 0.0, 0.0, 0.0, 0.0
    low = rng.uniform(1.0, 120.0)
    if count == 1:
        return low, low, low, low
    median = low + rng.uniform(0.0, 5000.0)
    high = median + rng.uniform(0.0, 1_500_000.0)
    return low, median, high, rng.uniform(low, high)


def _frac(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _summary(rng: random.Random, scale: int) -> dict[str, Any]:
    volume = rng.randint(5, 120) * scale
    responded = rng.randint(1, volume)
    lo, med, hi, avg = _times(rng, responded)
    alo, amed, ahi, aavg = _times(rng, responded)
    return {
        "total_volume": volume,
        "avg_response_time": avg,
        "avg_action_response_time": aavg,
        "total_responded_to": responded,
        "broke_sla": rng.randint(0, responded),
        "broke_action_sla": rng.randint(0, responded),
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


def _states_volume(seed: tuple[object, ...], start: datetime, end: datetime) -> dict[str, Any]:
    rng = rng_for("states_volume", *seed)
    hourly = reports.hourly_states_volume(start, end)
    top = 6 if hourly else 60
    starts = periods(start, end, hourly)
    return {
        state: [
            {
                "state": state,
                "value": rng.randint(0, top),
                "date_range": {"date_from": _period_label(p)},
            }
            for p in starts
        ]
        for state in STATES
    }


def _workflow_states(seed: tuple[object, ...], start: datetime, end: datetime) -> list[Any]:
    series = _states_volume(seed, start, end)
    totals: list[dict[str, Any]] = [
        {"state": state, "volume": sum(int(p["value"]) for p in points)}
        for state, points in series.items()
    ]
    kept = [row for row in totals if row["volume"] > 0]
    return sorted(kept, key=lambda row: -int(row["volume"]))


def _classifications(rng: random.Random, scale: int) -> list[Any]:
    out: list[dict[str, Any]] = []
    for cid, name in rng.sample(CLASSIFICATIONS, rng.randint(2, 6)):
        rows: list[dict[str, Any]] = [
            {
                "classification_id": cid,
                "classification": name,
                "state": s,
                "volume": rng.randint(1, 9 * scale),
            }
            for s in rng.sample(STATES, rng.randint(1, 4))
        ]
        total = sum(row["volume"] for row in rows)
        rows.insert(
            rng.randint(0, len(rows)),
            {
                "classification_id": cid,
                "classification": name,
                "state": "all_states",
                "volume": total,
            },
        )
        out.extend(rows)
    return out


def _value_series(
    rng: random.Random,
    start: datetime,
    end: datetime,
    hourly: bool,
    low: float,
    high: float,
    integer: bool = False,
) -> list[Any]:
    out = []
    for p in periods(start, end, hourly):
        value: float = rng.randint(int(low), int(high)) if integer else rng.uniform(low, high)
        out.append({"value": value, "date_range": {"date_from": _period_label(p)}})
    return out


def _user_summary(rng: random.Random, scale: int) -> list[Any]:
    out = []
    for user in USERS:
        mentions = rng.randint(0, 15 * scale)
        responded = rng.randint(0, mentions)
        private = rng.randint(0, responded)
        broke = rng.randint(0, responded)
        broke_action = rng.randint(0, responded)
        lo, _, hi, avg = _times(rng, responded)
        alo, _, ahi, aavg = _times(rng, responded)
        out.append(
            {
                "first_name": user["first_name"],
                "last_name": user["last_name"],
                "mentions_assigned": mentions,
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
                "fraction_responded_to": _frac(responded, mentions),
                "fraction_responded_to_in_private": _frac(private, responded),
                "fraction_broke_sla": _frac(broke, responded),
                "fraction_broke_action_sla": _frac(broke_action, responded),
            }
        )
    return out


def _user_volume(rng: random.Random, scale: int) -> list[Any]:
    out = []
    for user in USERS:
        counts = {s: (rng.randint(0, 20 * scale) if rng.random() < 0.6 else 0) for s in STATES}
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


def _case_summary(rng: random.Random, scale: int) -> dict[str, Any]:
    cases = rng.randint(1, 20 * scale)
    first = rng.uniform(60.0, 400_000.0)
    return {
        "total_cases": cases,
        "first_reply_time": first,
        "resolution_time": first + rng.uniform(0.0, 300_000.0),
        "median_first_reply_time": rng.uniform(30.0, first),
        "median_resolution_time": rng.uniform(first / 2, first + 200_000.0),
        "agent_interactions": round(rng.uniform(1.0, 5.0), 1),
        "agents_involved": round(rng.uniform(1.0, 2.0), 1),
    }


def _case_classifications(rng: random.Random, scale: int) -> list[Any]:
    picked = sorted(rng.sample(CLASSIFICATIONS, rng.randint(1, len(CLASSIFICATIONS))))
    return [
        {"classification_id": cid, "classification": name, "volume": rng.randint(1, 5 * scale)}
        for cid, name in picked
    ]


_CATEGORY_OF = {
    "promoters": "total_promoters",
    "passives": "total_passives",
    "detractors": "total_detractors",
}


def nps_summary_from(counts: Mapping[str, int]) -> dict[str, Any]:
    """An NPS summary from its counts; nps_score = 100 * (promoters - detractors) / received."""
    received = counts["total_received"]
    score = _frac(100 * (counts["total_promoters"] - counts["total_detractors"]), received)
    return {**counts, "nps_score": float(score)}


def _nps_day(key: str, form: int, category: str, day: datetime) -> dict[str, int]:
    rng = rng_for("nps-day", key, form, day.isoformat())
    sent = rng.randint(0, 12)
    received = rng.randint(0, sent)
    counts = {"total_promoters": 0, "total_passives": 0, "total_detractors": 0}
    for _ in range(received):
        counts[rng.choices(list(_CATEGORY_OF.values()), weights=(6, 2, 2))[0]] += 1
    if category != "all":
        keep = _CATEGORY_OF[category]
        counts = {name: (value if name == keep else 0) for name, value in counts.items()}
    return {"total_sent": sent, "total_received": sum(counts.values()), **counts}


def _nps_days(key: str, form: int, category: str, start: datetime, end: datetime) -> list[Any]:
    out = []
    for day in local_days(start, end):
        utc = day.astimezone(timezone.utc)
        out.append(
            {
                "date": utc.isoformat(),
                "timestamp": int(utc.timestamp()),
                "data": nps_summary_from(_nps_day(key, form, category, day)),
            }
        )
    return out


def _nps_summary(key: str, form: int, category: str, start: datetime, end: datetime) -> Any:
    totals = dict.fromkeys(
        ("total_sent", "total_received", "total_promoters", "total_passives", "total_detractors"), 0
    )
    for day in local_days(start, end):
        for name, value in _nps_day(key, form, category, day).items():
            totals[name] += value
    return nps_summary_from(totals)


def build_report(
    kind: reports.ReportType,
    key: str,
    start: datetime,
    end: datetime,
    params: Mapping[str, Any],
) -> Any:
    """The JSON payload of report ``kind`` for token ``key`` over [start, end].

    ``params`` are the body's other fields (form, nps_category, filters): they take part in
    the seed, so a filtered request gets different (but stable) numbers.
    """
    extra = json.dumps(params, sort_keys=True, default=str)
    seed: tuple[object, ...] = (key, start.isoformat(), end.isoformat(), extra)
    rng = rng_for(kind.value, *seed)
    scale = _scale(start, end)
    R = reports.ReportType
    if kind is R.SUMMARY:
        return _summary(rng, scale)
    if kind is R.STATES_VOLUME:
        return _states_volume(seed, start, end)
    if kind is R.WORKFLOW_STATES:
        return _workflow_states(seed, start, end)
    if kind is R.CLASSIFICATIONS:
        return _classifications(rng, scale)
    if kind is R.RESPONSE_VOLUME:
        hourly = reports.hourly_response_volume(start, end)
        return {"avg_response_time": _value_series(rng, start, end, hourly, 30.0, 400_000.0)}
    if kind is R.USER_SUMMARY:
        return _user_summary(rng, scale)
    if kind is R.USER_VOLUME:
        return _user_volume(rng, scale)
    if kind is R.CASE_SUMMARY:
        return _case_summary(rng, scale)
    if kind is R.CASE_VOLUME:
        return {"open": _value_series(rng, start, end, False, 0, 25, integer=True)}
    if kind is R.CASE_CLASSIFICATIONS:
        return _case_classifications(rng, scale)
    form, category = int(params["form"]), str(params.get("nps_category", "all"))
    if kind is R.NPS_SUMMARY:
        return _nps_summary(key, form, category, start, end)
    return _nps_days(key, form, category, start, end)
