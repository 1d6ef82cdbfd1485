"""The sandbox's world is one consistent history per token: for random tokens, ranges,
splits and filters, additive metrics of a range equal the sum over a split of it, a filter
never adds data, reports agree with each other and with the export rows, a long series
equals its slices, and nothing exists after "now".

The reports are computed by `_data.build_report` (what the sandbox serves; one test checks
that over HTTP); hypothesis draws the inputs, with few examples so the suite stays fast.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lexer_activity_async import wire
from lexer_activity_async.reports import ReportType as R
from lexer_activity_async.sandbox import Sandbox, _data, _world
from lexer_activity_async.sandbox._exports import world_rows

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
USER_IDS = [user["id"] for user in _data.USERS]
GROUP_IDS = [group["id"] for group in _data.GROUPS]
NPS_FORMS = sorted(_data.NPS_FORM_IDS)
FEW = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

keys = st.text("0123456789abcdef", min_size=8, max_size=8)
offsets = st.integers(-12, 14).map(lambda h: timezone(timedelta(hours=h)))
starts = st.datetimes(
    min_value=datetime(2018, 1, 1), max_value=datetime(2026, 5, 1), timezones=offsets
).map(lambda d: d.replace(microsecond=0))
lengths = st.integers(3600, 60 * 86400)
filters = st.fixed_dictionaries(
    {},
    optional={
        "users": st.lists(st.sampled_from([*USER_IDS, 424242]), max_size=3, unique=True),
        "groups": st.lists(st.sampled_from([*GROUP_IDS, 424242]), max_size=2, unique=True),
    },
)


def build(
    kind: R,
    key: str,
    start: datetime,
    end: datetime,
    params: Mapping[str, Any] | None = None,
    now: datetime = NOW,
) -> Any:
    return _data.build_report(kind, key, start, end, dict(params or {}), now=now)


def additive(kind: R, payload: Any) -> dict[str, float]:
    """The additive figures of a report, by name."""
    if kind is R.SUMMARY:
        names = ("total_volume", "total_responded_to", "broke_sla", "broke_action_sla")
        return {name: payload[name] for name in names}
    if kind is R.CASE_SUMMARY:
        return {"total_cases": payload["total_cases"]}
    if kind is R.NPS_SUMMARY:
        return {k: v for k, v in payload.items() if k.startswith("total_")}
    if kind is R.WORKFLOW_STATES:
        return {row["state"]: row["volume"] for row in payload}
    if kind in (R.CLASSIFICATIONS, R.CASE_CLASSIFICATIONS):
        return {f"{r['classification_id']}/{r.get('state')}": r["volume"] for r in payload}
    if kind is R.USER_VOLUME:
        return {f"{u['user_id']}/{s}": n for u in payload for s, n in u["states"].items()}
    assert kind is R.USER_SUMMARY
    names = ("mentions_assigned", "responded_to", "responded_to_in_private", "broke_sla")
    return {f"{u['user_id']}/{name}": u[name] for u in payload for name in names}


ADDITIVE = [
    R.SUMMARY,
    R.CASE_SUMMARY,
    R.NPS_SUMMARY,
    R.WORKFLOW_STATES,
    R.CLASSIFICATIONS,
    R.CASE_CLASSIFICATIONS,
    R.USER_VOLUME,
    R.USER_SUMMARY,
]


def add(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b) if a.get(k, 0) + b.get(k, 0)}


def nonzero(figures: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in figures.items() if v}


@FEW
@given(
    keys,
    starts,
    lengths,
    st.floats(0.01, 0.99),
    st.sampled_from(ADDITIVE),
    filters,
    st.sampled_from(NPS_FORMS),
)
def test_additive_metrics_of_a_range_are_the_sum_over_a_split(
    key: str,
    start: datetime,
    length: int,
    at: float,
    kind: R,
    params: dict[str, Any],
    form: int,
) -> None:
    end = start + timedelta(seconds=length)
    middle = start + timedelta(seconds=max(1, int(length * at)))
    if kind.needs_form:
        params = {**params, "form": form}
    whole = additive(kind, build(kind, key, start, end, params))
    left = additive(kind, build(kind, key, start, middle - timedelta(seconds=1), params))
    right = additive(kind, build(kind, key, middle, end, params))
    assert nonzero(whole) == add(left, right)


@FEW
@given(keys, starts, lengths, st.sampled_from(ADDITIVE), filters, st.sampled_from(NPS_FORMS))
def test_a_filter_never_adds_data(
    key: str, start: datetime, length: int, kind: R, params: dict[str, Any], form: int
) -> None:
    end = start + timedelta(seconds=length)
    base = {"form": form} if kind.needs_form else {}
    plain = additive(kind, build(kind, key, start, end, base))
    filtered = additive(kind, build(kind, key, start, end, {**base, **params}))
    for name, value in filtered.items():
        assert value <= plain.get(name, 0), name


@FEW
@given(keys, starts, lengths)
def test_an_unknown_user_or_group_gets_nothing(key: str, start: datetime, length: int) -> None:
    end = start + timedelta(seconds=length)
    unknown: tuple[dict[str, list[int]], ...] = (
        {"users": [424242]},
        {"groups": [424242]},
        {"users": []},
    )
    for params in unknown:
        assert build(R.SUMMARY, key, start, end, params)["total_volume"] == 0
        assert build(R.CASE_SUMMARY, key, start, end, params)["total_cases"] == 0
        assert build(R.USER_SUMMARY, key, start, end, params) == []
        assert build(R.WORKFLOW_STATES, key, start, end, params) == []
        nps = build(R.NPS_SUMMARY, key, start, end, {**params, "form": 55})
        assert nps["total_sent"] == nps["total_received"] == 0


@FEW
@given(keys, starts, lengths, st.lists(st.sampled_from(USER_IDS), min_size=2, unique=True))
def test_a_users_filter_is_the_sum_of_its_users(
    key: str, start: datetime, length: int, users: list[int]
) -> None:
    """A message has one agent, so filtering by several users adds their parts."""
    end = start + timedelta(seconds=length)
    together = additive(R.SUMMARY, build(R.SUMMARY, key, start, end, {"users": users}))
    parts: dict[str, float] = {}
    for user in users:
        parts = add(
            parts, additive(R.SUMMARY, build(R.SUMMARY, key, start, end, {"users": [user]}))
        )
    assert nonzero(together) == parts


@FEW
@given(keys, starts, lengths, filters)
def test_reports_agree_with_each_other(
    key: str, start: datetime, length: int, params: dict[str, Any]
) -> None:
    end = start + timedelta(seconds=length)

    def get(kind: R, **extra: Any) -> Any:
        return build(kind, key, start, end, {**params, **extra})

    summary = get(R.SUMMARY)
    for prefix in ("", "action_"):
        lo, med, hi, avg = (
            summary[f"{stat}_{prefix}response_time"] for stat in ("min", "median", "max", "avg")
        )
        assert lo <= med <= hi
        assert lo <= avg <= hi
        assert summary[f"median_{prefix}response_time_min"] == med / 60
    assert summary["broke_sla"] <= summary["total_responded_to"] <= summary["total_volume"]
    assert summary["broke_action_sla"] <= summary["total_responded_to"]
    states = {row["state"]: row["volume"] for row in get(R.WORKFLOW_STATES)}
    series = get(R.STATES_VOLUME)
    assert sum(states.values()) == summary["total_volume"]
    assert states == {
        s: sum(p["value"] for p in ps)
        for s, ps in series.items()
        if ps and sum(p["value"] for p in ps)
    }
    team = get(R.USER_SUMMARY)
    volume = get(R.USER_VOLUME)
    assert [u["mentions_assigned"] for u in team] == [u["states"]["all_states"] for u in volume]
    if "users" not in params and "groups" not in params:
        # Every answer has an agent, and every listed user is in the unfiltered team.
        assert sum(u["responded_to"] for u in team) == summary["total_responded_to"]
        assert sum(u["broke_sla"] for u in team) == summary["broke_sla"]
    nps = get(R.NPS_SUMMARY, form=55)
    days = get(R.NPS_VOLUME, form=55)
    for name in ("total_sent", "total_received", "total_promoters", "total_detractors"):
        assert nps[name] == sum(day["data"][name] for day in days)
    cases = get(R.CASE_SUMMARY)
    for row in get(R.CASE_CLASSIFICATIONS):
        assert row["volume"] <= cases["total_cases"]


@FEW
@given(keys, starts, st.integers(86400, 40 * 86400), filters)
def test_export_rows_come_from_the_same_events(
    key: str, start: datetime, length: int, params: dict[str, Any]
) -> None:
    end = start + timedelta(seconds=length)
    cases = world_rows("case_details", key, 24, start, end, params, NOW)
    assert len(cases) == build(R.CASE_SUMMARY, key, start, end, params)["total_cases"]
    summary = build(R.SUMMARY, key, start, end, params)
    mentions = world_rows("mention_sla_export", key, 24, start, end, params, NOW)
    assert len(mentions) == summary["total_volume"]
    waits = [float(str(fields[3])) for _, fields in mentions if fields[3] != ""]
    assert len(waits) == summary["total_responded_to"]
    if waits:  # the median is the median of the values themselves
        assert statistics.median(waits) == pytest_approx(summary["median_response_time"])
        assert max(waits) == pytest_approx(summary["max_response_time"])
    nps_params = {**params, "form": 123, "nps_category": "promoters"}
    submissions = world_rows("nps_submissions", key, 24, start, end, nps_params, NOW)
    assert len(submissions) == build(R.NPS_SUMMARY, key, start, end, nps_params)["total_received"]
    assert {fields[3] for _, fields in submissions} <= {"promoter"}


def pytest_approx(value: float) -> Any:
    import pytest

    return pytest.approx(value, abs=1e-3)


@FEW
@given(keys, st.dates(datetime(2018, 1, 1).date(), datetime(2026, 1, 1).date()), offsets)
def test_a_long_series_equals_its_monthly_slices(key: str, first: Any, tz: timezone) -> None:
    start = datetime(first.year, first.month, 1, tzinfo=tz)
    middle = (start + timedelta(days=32)).replace(day=1)
    end = (middle + timedelta(days=32)).replace(day=1) - timedelta(seconds=1)
    for kind in (R.STATES_VOLUME, R.CASE_VOLUME, R.RESPONSE_VOLUME, R.NPS_VOLUME):
        params = {"form": 56} if kind.needs_form else {}
        whole = build(kind, key, start, end, params)
        left = build(kind, key, start, middle - timedelta(seconds=1), params)
        right = build(kind, key, middle, end, params)
        if kind is R.NPS_VOLUME:
            assert whole == left + right
        else:
            assert whole == {name: left[name] + right[name] for name in whole}


GROWING = {
    R.SUMMARY: ("total_volume", "total_responded_to"),
    R.CASE_SUMMARY: ("total_cases",),
    R.NPS_SUMMARY: ("total_sent", "total_received"),
}


@FEW
@given(keys, st.integers(0, 30 * 86400), st.integers(1, 20 * 86400))
def test_nothing_exists_after_now(key: str, before: int, after: int) -> None:
    now = NOW - timedelta(seconds=before)
    start = now - timedelta(days=10)
    later = now + timedelta(seconds=after)
    for kind in ADDITIVE:
        params = {"form": 123} if kind.needs_form else {}
        upto = build(kind, key, start, now, params, now=now)
        assert build(kind, key, start, later, params, now=now) == upto
    # Seen later, the same range has the same messages and invitations, and more answers.
    grown = {kind: build(kind, key, start, now, {"form": 123}, now=later) for kind in GROWING}
    for kind, names in GROWING.items():
        seen = build(kind, key, start, now, {"form": 123}, now=now)
        for name in names:
            assert grown[kind][name] >= seen[name]
    assert (
        grown[R.SUMMARY]["total_volume"]
        == build(R.SUMMARY, key, start, now, now=now)["total_volume"]
    )
    future = build(R.SUMMARY, key, later, later + timedelta(days=3), now=now)
    assert future["total_volume"] == 0
    series = build(R.CASE_VOLUME, key, now - timedelta(days=1), now + timedelta(days=5), now=now)
    assert all(point["value"] == 0 for point in series["open"][2:])


quarter_hours = st.integers(-48, 56).map(lambda q: timezone(timedelta(minutes=15 * q)))
spans = st.one_of(
    st.integers(1, 3 * 86400),
    st.integers(3 * 86400, 70 * 86400),
    st.integers(300 * 86400, 400 * 86400),
)


def dumped(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


@settings(FEW, max_examples=30)
@given(
    keys,
    st.datetimes(datetime(2025, 1, 1), datetime(2026, 6, 20), timezones=quarter_hours),
    spans,
    st.sampled_from([*NPS_FORMS, 57]),
    st.sampled_from(["all", "promoters", "passives", "detractors"]),
    st.one_of(st.just(0), st.integers(-86400, 30 * 86400)),
    st.sampled_from([24, 3, 60]),
)
def test_digests_give_the_record_by_record_bytes(
    key: str,
    start: datetime,
    length: int,
    form: int,
    category: str,
    seen: int,
    volume: int,
) -> None:
    """Unfiltered reports read from the days' digests, and the series' JSON written
    directly, are byte for byte what walking the records gives: for ranges of partial days
    and months, in quarter-hour offsets (hourly and daily series), and "now" (``seen``
    seconds after the range's start) inside the range, where days are still changing."""
    start = start.replace(microsecond=0)
    end = start + timedelta(seconds=length)
    now = NOW if not seen else start + timedelta(seconds=seen)
    for kind in R:
        params: dict[str, Any] = {"form": form, "nps_category": category} if kind.needs_form else {}
        records = dumped(
            _data.build_report(kind, key, start, end, params, now=now, volume=volume, digests=False)
        )
        fast = _data.build_report(kind, key, start, end, params, now=now, volume=volume)
        assert dumped(fast) == records
        assert _data.report_body(kind, key, start, end, params, now=now, volume=volume) == records


def test_one_instant_in_two_offsets_gets_two_calendars() -> None:
    """Series periods (kept per range) follow the offset, not just the instants."""
    start = datetime(2025, 3, 1, tzinfo=timezone(timedelta(hours=10)))
    for tz in (timezone(timedelta(hours=10)), timezone.utc, timezone(timedelta(hours=-5))):
        first, last = start.astimezone(tz), start.astimezone(tz) + timedelta(days=40)
        for kind in (R.STATES_VOLUME, R.RESPONSE_VOLUME, R.CASE_VOLUME, R.NPS_VOLUME):
            params = {"form": 55} if kind.needs_form else {}
            expected = dumped(build(kind, "0123abcd", first, last, params))
            assert expected == dumped(
                _data.build_report(kind, "0123abcd", first, last, params, now=NOW, digests=False)
            )
            assert _data.report_body(kind, "0123abcd", first, last, params, now=NOW) == expected


def test_digests_are_bounded_like_days() -> None:
    """The digest LRU keeps as many days as the day LRU."""
    for ordinal in range(20_000, 20_000 + _world.DAY_CACHE_SIZE + 50):
        _world.digest("feedc0de", ordinal, 2, 2**40)
    assert len(_world._DIGESTS) == _world.DAY_CACHE_SIZE


def test_days_are_generated_once_and_bounded() -> None:
    """Generated days are kept in a bounded LRU, and a day is the same every time."""
    info = _world.day.cache_info()
    assert info.maxsize == _world.DAY_CACHE_SIZE
    first = _world.day("0123abcd", 20_000, 24)
    _world.day.cache_clear()
    assert _world.day("0123abcd", 20_000, 24) == first
    assert _world.day("0123abcd", 20_000, 48) != first  # volume is configurable
    assert len(_world.day("0123abcd", 20_000, 48).messages) > len(first.messages)


WORLD_FINGERPRINT = "5125717087d3cb1963f962fd0b1e3678ae0ed18c38b02c74b1ac409c8d152c78"
"""sha256 of the days below as first generated (before the generator was made faster): any
change to what a day holds, or to the order of its random draws, changes it."""


def test_days_are_the_same_world_as_ever() -> None:
    """Freshly generated days (not the LRU's) match the recorded fingerprint, and a cached
    day equals a freshly generated one."""
    digest = hashlib.sha256()
    for key in ("0123abcd", "feedc0de", "zz-not-hex", "9f86d081884c7d65"):
        for volume in (2, 24, 100):
            for ordinal in (0, 17_532, 20_000, 20_001, 20_005):
                fresh = _world.day.__wrapped__(key, ordinal, volume)
                assert _world.day(key, ordinal, volume) == fresh
                digest.update(repr(fresh).encode())
    assert digest.hexdigest() == WORLD_FINGERPRINT


def test_the_reference_example_ids_are_in_the_world() -> None:
    start = datetime(2018, 4, 1, tzinfo=timezone(timedelta(hours=11)))
    end = datetime(2018, 4, 30, 23, 59, 59, tzinfo=timezone(timedelta(hours=11)))
    team = {row["user_id"] for row in build(R.USER_SUMMARY, "feedc0de", start, end)}
    assert {"12345", "123", "789"} <= team
    barry = build(R.USER_SUMMARY, "feedc0de", start, end, {"users": [789]})
    assert [row["first_name"] for row in barry] == ["Barry"]
    assert barry[0]["mentions_assigned"] > 0
    classes = {row["classification_id"] for row in build(R.CLASSIFICATIONS, "feedc0de", start, end)}
    assert 1246 in classes
    assert 123 in classes
    assert build(R.NPS_SUMMARY, "feedc0de", start, end, {"form": 123})["total_sent"] > 0


async def test_the_sandbox_serves_the_world() -> None:
    """Over HTTP, the sandbox answers `build_report` for its "now" and daily volume."""
    async with (
        Sandbox(now=lambda: NOW, daily_volume=10) as sb,
        aiohttp.ClientSession() as session,
    ):
        start = NOW - timedelta(days=20)
        body = {
            "type": "summary",
            "date_from": start.isoformat(),
            "date_to": (NOW + timedelta(days=2)).isoformat(),
            "users": [12345],
        }
        headers = {"Auth-Api-Token": "world-token"}
        url = f"{sb.api_url}/activity/reports"
        async with session.post(url, json=body, headers=headers) as r:
            got = cast(dict[str, Any], wire.decode_json(r.status, await r.read()))
        async with session.post(url, json={**body, "users": "12345"}, headers=headers) as r:
            assert r.status == 404  # a filter that is not a list of ids is malformed
    key = Sandbox.key("world-token")
    params = {"users": [12345]}
    assert got == _data.build_report(
        R.SUMMARY, key, start, NOW + timedelta(days=2), params, now=NOW, volume=10
    )
    assert got["total_volume"] > 0
