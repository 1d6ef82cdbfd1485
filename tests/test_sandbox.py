"""The sandbox over real loopback HTTP: shapes, documented errors, the rate limit, the
file host (leaks, Range), every fault knob, data consistency and determinism."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import aiohttp
import pytest

from lexer_activity_async import exceptions, wire
from lexer_activity_async.limits import token_key
from lexer_activity_async.reports import ReportType
from lexer_activity_async.sandbox import (
    Faults,
    Sandbox,
    SandboxConfig,
    SandboxStats,
    config_for_port,
    serve_forever,
)
from lexer_activity_async.sandbox._exports import COLUMNS, parse_range

TOKEN = "tok-1"
OTHER = "tok-2"
NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)
APRIL = {"date_from": "2018-04-01T00:00:00+11:00", "date_to": "2018-04-30T23:59:59+11:00"}
NPS = {"form": 55, "nps_category": "all"}


class FakeClock:
    """A settable monotonic clock for the rate window."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(
        tokens=frozenset({TOKEN, OTHER}),
        max_requests=10_000,
        export_pending_seconds=0.05,
        now=lambda: NOW,
    ) as sb:
        yield sb


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def _headers(token: str | None = TOKEN) -> dict[str, str]:
    return {} if token is None else {"Auth-Api-Token": token}


async def post(
    sb: Sandbox, s: aiohttp.ClientSession, body: Any, token: str | None = TOKEN
) -> tuple[int, bytes]:
    async with s.post(f"{sb.api_url}/activity/reports", json=body, headers=_headers(token)) as r:
        return r.status, await r.read()


async def report(sb: Sandbox, s: aiohttp.ClientSession, kind: str, **body: Any) -> Any:
    status, raw = await post(sb, s, {"type": kind, **APRIL, **body})
    assert status == 200, raw
    return wire.decode_json(status, raw)


async def get(
    sb: Sandbox, s: aiohttp.ClientSession, path: str, token: str | None = TOKEN
) -> tuple[int, bytes]:
    async with s.get(f"{sb.api_url}{path}", headers=_headers(token)) as r:
        return r.status, await r.read()


async def poll(sb: Sandbox, s: aiohttp.ClientSession, report_token: str) -> tuple[int, Any]:
    url = f"{sb.status_url}/activity/reports/status"
    async with s.get(url, params={"token": report_token}, headers=_headers()) as r:
        return r.status, await r.json()


async def finished_export(
    sb: Sandbox, s: aiohttp.ClientSession, kind: str = "case_details", **body: Any
) -> dict[str, Any]:
    status, raw = await post(sb, s, {"type": kind, **APRIL, **body})
    assert status == 200
    job: dict[str, Any] = cast(dict[str, Any], wire.decode_json(status, raw))
    assert job["status"] == "pending"
    assert job["url"] is None
    for _ in range(200):
        code, answer = await poll(sb, s, job["token"])
        assert code == 200
        if answer["status"] != "pending":
            return dict(answer)
        await asyncio.sleep(0.02)
    raise AssertionError("export never finished")


async def download(s: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, Any, bytes]:
    async with s.get(url, headers=headers) as r:
        return r.status, r.headers, await r.read()


# -- shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "keys"),
    [
        (
            "/users",
            {
                "id",
                "email",
                "first_name",
                "last_name",
                "timezone",
                "gmtoffset",
                "sign_in_count",
                "last_sign_in_at",
                "archived",
                "groups",
            },
        ),
        ("/groups", {"id", "name", "comment"}),
        ("/forms", {"id", "name", "title", "archived", "created_at", "groups", "nps", "form_url"}),
    ],
)
async def test_lists(
    sandbox: Sandbox, session: aiohttp.ClientSession, path: str, keys: set[str]
) -> None:
    status, raw = await get(sandbox, session, path)
    assert status == 200
    items = wire.decode_json(status, raw)
    assert isinstance(items, list)
    assert items
    assert all(set(item) == keys for item in items)


@pytest.mark.parametrize("kind", list(ReportType))
async def test_every_report_decodes_with_the_client_models(
    sandbox: Sandbox, session: aiohttp.ClientSession, kind: ReportType
) -> None:
    extra = NPS if kind.needs_form else {}
    status, raw = await post(sandbox, session, {"type": kind.value, **APRIL, **extra})
    assert status == 200, raw
    tz = timezone(timedelta(hours=11))
    result = wire.decode_report(kind, status, raw, tz=tz)
    assert result is not None


async def test_shapes_match_reference_examples(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    summary = await report(sandbox, session, "summary")
    assert len(summary) == 16
    users = await report(sandbox, session, "user_summary")
    assert all(isinstance(u["user_id"], str) for u in users)
    assert len(users[0]) == 21
    team = await report(sandbox, session, "user_volume")
    assert all(isinstance(u["user_id"], int) for u in team)
    assert set(team[0]) == {"user_id", "first_name", "last_name", "states"}
    states = await report(sandbox, session, "states")
    assert all(set(row) == {"state", "volume"} for row in states)
    classes = await report(sandbox, session, "classifications")
    assert all(
        set(row) == {"classification_id", "classification", "state", "volume"} for row in classes
    )
    cases = await report(sandbox, session, "case_classifications")
    assert all(set(row) == {"classification_id", "classification", "volume"} for row in cases)
    assert set(await report(sandbox, session, "case_summary")) == {
        "total_cases",
        "first_reply_time",
        "resolution_time",
        "median_first_reply_time",
        "median_resolution_time",
        "agent_interactions",
        "agents_involved",
    }
    volume = await report(sandbox, session, "case_volume")
    assert set(volume) == {"open"}
    assert set(volume["open"][0]) == {"value", "date_range"}
    response = await report(sandbox, session, "response_volume")
    assert set(response) == {"avg_response_time"}
    series = await report(sandbox, session, "states_volume")
    for state, points in series.items():
        assert all(p["state"] == state for p in points)


async def test_workflow_states_type_is_configurable(session: aiohttp.ClientSession) -> None:
    async with Sandbox(workflow_states_type="workflow_states", now=lambda: NOW) as sb:
        assert (await post(sb, session, {"type": "workflow_states", **APRIL}))[0] == 200
        status, raw = await post(sb, session, {"type": "states", **APRIL})
        assert (status, wire.decode_json(status, raw)) == (
            400,
            {"error": "Invalid report - invalid type"},
        )


# -- documented errors ----------------------------------------------------------------


async def test_missing_and_wrong_tokens(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    for token in (None, ""):
        status, raw = await get(sandbox, session, "/users", token)
        assert (status, wire.decode_json(status, raw)) == (401, {"error": "Unauthorized"})
    status, raw = await get(sandbox, session, "/users", "nope")
    assert status == 401
    assert wire.decode_json(status, raw) == {"error": "Unauthorized - api token not matching"}
    async with session.get(
        f"{sandbox.status_url}/activity/reports/status", params={"token": "x"}
    ) as r:
        assert r.status == 401
    assert sandbox.stats.requests == {}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"type": "bogus", **APRIL}, 400, "Invalid report - invalid type"),
        (
            {
                "type": "summary",
                "date_from": "2018-01-01T00:00:00+00:00",
                "date_to": "2019-01-01T00:00:01+00:00",
            },
            400,
            "Invalid report - date range is too long",
        ),
        (
            {
                "type": "summary",
                "date_from": "2024-06-02T00:00:00+00:00",
                "date_to": "2024-06-03T00:00:00+00:00",
            },
            400,
            "Invalid report - starting date is a future date",
        ),
        ({"type": "summary"}, 404, "Not found"),
        ({"type": "summary", "date_from": "yesterday", "date_to": "today"}, 404, "Not found"),
        (
            {"type": "summary", "date_from": APRIL["date_to"], "date_to": APRIL["date_from"]},
            404,
            "Not found",
        ),
        ({"date_from": APRIL["date_from"], "date_to": APRIL["date_to"]}, 404, "Not found"),
        ([1, 2], 404, "Not found"),
        ({"type": "nps_summary", **APRIL}, 404, "Not found"),
        ({"type": "nps_summary", **APRIL, "form": 57}, 404, "Not found"),
        ({"type": "nps_volume", **APRIL, "form": 55, "nps_category": "fans"}, 404, "Not found"),
        ({"type": "nps_submissions", **APRIL, "form": "55"}, 404, "Not found"),
    ],
)
async def test_report_errors(
    sandbox: Sandbox, session: aiohttp.ClientSession, body: Any, status: int, message: str
) -> None:
    got, raw = await post(sandbox, session, body)
    assert (got, wire.decode_json(got, raw)) == (status, {"error": message})
    assert sandbox.stats.requests[token_key(TOKEN)] == 1  # errors count toward the limit


async def test_exactly_twelve_months_is_allowed(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    body = {
        "type": "summary",
        "date_from": "2018-01-31T00:00:00+00:00",
        "date_to": "2019-01-31T00:00:00+00:00",
    }
    assert (await post(sandbox, session, body))[0] == 200


async def test_unknown_paths_and_report_tokens(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    assert (await get(sandbox, session, "/nothing"))[0] == 404
    assert (await get(sandbox, session, "/activity/reports"))[0] == 404  # GET, not POST
    code, answer = await poll(sandbox, session, "no-such-token")
    assert (code, answer) == (404, {"error": "Not found"})
    job = await report(sandbox, session, "mention_sla_export")
    url = f"{sandbox.status_url}/activity/reports/status"
    async with session.get(url, params={"token": job["token"]}, headers=_headers(OTHER)) as r:
        assert r.status == 404  # another token's job
    assert sandbox.stats.status_polls["no-such-token"] == 1


# -- rate limit -----------------------------------------------------------------------


async def test_rate_limit_is_strict_and_slides(session: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    async with Sandbox(max_requests=5, window=300.0, clock=clock) as sb:
        key = token_key(TOKEN)
        for i in range(5):
            clock.t = 1000.0 + i
            assert (await get(sb, session, "/users"))[0] == 200
        clock.t = 1100.0
        status, raw = await get(sb, session, "/users")
        assert (status, wire.decode_json(status, raw)) == (429, {"error": "Rate limited exceeded"})
        assert sb.stats.requests[key] == 5
        assert sb.stats.rate_limited == 1
        assert sb.stats.rate_limited_by_token == {key: 1}
        assert (await get(sb, session, "/users", OTHER))[0] == 200  # budgets are per token
        clock.t = 1299.999  # the first arrival (t=1000) is still inside the window
        assert (await get(sb, session, "/users"))[0] == 429
        clock.t = 1300.0  # now it has left: exactly one slot frees
        assert (await get(sb, session, "/users"))[0] == 200
        assert (await get(sb, session, "/users"))[0] == 429
        clock.t = 1304.0  # arrivals at 1001..1004 left too
        for _ in range(4):
            assert (await get(sb, session, "/users"))[0] == 200
        assert (await get(sb, session, "/users"))[0] == 429
        assert sb.stats.max_in_window(key, 300.0) == 5
        assert sb.stats.requests[key] == len(sb.stats.arrivals[key]) == 10


async def test_status_polls_share_the_budget(session: aiohttp.ClientSession) -> None:
    async with Sandbox(max_requests=3, window=1e6, now=lambda: NOW) as sb:
        job = await report(sb, session, "case_details")
        await poll(sb, session, job["token"])
        await poll(sb, session, job["token"])
        code, answer = await poll(sb, session, job["token"])
        assert (code, answer) == (429, {"error": "Rate limited exceeded"})
        assert (await get(sb, session, "/users"))[0] == 429


def test_max_in_window() -> None:
    stats = SandboxStats(arrivals={"k": [0.0, 1.0, 2.0, 10.0, 10.5]})
    assert stats.max_in_window("k", 3.0) == 3
    assert stats.max_in_window("k", 9.0) == 3
    assert stats.max_in_window("k", 10.0) == 4  # [1, 11)
    assert stats.max_in_window("k", 10.5) == 4  # half-open: 10.5 is outside [0, 10.5)
    assert stats.max_in_window("k", 10.51) == 5
    assert stats.max_in_window("absent", 1.0) == 0


# -- file host ------------------------------------------------------------------------


async def test_file_host_refuses_the_token(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    done = await finished_export(sandbox, session)
    assert done["status"] == "complete"
    assert done["url"].startswith(f"{sandbox.files_url}/files/")
    status, _, _ = await download(session, done["url"], **{"Auth-Api-Token": TOKEN})
    assert status == 403
    assert sandbox.stats.leaks == 1
    status, headers, body = await download(session, done["url"])
    assert status == 200
    assert headers["Content-Type"] == "text/csv"
    assert int(headers["Content-Length"]) == len(body)
    assert sandbox.stats.file_requests == 2
    assert sandbox.stats.bytes_served == len(body)
    assert (await download(session, f"{sandbox.files_url}/files/guess/x.csv"))[0] == 404


async def test_range_requests(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    url = (await finished_export(sandbox, session))["url"]
    _, headers, full = await download(session, url)
    assert headers["Accept-Ranges"] == "bytes"
    size = len(full)
    for spec, (first, stop) in {
        "bytes=10-99": (10, 100),
        "bytes=1000-": (1000, size),
        "bytes=-50": (size - 50, size),
        f"bytes=5-{size + 100}": (5, size),
    }.items():
        status, got_headers, part = await download(session, url, Range=spec)
        assert status == 206
        assert got_headers["Content-Range"] == f"bytes {first}-{stop - 1}/{size}"
        assert int(got_headers["Content-Length"]) == stop - first
        assert part == full[first:stop]
    status, got_headers, _ = await download(session, url, Range=f"bytes={size}-")
    assert status == 416
    assert got_headers["Content-Range"] == f"bytes */{size}"
    status, _, body = await download(session, url, Range="bytes=0-1", **{"If-Range": '"other"'})
    assert (status, body) == (200, full)


def test_parse_range() -> None:
    assert parse_range("bytes=0-0", 10) == (0, 1)
    assert parse_range("bytes=3-1", 10) is None
    assert parse_range("bytes=0-1,4-5", 10) is None
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=-0", 10) == "unsatisfiable"
    assert parse_range("bytes=-20", 10) == (0, 10)


EXPORT_COUNTS = {
    "case_details": ("case_summary", "total_cases", {}),
    "nps_submissions": ("nps_summary", "total_received", NPS),
    "mention_sla_export": ("summary", "total_volume", {}),
}
"""Each export kind: the report and field counting its rows, and the body it needs."""


async def test_export_csv_content(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    for kind, (counted_by, field, extra) in EXPORT_COUNTS.items():
        done = await finished_export(sandbox, session, kind, **extra)
        _, _, body = await download(session, done["url"])
        text = body.decode("utf-8")
        rows = list(csv.reader(io.StringIO(text, newline="")))
        assert tuple(rows[0]) == COLUMNS[kind]
        count = (await report(sandbox, session, counted_by, **extra))[field]
        assert count > 0
        assert len(rows) == 1 + count
        assert all(len(row) == len(rows[0]) for row in rows)
        joined = "".join(row[-1] for row in rows) + "".join(r[-2] for r in rows)
        for needle in ('"', "\n", ",", "é", "日本", "🎉"):
            assert needle in joined or needle in text


async def test_nps_export_respects_category(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    done = await finished_export(
        sandbox, session, "nps_submissions", form=56, nps_category="detractors"
    )
    _, _, body = await download(session, done["url"])
    rows = list(csv.DictReader(io.StringIO(body.decode(), newline="")))
    assert {row["category"] for row in rows} == {"detractor"}
    assert all(0 <= int(row["score"]) <= 6 and row["form_id"] == "56" for row in rows)


async def test_exact_export_size(session: aiohttp.ClientSession) -> None:
    async with Sandbox(export_size_bytes=123_457, export_pending_seconds=0, now=lambda: NOW) as sb:
        url = (await finished_export(sb, session))["url"]
        _, headers, body = await download(session, url)
        assert len(body) == int(headers["Content-Length"]) == 123_457
        rows = list(csv.reader(io.StringIO(body.decode(), newline="")))
        assert all(len(row) == len(COLUMNS["case_details"]) for row in rows)


# -- faults ---------------------------------------------------------------------------


async def test_fail_next(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.fail_next(503, 2, path_contains="/groups")
    assert (await get(sandbox, session, "/users"))[0] == 200
    assert (await get(sandbox, session, "/groups"))[0] == 503
    assert (await get(sandbox, session, "/groups"))[0] == 503
    assert (await get(sandbox, session, "/groups"))[0] == 200
    sandbox.faults.fail_next(429, retry_after="7")
    async with session.get(f"{sandbox.api_url}/users", headers=_headers()) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "7"
        assert await r.json() == {"error": "Rate limited exceeded"}
    sandbox.faults.fail_next(500)
    status, raw = await post(sandbox, session, {"type": "summary", **APRIL})
    assert isinstance(wire.map_error(status, raw), exceptions.ServerError)
    assert sandbox.stats.errors_injected == 4
    assert sandbox.stats.requests[token_key(TOKEN)] == 6  # injected failures count


async def test_drop_next(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.drop_next(path_contains="/activity/reports")
    assert (await get(sandbox, session, "/users"))[0] == 200
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await post(sandbox, session, {"type": "summary", **APRIL})
    # aiohttp retries an idempotent request once on a dropped connection, so a GET
    # needs two drops to surface (the server sees both attempts).
    sandbox.faults.drop_next(2, path_contains="/reports/status")
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await poll(sandbox, session, "whatever")
    assert (await poll(sandbox, session, "whatever"))[0] == 404
    assert sandbox.stats.requests[token_key(TOKEN)] == 5
    assert sandbox.stats.errors_injected == 3


async def test_malformed_next(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.malformed_next(body=b'{"total_volume": "many"}')
    status, raw = await post(sandbox, session, {"type": "summary", **APRIL})
    assert status == 200
    with pytest.raises(exceptions.UnexpectedResponseError):
        wire.decode_report(ReportType.SUMMARY, status, raw)
    status, raw = await post(sandbox, session, {"type": "summary", **APRIL})
    wire.decode_report(ReportType.SUMMARY, status, raw)


async def test_drop_download(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    url = (await finished_export(sandbox, session))["url"]
    sandbox.faults.drop_download_after = 1000
    sandbox.faults.drop_download_count = 2
    for _ in range(2):
        with pytest.raises(aiohttp.ClientPayloadError):
            await download(session, url)
    status, _, body = await download(session, url)
    assert status == 200
    assert len(body) > 1000


async def test_expired_urls_are_reissued(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    done = await finished_export(sandbox, session)
    sandbox.faults.expire_urls = 1
    assert (await download(session, done["url"]))[0] == 410
    assert (await download(session, done["url"]))[0] == 410  # stays expired
    code, again = await poll(sandbox, session, done["token"])
    assert code == 200
    assert again["status"] == "complete"
    assert again["url"] != done["url"]
    status, _, fresh = await download(session, again["url"])
    assert status == 200
    code, third = await poll(sandbox, session, done["token"])
    assert third["url"] == again["url"]  # still valid, not re-minted
    assert fresh


async def test_ranges_off(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    url = (await finished_export(sandbox, session))["url"]
    sandbox.faults.ranges = False
    status, headers, body = await download(session, url, Range="bytes=0-9")
    assert status == 200
    assert "Accept-Ranges" not in headers
    assert len(body) > 10


async def test_failed_and_stuck_jobs(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    sandbox.faults.fail_jobs = 1
    failed = await finished_export(sandbox, session)
    assert (failed["status"], failed["url"]) == ("failed", None)
    assert (await finished_export(sandbox, session))["status"] == "complete"
    sandbox.faults.never_complete = True
    job = await report(sandbox, session, "case_details")
    await asyncio.sleep(0.1)
    assert (await poll(sandbox, session, job["token"]))[1]["status"] == "pending"
    sandbox.faults.reset()
    assert sandbox.faults == Faults()
    assert (await poll(sandbox, session, job["token"]))[1]["status"] == "complete"
    assert sandbox.stats.exports_started == 3


async def test_latency(session: aiohttp.ClientSession) -> None:
    async with Sandbox(latency=0.2) as sb:
        started = time.monotonic()
        assert (await get(sb, session, "/users"))[0] == 200
        assert time.monotonic() - started >= 0.2


# -- data consistency -----------------------------------------------------------------


async def test_summary_consistency(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    s = await report(sandbox, session, "summary")
    for prefix in ("", "action_"):
        lo, med, hi = (s[f"{k}_{prefix}response_time"] for k in ("min", "median", "max"))
        assert lo <= med <= hi
        assert lo <= s[f"avg_{prefix}response_time"] <= hi
        for stat in ("avg", "median"):
            minutes = s[f"{stat}_{prefix}response_time_min"]
            assert minutes == pytest.approx(s[f"{stat}_{prefix}response_time"] / 60)
    assert s["total_responded_to"] <= s["total_volume"]
    assert s["broke_sla"] <= s["total_responded_to"]
    assert s["broke_action_sla"] <= s["total_responded_to"]


def _frac(a: int, b: int) -> float:
    return a / b if b else 0.0


@pytest.mark.parametrize("token", [TOKEN, OTHER])
async def test_user_summary_consistency(
    sandbox: Sandbox, session: aiohttp.ClientSession, token: str
) -> None:
    status, raw = await post(sandbox, session, {"type": "user_summary", **APRIL}, token)
    for u in cast(list[dict[str, Any]], wire.decode_json(status, raw)):
        responded = u["responded_to"]
        assert u["total_responded_to"] == responded <= u["mentions_assigned"]
        assert u["fraction_responded_to"] == pytest.approx(_frac(responded, u["mentions_assigned"]))
        assert u["fraction_responded_to_in_private"] == pytest.approx(
            _frac(u["responded_to_in_private"], responded)
        )
        assert u["fraction_broke_sla"] == pytest.approx(_frac(u["broke_sla"], responded))
        assert u["fraction_broke_action_sla"] == pytest.approx(
            _frac(u["broke_action_sla"], responded)
        )
        assert u["avg_response_time_min"] == pytest.approx(u["avg_response_time"] / 60)
        assert u["min_response_time"] <= u["avg_response_time"] <= u["max_response_time"]


async def test_volume_consistency(sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
    for user in await report(sandbox, session, "user_volume"):
        states = dict(user["states"])
        all_states, closed = states.pop("all_states"), states.pop("all_closed_states")
        assert all_states == sum(states.values())
        closed_states = ("closed", "irrelevant", "duplicate", "no_response_required")
        assert closed == sum(states[s] for s in closed_states)
    by_class: dict[int, dict[str, int]] = {}
    for row in await report(sandbox, session, "classifications"):
        by_class.setdefault(row["classification_id"], {})[row["state"]] = row["volume"]
    for states in by_class.values():
        assert states.pop("all_states") == sum(states.values())
    series = await report(sandbox, session, "states_volume")
    totals = {row["state"]: row["volume"] for row in await report(sandbox, session, "states")}
    assert totals == {
        state: sum(p["value"] for p in points)
        for state, points in series.items()
        if sum(p["value"] for p in points)
    }


@pytest.mark.parametrize("category", ["all", "promoters", "passives", "detractors"])
async def test_nps_consistency(
    sandbox: Sandbox, session: aiohttp.ClientSession, category: str
) -> None:
    body = {"form": 55, "nps_category": category}
    summary = await report(sandbox, session, "nps_summary", **body)
    days = await report(sandbox, session, "nps_volume", **body)
    names = (
        "total_sent",
        "total_received",
        "total_promoters",
        "total_passives",
        "total_detractors",
    )
    for data in [summary, *(d["data"] for d in days)]:
        parts = data["total_promoters"] + data["total_passives"] + data["total_detractors"]
        assert parts == data["total_received"] <= data["total_sent"]
        expected = _frac(
            100 * (data["total_promoters"] - data["total_detractors"]), data["total_received"]
        )
        assert data["nps_score"] == pytest.approx(expected)
        if category != "all":
            others = {"total_promoters", "total_passives", "total_detractors"}
            others.discard(f"total_{category}")
            assert all(data[name] == 0 for name in others)
    assert {n: summary[n] for n in names} == {n: sum(d["data"][n] for d in days) for n in names}
    # one entry per local day of +11:00: 30 days of April, midnight expressed in UTC
    assert len(days) == 30
    assert days[0]["date"] == "2018-03-31T13:00:00+00:00"
    assert days[1]["timestamp"] == 1522587600
    for day in days:
        moment = datetime.fromisoformat(day["date"])
        assert moment.utcoffset() == timedelta(0)
        assert int(moment.timestamp()) == day["timestamp"]
        assert moment.astimezone(timezone(timedelta(hours=11))).hour == 0


def _labels(points: list[Any]) -> list[str]:
    return [p["date_range"]["date_from"] for p in points]


def _expected(first: str, count: int, step: timedelta) -> list[str]:
    start = datetime.strptime(first, "%Y-%m-%d %H:%M")
    return [(start + i * step).strftime("%Y-%m-%d %H:%M") for i in range(count)]


@pytest.mark.parametrize(
    ("kind", "date_to", "hourly"),
    [
        ("states_volume", "2018-04-05T00:29:59+11:00", True),  # < 4 days
        ("states_volume", "2018-04-05T00:30:00+11:00", False),  # exactly 4 days
        ("response_volume", "2018-04-04T00:30:00+11:00", True),  # exactly 3 days
        ("response_volume", "2018-04-04T00:30:01+11:00", False),  # > 3 days
        ("case_volume", "2018-04-02T00:30:00+11:00", False),  # always daily
    ],
)
async def test_series_cover_the_range(
    sandbox: Sandbox, session: aiohttp.ClientSession, kind: str, date_to: str, hourly: bool
) -> None:
    date_from = "2018-04-01T00:30:00+11:00"
    payload = await report(sandbox, session, kind, date_from=date_from, date_to=date_to)
    start = datetime.fromisoformat(date_from)
    end = datetime.fromisoformat(date_to)
    if hourly:
        count = (
            int((end.replace(minute=0, second=0) - start.replace(minute=0)).total_seconds() // 3600)
            + 1
        )
        expected = _expected("2018-04-01 00:00", count, timedelta(hours=1))
    else:
        expected = _expected(
            "2018-04-01 00:00", (end.date() - start.date()).days + 1, timedelta(days=1)
        )
    for points in payload.values():
        assert _labels(points) == expected


async def test_series_use_the_request_offset(
    sandbox: Sandbox, session: aiohttp.ClientSession
) -> None:
    # date_to given in UTC is read on date_from's wall clock (+11:00): 2018-04-10 02:00.
    payload = await report(
        sandbox,
        session,
        "case_volume",
        date_from="2018-04-01T10:00:00+11:00",
        date_to="2018-04-09T15:00:00+00:00",
    )
    assert _labels(payload["open"]) == _expected("2018-04-01 00:00", 10, timedelta(days=1))


# -- determinism ----------------------------------------------------------------------


async def test_determinism(session: aiohttp.ClientSession) -> None:
    bodies: list[list[bytes]] = []
    for _ in range(2):
        async with Sandbox(now=lambda: NOW, export_pending_seconds=0) as sb:
            got = []
            for kind in ReportType:
                extra = NPS if kind.needs_form else {}
                got.append((await post(sb, session, {"type": kind.value, **APRIL, **extra}))[1])
            got.append((await download(session, (await finished_export(sb, session))["url"]))[2])
            got.append((await post(sb, session, {"type": "summary", **APRIL}, OTHER))[1])
            bodies.append(got)
    assert bodies[0] == bodies[1]
    assert bodies[0][0] != bodies[0][-1]  # another token gets other numbers


# -- configuration --------------------------------------------------------------------


def test_config_helpers() -> None:
    config = config_for_port(8700, latency=0.1)
    assert (config.api_port, config.status_port, config.files_port) == (8700, 8701, 8702)
    assert config.latency == 0.1
    assert config_for_port(0).api_port == 0
    sandbox = Sandbox(SandboxConfig(max_requests=7), window=5.0)
    assert (sandbox.config.max_requests, sandbox.config.window) == (7, 5.0)
    with pytest.raises(RuntimeError):
        _ = sandbox.api_url


def _three_free_ports() -> int:
    """A base port P with P, P+1 and P+2 free a moment ago (tried until found)."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + 2 > 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b, socket.socket() as c:
                for sock, port in ((a, base), (b, base + 1), (c, base + 2)):
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no three consecutive free loopback ports")


async def test_fixed_ports_and_restart(session: aiohttp.ClientSession) -> None:
    async with Sandbox(config_for_port(_three_free_ports())) as first:
        port = int(first.api_url.split(":")[2].split("/")[0])
    sb = Sandbox(config_for_port(port))  # the same ports again, just freed
    await sb.start()
    try:
        assert sb.api_url == f"http://127.0.0.1:{port}/v1"
        assert sb.status_url == f"http://127.0.0.1:{port + 1}/api/public/v1"
        assert sb.files_url == f"http://127.0.0.1:{port + 2}"
        assert (await get(sb, session, "/forms"))[0] == 200
    finally:
        await sb.close()


async def test_close_removes_export_files(session: aiohttp.ClientSession) -> None:
    async with Sandbox(now=lambda: NOW, export_pending_seconds=0) as sb:
        await finished_export(sb, session)
        directory = sb._store._dir
        assert directory is not None
        assert list(directory.iterdir())
    assert not directory.exists()


async def test_serve_forever_prints_urls(capsys: pytest.CaptureFixture[str]) -> None:
    task = asyncio.ensure_future(serve_forever(SandboxConfig()))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if "Files:" in capsys.readouterr().out:
            break
    else:
        raise AssertionError("no URLs printed")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
