"""LexerClient over real loopback HTTP against the sandbox: every endpoint, every
validation rule, every error mapping, the client's lifecycle and the token's secrecy.

The sandbox answers deterministically (`sandbox._data.build_report` is a pure function of
token, type, range and the body's other fields), so each result is compared with what the
server computes for exactly the request the client should have sent: a wrong date, a
missing filter or a dropped field changes the numbers. aioresponses (through the
``mock_http`` fixture, which works around its aiohttp 3.13+ incompatibility) supplies the
few responses that must be byte-exact: the reference's invalid users example, an HTML
502 page, a redirect, and the captured request body of a filtered report.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import socket
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import aiohttp
import anyio
import payloads  # tests/ is on sys.path
import pytest
from aioresponses import aioresponses
from conftest import (
    NOW,
    TOKEN_A,
    TOKEN_B,
    ClientFor,
    LoopbackServer,
    MakeClient,
    SandboxFactory,
)
from otel_memory import Telemetry
from yarl import URL

from lexer_activity_async import (
    APIError,
    ClientClosedError,
    ConfigurationError,
    DateRangeTooLongError,
    FutureStartDateError,
    InvalidReportTypeError,
    LexerClient,
    LexerConnectionError,
    LexerError,
    LexerTimeoutError,
    LimiterRegistry,
    MissingTokenError,
    NotFoundError,
    RequestTimeoutError,
    RetryPolicy,
    ServerError,
    TokenMismatchError,
    UnexpectedResponseError,
    ValidationError,
    exports,
    wire,
)
from lexer_activity_async import models as m
from lexer_activity_async.client import api_session
from lexer_activity_async.events import RateLimited, RateLimitWait, Retrying
from lexer_activity_async.limits import SlidingWindowLimiter
from lexer_activity_async.logs import FIELDS, JsonFormatter
from lexer_activity_async.reports import ReportType
from lexer_activity_async.sandbox import Sandbox, _data
from lexer_activity_async.sandbox._exports import ExportJob

AEDT = timezone(timedelta(hours=11))
APR_FROM = datetime(2026, 4, 1, tzinfo=AEDT)
APR_TO = datetime(2026, 4, 30, 23, 59, 59, tzinfo=AEDT)
JAN = datetime(2026, 1, 1, tzinfo=timezone.utc)
FEB = datetime(2026, 2, 1, tzinfo=timezone.utc)
KEY_A = Sandbox.key(TOKEN_A)
KEY_B = Sandbox.key(TOKEN_B)
WRONG_TOKEN = "not-a-valid-token-5f1e2d3c4b"
FAST = RetryPolicy(max_retries=3, base=0.01, cap=0.02)
MOCK_API = "https://api.lexer.test/v1"
MOCK_STATUS = "https://clients.lexer.test/api/public/v1"
UNWRITTEN = f"{tempfile.gettempdir()}/lexer-activity-never-written.csv"
"""An export destination for calls that must fail before anything is written."""

NPS_KINDS = (ReportType.NPS_SUMMARY, ReportType.NPS_VOLUME)


def expected(
    kind: ReportType,
    start: datetime,
    end: datetime,
    params: dict[str, Any] | None = None,
    *,
    token: str = TOKEN_A,
) -> Any:
    """What the sandbox answers for exactly this request, decoded as the client should."""
    params = dict(params or {})
    if kind in NPS_KINDS:
        params.setdefault("nps_category", "all")
    payload = _data.build_report(kind, Sandbox.key(token), start, end, params)
    assert start.tzinfo is not None
    return wire.decode_report(kind, 200, json.dumps(payload).encode(), tz=start.tzinfo)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- every endpoint ---------------------------------------------------------------------


async def test_users_groups_forms(make_client: MakeClient, sandbox: Sandbox) -> None:
    async with make_client() as client:
        users = await client.users()
        groups = await client.groups()
        forms = await client.forms()

    assert users == m.converter.structure(list(_data.USERS), list[m.User])
    assert [u.id for u in users] == [12345, 123, 789, 4242]
    assert users[0].last_sign_in_at == datetime(2018, 3, 21, 6, 9, 1, tzinfo=timezone.utc)
    assert users[2].last_sign_in_at is None
    assert users[0].groups == (123, 456, 789)
    assert groups == m.converter.structure(list(_data.GROUPS), list[m.Group])
    assert groups[2].comment is None
    assert {f.id for f in forms if f.nps} == {55, 56, 123}  # 55 and 123: the reference's
    assert forms[0].created_at == datetime(2018, 5, 26, 21, 54, 19, tzinfo=timezone.utc)
    assert sandbox.stats.requests == {KEY_A: 3}


TYPED_CALLS: list[tuple[str, ReportType, dict[str, Any], Any]] = [
    ("summary", ReportType.SUMMARY, {}, m.Summary),
    ("states_volume", ReportType.STATES_VOLUME, {}, m.StatesVolume),
    ("workflow_states", ReportType.WORKFLOW_STATES, {}, list),
    ("classifications", ReportType.CLASSIFICATIONS, {}, list),
    ("response_volume", ReportType.RESPONSE_VOLUME, {}, m.ResponseVolume),
    ("user_summary", ReportType.USER_SUMMARY, {}, list),
    ("user_volume", ReportType.USER_VOLUME, {}, list),
    ("case_summary", ReportType.CASE_SUMMARY, {}, m.CaseSummary),
    ("case_volume", ReportType.CASE_VOLUME, {}, m.CaseVolume),
    ("case_classifications", ReportType.CASE_CLASSIFICATIONS, {}, list),
    ("nps_summary", ReportType.NPS_SUMMARY, {"form": 55}, m.NpsSummary),
    ("nps_volume", ReportType.NPS_VOLUME, {"form": 55}, list),
    ("nps_summary", ReportType.NPS_SUMMARY, {"form": 56, "nps_category": "detractors"}, None),
    ("nps_volume", ReportType.NPS_VOLUME, {"form": 55, "nps_category": "promoters"}, None),
]


@pytest.mark.parametrize(
    ("method", "kind", "kwargs", "result_type"),
    TYPED_CALLS,
    ids=[f"{c[0]}-{'-'.join(map(str, c[2].values())) or 'plain'}" for c in TYPED_CALLS],
)
async def test_every_typed_report(
    make_client: MakeClient,
    sandbox: Sandbox,
    method: str,
    kind: ReportType,
    kwargs: dict[str, Any],
    result_type: type[object] | None,
) -> None:
    async with make_client() as client:
        result = await getattr(client, method)(APR_FROM, APR_TO, **kwargs)
        stats = client.stats

    assert result == expected(kind, APR_FROM, APR_TO, kwargs)
    if result_type is not None:
        assert isinstance(result, result_type)
    assert sandbox.stats.requests == {KEY_A: 1}
    assert stats.requests == 1
    assert stats.retries == 0


async def test_generic_report_by_name_and_enum_matches_typed_methods(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    async with make_client() as client:
        for kind in ReportType:
            kw: dict[str, Any] = {"form": 55} if kind in NPS_KINDS else {}
            by_name = await client.report(kind.value, APR_FROM, APR_TO, **kw)
            by_enum = await client.report(kind, APR_FROM, APR_TO, **kw)
            assert by_name == by_enum == expected(kind, APR_FROM, APR_TO, kw), kind
    assert sandbox.stats.requests == {KEY_A: 2 * len(ReportType)}


def _assert_series(
    points: tuple[Any, ...], start: datetime, end: datetime, step: timedelta
) -> None:
    """Points labelled in the request's offset, one per ``step``, covering [start, end]."""
    starts = [p.date_from for p in points]
    assert all(s.utcoffset() == start.utcoffset() for s in starts)
    assert all(b - a == step for a, b in itertools.pairwise(starts))
    assert starts[0] <= start < starts[0] + step
    assert starts[-1] <= end < starts[-1] + step


@pytest.mark.parametrize(
    ("start", "end", "hourly"),
    [
        (APR_FROM, APR_TO, False),
        (APR_FROM + timedelta(hours=10.5), APR_FROM + timedelta(days=2, hours=10.5), True),
        (APR_FROM, APR_FROM + timedelta(days=4) - timedelta(seconds=1), True),
        (APR_FROM, APR_FROM + timedelta(days=4), False),
        # date_to in another offset: the points stay on date_from's wall clock.
        (APR_FROM, datetime(2026, 4, 2, 12, 0, tzinfo=timezone.utc), True),
    ],
    ids=["month-daily", "2-days-hourly", "just-under-4-days-hourly", "4-days-daily", "mixed-tz"],
)
async def test_states_volume_granularity_and_offsets(
    make_client: MakeClient, start: datetime, end: datetime, hourly: bool
) -> None:
    async with make_client() as client:
        result = await client.states_volume(start, end)

    assert result == expected(ReportType.STATES_VOLUME, start, end)
    assert set(result.states) == set(_data.STATES)
    step = timedelta(hours=1) if hourly else timedelta(days=1)
    for state, points in result.states.items():
        assert all(p.state == state for p in points)
        _assert_series(points, start, end, step)
    if not hourly and start == APR_FROM and end == APR_TO:
        first = result.states["closed"][0].date_from
        assert first == datetime(2026, 4, 1, tzinfo=AEDT)
        assert first.isoformat() == "2026-04-01T00:00:00+11:00"
        assert len(result.states["closed"]) == 30


@pytest.mark.parametrize(
    ("end", "hourly"),
    [
        (APR_FROM + timedelta(days=3), True),
        (APR_FROM + timedelta(days=3, seconds=1), False),
        (APR_FROM + timedelta(hours=5), True),
        (APR_TO, False),
    ],
    ids=["exactly-3-days-hourly", "over-3-days-daily", "5-hours", "month"],
)
async def test_response_volume_granularity(
    make_client: MakeClient, end: datetime, hourly: bool
) -> None:
    async with make_client() as client:
        result = await client.response_volume(APR_FROM, end)
        cases = await client.case_volume(APR_FROM, end)

    assert result == expected(ReportType.RESPONSE_VOLUME, APR_FROM, end)
    _assert_series(result.avg_response_time, APR_FROM, end, timedelta(hours=1 if hourly else 24))
    # case_volume is daily whatever the range.
    _assert_series(cases.open, APR_FROM, end, timedelta(days=1))


async def test_user_summary_ids_are_ints_and_user_volume_sums(make_client: MakeClient) -> None:
    async with make_client() as client:
        summary = await client.user_summary(APR_FROM, APR_TO)
        volume = await client.user_volume(APR_FROM, APR_TO)

    # The server sends user_summary's user_id as a string ("123"), user_volume's as a number.
    assert [row.user_id for row in summary] == [u["id"] for u in _data.USERS]
    assert all(type(row.user_id) is int for row in summary + volume)
    for row in volume:
        assert row.states["all_states"] == sum(
            v for k, v in row.states.items() if k not in ("all_states", "all_closed_states")
        )


async def test_nps_volume_days_and_summary_agree(make_client: MakeClient) -> None:
    async with make_client() as client:
        days = await client.nps_volume(APR_FROM, APR_TO, form=55)
        summary = await client.nps_summary(APR_FROM, APR_TO, form=55)

    assert len(days) == 30
    # Local midnight at +11:00 is 13:00 UTC the day before.
    assert days[0].date == datetime(2026, 3, 31, 13, 0, tzinfo=timezone.utc)
    assert days[0].timestamp == int(days[0].date.timestamp())
    assert summary.total_received == sum(d.data.total_received for d in days)
    assert summary.total_sent == sum(d.data.total_sent for d in days)


async def test_workflow_states_default_type_totals_states_volume(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    async with make_client() as client:
        totals = await client.workflow_states(APR_FROM, APR_TO)
        series = await client.states_volume(APR_FROM, APR_TO)

    assert totals == expected(ReportType.WORKFLOW_STATES, APR_FROM, APR_TO)
    assert all(isinstance(row, m.WorkflowState) for row in totals)
    sums = {state: sum(p.value for p in points) for state, points in series.states.items()}
    assert {row.state: row.volume for row in totals} == {k: v for k, v in sums.items() if v}


async def test_workflow_states_type_configured_on_both_sides(
    sandbox_factory: SandboxFactory, client_for: ClientFor
) -> None:
    renamed = await sandbox_factory(workflow_states_type="workflow_states")
    async with client_for(renamed, workflow_states_type="workflow_states") as client:
        typed = await client.workflow_states(APR_FROM, APR_TO)
        by_name = await client.report("workflow_states", APR_FROM, APR_TO)
        with pytest.raises(ValidationError):  # "states" means nothing on this client
            await client.report("states", APR_FROM, APR_TO)

    assert typed == by_name == expected(ReportType.WORKFLOW_STATES, APR_FROM, APR_TO)
    assert renamed.stats.requests == {KEY_A: 2}


async def test_workflow_states_type_mismatch_is_the_servers_invalid_type(
    sandbox: Sandbox,
    sandbox_factory: SandboxFactory,
    client_for: ClientFor,
    make_client: MakeClient,
) -> None:
    async with make_client(workflow_states_type="workflow_states") as client:
        with pytest.raises(InvalidReportTypeError) as info:
            await client.workflow_states(APR_FROM, APR_TO)
    assert info.value.status == 400
    assert info.value.report_type == "workflow_states"
    assert info.value.message == "Invalid report - invalid type"
    assert sandbox.stats.requests == {KEY_A: 1}  # a 400 is not retried

    renamed = await sandbox_factory(workflow_states_type="workflow_states")
    async with client_for(renamed) as client:
        with pytest.raises(InvalidReportTypeError) as info:
            await client.workflow_states(APR_FROM, APR_TO)
    assert info.value.report_type == "states"
    assert renamed.stats.requests == {KEY_A: 1}


async def test_users_groups_and_extra_filters_reach_the_server(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    extra = {"channel": "twitter", "archived": False}
    filters = {"users": [123, 789], "groups": [456], **extra}
    async with make_client() as client:
        filtered = await client.report(
            "summary", APR_FROM, APR_TO, users=[123, 789], groups=[456], extra_filters=extra
        )
        plain = await client.report("summary", APR_FROM, APR_TO)
        nps = await client.report(
            "nps_summary",
            APR_FROM,
            APR_TO,
            form=55,
            users=[123],
            extra_filters={"region": "apac"},
        )

    # The sandbox seeds each answer with the body's other fields: the filtered answer is the
    # one computed for exactly these fields, and differs from the unfiltered one.
    assert filtered == expected(ReportType.SUMMARY, APR_FROM, APR_TO, filters)
    assert plain == expected(ReportType.SUMMARY, APR_FROM, APR_TO)
    assert filtered != plain
    assert nps == expected(
        ReportType.NPS_SUMMARY, APR_FROM, APR_TO, {"form": 55, "users": [123], "region": "apac"}
    )


async def test_report_body_on_the_wire(mock_http: aioresponses, registry: LimiterRegistry) -> None:
    payload = _data.build_report(ReportType.SUMMARY, KEY_A, APR_FROM, APR_TO, {})
    mock_http.post(MOCK_API + "/activity/reports", payload=payload)
    async with LexerClient(TOKEN_A, api_url=MOCK_API, registry=registry, now=lambda: NOW) as c:
        result = await c.report(
            "summary",
            APR_FROM,
            APR_TO,
            users=(123, 789),
            groups=[456],
            forms=[55],
            extra_filters={"channel": "twitter"},
        )

    assert result == m.converter.structure(payload, m.Summary)
    [call] = mock_http.requests[("POST", URL(MOCK_API + "/activity/reports"))]
    assert json.loads(call.kwargs["data"]) == {
        "type": "summary",
        "date_from": "2026-04-01T00:00:00+11:00",
        "date_to": "2026-04-30T23:59:59+11:00",
        "users": [123, 789],
        "groups": [456],
        "forms": [55],
        "channel": "twitter",
    }
    headers = call.kwargs["headers"]
    assert headers["Auth-Api-Token"] == TOKEN_A
    assert headers["Content-Type"] == "application/json"
    assert call.kwargs["allow_redirects"] is False


async def test_many_reports_concurrently_on_one_client(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    ranges = [
        (APR_FROM, APR_TO),
        (APR_FROM, APR_FROM + timedelta(days=2)),
        (JAN, FEB),
    ]
    calls: list[tuple[ReportType, datetime, datetime, dict[str, Any]]] = [
        (kind, lo, hi, {"form": 55} if kind in NPS_KINDS else {})
        for kind in ReportType
        for lo, hi in ranges
    ]
    results: dict[int, Any] = {}

    async with make_client() as client:

        async def run(i: int) -> None:
            kind, lo, hi, kw = calls[i]
            results[i] = await client.report(kind, lo, hi, **kw)

        async with anyio.create_task_group() as group:
            for i in range(len(calls)):
                group.start_soon(run, i)
        users, forms = await asyncio.gather(client.users(), client.forms())
        stats = client.stats

    for i, (kind, lo, hi, kw) in enumerate(calls):
        assert results[i] == expected(kind, lo, hi, kw), (kind, lo, hi)
    assert len(users) == 4
    assert len(forms) == len(_data.FORMS)
    assert sandbox.stats.requests == {KEY_A: len(calls) + 2} == {KEY_A: stats.requests}


async def test_two_tokens_are_counted_apart(make_client: MakeClient, sandbox: Sandbox) -> None:
    async with make_client(TOKEN_A) as a, make_client(TOKEN_B) as b:
        ra, rb = await asyncio.gather(a.summary(JAN, FEB), b.summary(JAN, FEB))
    assert ra == expected(ReportType.SUMMARY, JAN, FEB, token=TOKEN_A)
    assert rb == expected(ReportType.SUMMARY, JAN, FEB, token=TOKEN_B)
    assert ra != rb
    assert sandbox.stats.requests == {KEY_A: 1, KEY_B: 1}


async def test_exactly_twelve_months_is_accepted_by_both_sides(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    async with make_client() as client:
        result = await client.summary(
            datetime(2025, 6, 1, tzinfo=timezone.utc), datetime(2026, 6, 1, tzinfo=timezone.utc)
        )
    assert isinstance(result, m.Summary)
    assert sandbox.stats.requests == {KEY_A: 1}


# -- validation before any request ------------------------------------------------------

Call = Callable[[LexerClient], Awaitable[Any]]

VALIDATION: list[tuple[str, Call]] = [
    ("naive-date_from", lambda c: c.summary(datetime(2026, 1, 1), FEB)),
    ("naive-date_to", lambda c: c.states_volume(JAN, datetime(2026, 2, 1))),
    ("not-a-datetime", lambda c: c.summary("2026-01-01T00:00:00+00:00", FEB)),  # type: ignore[arg-type]
    ("from-equals-to", lambda c: c.summary(JAN, JAN)),
    ("from-after-to", lambda c: c.case_volume(FEB, JAN)),
    (
        "over-12-months",
        lambda c: c.summary(
            datetime(2025, 1, 1, tzinfo=timezone.utc),
            datetime(2026, 1, 1, 0, 0, 1, tzinfo=timezone.utc),
        ),
    ),
    (
        "over-12-months-mixed-offsets",
        lambda c: c.summary(
            datetime(2025, 1, 1, tzinfo=AEDT), datetime(2025, 12, 31, 13, 0, 1, tzinfo=timezone.utc)
        ),
    ),
    ("future-start", lambda c: c.summary(NOW + timedelta(seconds=1), NOW + timedelta(days=1))),
    ("nps_summary-without-form", lambda c: c.report("nps_summary", JAN, FEB)),
    ("nps_volume-without-form", lambda c: c.report(ReportType.NPS_VOLUME, JAN, FEB)),
    ("nps-form-not-int", lambda c: c.nps_volume(JAN, FEB, form="55")),  # type: ignore[arg-type]
    ("nps-form-bool", lambda c: c.nps_summary(JAN, FEB, form=True)),
    ("nps-bad-category", lambda c: c.nps_summary(JAN, FEB, form=55, nps_category="fans")),
    ("form-on-non-nps", lambda c: c.report("summary", JAN, FEB, form=55)),
    ("unknown-type", lambda c: c.report("bogus", JAN, FEB)),
    ("export-kind-case_details", lambda c: c.report("case_details", JAN, FEB)),
    ("export-kind-nps_submissions", lambda c: c.report("nps_submissions", JAN, FEB, form=55)),
    ("export-kind-mention_sla_export", lambda c: c.report("mention_sla_export", JAN, FEB)),
    ("users-not-ints", lambda c: c.report("summary", JAN, FEB, users=["123"])),  # type: ignore[list-item]
    ("groups-a-string", lambda c: c.report("summary", JAN, FEB, groups="456")),  # type: ignore[arg-type]
    (
        "filter-clashes-with-type",
        lambda c: c.report("summary", JAN, FEB, extra_filters={"type": "nps_summary"}),
    ),
    ("filter-clashes-with-users", lambda c: c.summary(JAN, FEB, extra_filters={"users": [1]})),
    ("filter-nan", lambda c: c.summary(JAN, FEB, extra_filters={"score": float("nan")})),
    (
        "filter-infinity",
        lambda c: c.nps_summary(JAN, FEB, form=55, extra_filters={"min": float("-inf")}),
    ),
    ("filter-not-json", lambda c: c.user_volume(JAN, FEB, extra_filters={"since": NOW})),
    (
        "export-filter-nan",
        lambda c: c.start_export("case_details", JAN, FEB, extra_filters={"score": float("nan")}),
    ),
    (
        "export-filter-set",
        lambda c: c.export(
            "mention_sla_export", JAN, FEB, UNWRITTEN, extra_filters={"ids": {1, 2}}
        ),
    ),
    (
        "export-forms-on-nps",
        lambda c: c.start_export("nps_submissions", JAN, FEB, form=55, forms=[55]),
    ),
    ("unknown-export-kind", lambda c: c.start_export("bogus", JAN, FEB)),
    (
        "export-over-12-months-start",
        lambda c: c.start_export("case_details", datetime(2024, 1, 1, tzinfo=timezone.utc), FEB),
    ),
    ("export-naive", lambda c: c.start_export("case_details", datetime(2026, 1, 1), FEB)),
    ("export-nps-without-form", lambda c: c.start_export("nps_submissions", JAN, FEB)),
    ("empty-report-token", lambda c: c.export_status("")),
]


@pytest.mark.parametrize(("name", "call"), VALIDATION, ids=[v[0] for v in VALIDATION])
async def test_validation_spends_no_budget(
    make_client: MakeClient, sandbox: Sandbox, name: str, call: Call
) -> None:
    async with make_client() as client:
        with pytest.raises(ValidationError) as info:
            await call(client)
        stats = client.stats

    assert isinstance(info.value, ValueError)
    assert sandbox.stats.requests == {}
    assert sandbox.stats.arrivals == {}
    assert sandbox.stats.unauthorized == 0
    assert stats.requests == 0


# -- an explicit API surface: typos are TypeErrors, filters are named -----------------------

PLAIN_REPORT_METHODS = [c for c in TYPED_CALLS if not c[2]]
PUBLIC_CALLS: list[tuple[str, Callable[..., Any]]] = [
    *[
        (name, lambda c, name=name: getattr(c, name)(APR_FROM, APR_TO, group=[123]))
        for name, *_ in PLAIN_REPORT_METHODS
    ],
    ("nps_summary", lambda c: c.nps_summary(APR_FROM, APR_TO, form=55, group=[123])),
    ("nps_volume", lambda c: c.nps_volume(APR_FROM, APR_TO, form=55, user=[1])),
    ("report", lambda c: c.report("summary", APR_FROM, APR_TO, group=[123])),
    ("report-filters", lambda c: c.report("summary", APR_FROM, APR_TO, filters={"a": 1})),
    ("users", lambda c: c.users(group=[123])),
    ("groups", lambda c: c.groups(retries=1)),
    ("forms", lambda c: c.forms(nps=True)),
    ("start_export", lambda c: c.start_export("case_details", JAN, FEB, group=[123])),
    ("export", lambda c: c.export("case_details", JAN, FEB, UNWRITTEN, group=[123])),
    ("export-windows", lambda c: c.export("case_details", JAN, FEB, UNWRITTEN, window=2)),
    ("export_rows", lambda c: c.export_rows("case_details", JAN, FEB, group=[123])),
]


@pytest.mark.parametrize(("name", "call"), PUBLIC_CALLS, ids=[c[0] for c in PUBLIC_CALLS])
async def test_a_misspelt_keyword_is_a_type_error_before_any_request(
    make_client: MakeClient, sandbox: Sandbox, name: str, call: Callable[..., Any]
) -> None:
    async with make_client() as client:
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            await call(client)
        stats = client.stats

    assert stats.requests == 0
    assert sandbox.stats.arrivals == {}


def _public_callables() -> list[tuple[str, Callable[..., Any]]]:
    found = [
        (f"LexerClient.{name}", member)
        for name, member in inspect.getmembers(LexerClient, inspect.isfunction)
        if not name.startswith("_")
    ]
    found += [(f"exports.{name}", getattr(exports, name)) for name in exports.__all__]
    return [(name, f) for name, f in found if inspect.isfunction(f)]


def test_no_public_client_or_export_call_takes_a_keyword_catch_all() -> None:
    offenders = [
        name
        for name, function in _public_callables()
        if any(
            p.kind is inspect.Parameter.VAR_KEYWORD
            for p in inspect.signature(function).parameters.values()
        )
    ]
    assert offenders == []


FILTER_PARAMS = {"users", "groups", "extra_filters"}


@pytest.mark.parametrize(
    "name",
    [
        "report",
        *[c[0] for c in TYPED_CALLS[:12]],
        "start_export",
        "export",
        "export_rows",
    ],
)
def test_report_and_export_methods_show_their_filters(name: str) -> None:
    """``help()`` shows the filters: keyword-only, defaulting to None."""
    parameters = inspect.signature(getattr(LexerClient, name)).parameters
    for filter_name in FILTER_PARAMS | ({"form"} if name.startswith("nps_") else {"forms"}):
        parameter = parameters[filter_name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, filter_name
        if filter_name != "form":
            assert parameter.default is None, filter_name


@pytest.mark.parametrize(
    ("method", "kind", "kwargs"),
    [c[:3] for c in TYPED_CALLS[:12]],
    ids=[c[0] for c in TYPED_CALLS[:12]],
)
async def test_every_typed_report_sends_its_filters(
    make_client: MakeClient, sandbox: Sandbox, method: str, kind: ReportType, kwargs: dict[str, Any]
) -> None:
    """Each method passes every filter on: the answer is the one the sandbox computes for
    exactly this body, and differs from the unfiltered answer."""
    filters: dict[str, Any] = {"users": [123, 789], "groups": [456]}
    if not kind.needs_form:
        filters["forms"] = [57]
    extra = {"channel": "twitter", "score": 9.5, "flags": [True, None]}
    async with make_client() as client:
        filtered = await getattr(client, method)(
            APR_FROM, APR_TO, **kwargs, **filters, extra_filters=extra
        )
        plain = await getattr(client, method)(APR_FROM, APR_TO, **kwargs)

    assert filtered == expected(kind, APR_FROM, APR_TO, {**kwargs, **filters, **extra})
    assert plain == expected(kind, APR_FROM, APR_TO, kwargs)
    assert sandbox.stats.requests == {KEY_A: 2}


EXPORT_CALLS: list[tuple[str, Callable[..., Any]]] = [
    ("start_export", lambda c, **kw: c.start_export("case_details", JAN, FEB, **kw)),
    ("export", lambda c, dest, **kw: c.export("case_details", JAN, FEB, dest, **kw)),
    (
        "export-windows",
        lambda c, dest, **kw: c.export(
            "case_details", datetime(2025, 1, 1, tzinfo=timezone.utc), FEB, dest, **kw
        ),
    ),
    ("export_rows", lambda c, **kw: c.export_rows("mention_sla_export", JAN, FEB, **kw)),
]


@pytest.mark.parametrize(("name", "call"), EXPORT_CALLS, ids=[c[0] for c in EXPORT_CALLS])
async def test_export_methods_send_their_filters(
    make_client: MakeClient,
    sandbox: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
    call: Callable[..., Any],
) -> None:
    """What the server received for every job started, window by window."""
    received: list[dict[str, Any]] = []
    original = sandbox._store.start

    def spy(
        owner: str, kind: str, start: datetime, end: datetime, params: Mapping[str, Any], *rest: Any
    ) -> ExportJob:
        received.append(dict(params))
        return original(owner, kind, start, end, params, *rest)

    monkeypatch.setattr(sandbox._store, "start", spy)
    # Jane Remington (12345) is in both groups: the filtered export has rows.
    filters = {"users": [12345], "groups": [456, 789], "forms": [55]}
    extra = {"channel": "twitter"}
    async with make_client() as client:
        if name == "export_rows":
            rows = [row async for row in call(client, **filters, extra_filters=extra)]
            assert rows
        elif name == "start_export":
            await call(client, **filters, extra_filters=extra)
        else:
            await call(client, tmp_path / "out.csv", **filters, extra_filters=extra)

    assert received
    assert received == [{**filters, **extra}] * len(received)
    assert len(received) == (13 if name == "export-windows" else 1)  # 13 monthly windows


async def test_nps_submissions_export_sends_form_category_and_filters(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    async with make_client() as client:
        rows = [
            row
            async for row in client.export_rows(
                "nps_submissions", JAN, FEB, form=123, nps_category="promoters", users=[789]
            )
        ]
    assert rows
    assert {row["form_id"] for row in rows} == {"123"}
    assert {row["category"] for row in rows} == {"promoter"}


async def test_a_non_json_filter_takes_no_slot_and_the_next_request_does_not_wait(
    sandbox_factory: SandboxFactory, client_for: ClientFor
) -> None:
    """With one slot per window, a NaN filter that burnt the slot would hold the valid
    request behind it for a whole window; it takes none, so the valid one goes at once."""
    strict = await sandbox_factory(max_requests=1, window=300.0)
    async with client_for(strict) as client:
        for bad in (float("nan"), float("inf"), {"a", "b"}, NOW):
            with pytest.raises(ValidationError, match="cannot be sent as JSON"):
                await client.summary(APR_FROM, APR_TO, extra_filters={"x": bad})
            assert cast(SlidingWindowLimiter, client.limiter).in_use == 0
            assert client.stats.requests == 0
        result = await client.summary(APR_FROM, APR_TO, extra_filters={"x": 1.5})
        stats = client.stats
        in_use = cast(SlidingWindowLimiter, client.limiter).in_use

    assert result == expected(ReportType.SUMMARY, APR_FROM, APR_TO, {"x": 1.5})
    assert (stats.requests, stats.waits, stats.rate_limited) == (1, 0, 0)
    assert in_use == 1
    assert strict.stats.requests == {KEY_A: 1}


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.report("nps_summary", JAN, FEB),
        lambda c: c.report("nps_volume", JAN, FEB, form=None),
        lambda c: c.start_export("nps_submissions", JAN, FEB),
        lambda c: c.export("nps_submissions", JAN, FEB, UNWRITTEN),
    ],
    ids=["report-nps_summary", "report-nps_volume", "start_export", "export"],
)
async def test_a_missing_form_points_at_the_forms_listing(
    make_client: MakeClient, sandbox: Sandbox, call: Call
) -> None:
    async with make_client() as client:
        with pytest.raises(ValidationError) as info:
            await call(client)
        # The hint works: the listing names the NPS surveys the server accepts.
        surveys = {form.id for form in await client.forms() if form.nps}

    assert "NPS reports need `form`" in str(info.value)
    assert "`lexer-activity forms`" in str(info.value)
    assert "`await client.forms()`" in str(info.value)
    assert surveys == Sandbox.nps_form_ids()
    assert sandbox.stats.requests == {KEY_A: 1}  # the listing only


# -- errors from the real server -------------------------------------------------------


async def test_wrong_token_is_token_mismatch_and_not_retried(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    async with make_client(token=WRONG_TOKEN, retry=FAST) as client:
        with pytest.raises(TokenMismatchError) as info:
            await client.users()
    assert info.value.status == 401
    assert info.value.message == "Unauthorized - api token not matching"
    assert sandbox.stats.unauthorized == 1
    assert sandbox.stats.requests == {}


@pytest.mark.parametrize("headers", [{}, {"Auth-Api-Token": "   "}], ids=["absent", "blank"])
async def test_missing_token_from_a_raw_request_maps_to_missing_token_error(
    sandbox: Sandbox, headers: dict[str, str]
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(sandbox.api_url + "/users", headers=headers) as response,
    ):
        status, body, got = response.status, await response.read(), dict(response.headers)
    error = wire.map_error(status, body, got)
    assert type(error) is MissingTokenError
    assert error.status == 401
    assert error.message == "Unauthorized"
    assert sandbox.stats.unauthorized == 1


async def test_missing_token_answer_through_the_client(
    mock_http: aioresponses, registry: LimiterRegistry
) -> None:
    mock_http.get(MOCK_API + "/users", status=401, payload={"error": "Unauthorized"})
    async with LexerClient(TOKEN_A, api_url=MOCK_API, registry=registry, retry=FAST) as client:
        with pytest.raises(MissingTokenError) as info:
            await client.users()
    assert info.value.status == 401
    assert len(mock_http.requests[("GET", URL(MOCK_API + "/users"))]) == 1


def _body(type_: str, date_from: str, date_to: str, **extra: Any) -> dict[str, Any]:
    return {"type": type_, "date_from": date_from, "date_to": date_to, **extra}


SERVER_400S = [
    (
        "too-long",
        _body("summary", "2025-01-01T00:00:00+00:00", "2026-01-01T00:00:01+00:00"),
        DateRangeTooLongError,
        "Invalid report - date range is too long",
    ),
    (
        "too-long-export",
        _body("case_details", "2024-01-01T00:00:00+11:00", "2026-01-01T00:00:00+11:00"),
        DateRangeTooLongError,
        "Invalid report - date range is too long",
    ),
    (
        "future-start",
        _body("summary", "2026-06-15T12:00:01+00:00", "2026-06-20T00:00:00+00:00"),
        FutureStartDateError,
        "Invalid report - starting date is a future date",
    ),
    (
        "future-start-other-offset",
        _body("states_volume", "2026-06-15T23:00:01+11:00", "2026-06-20T00:00:00+11:00"),
        FutureStartDateError,
        "Invalid report - starting date is a future date",
    ),
    (
        "invalid-type",
        _body("bogus", "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"),
        InvalidReportTypeError,
        "Invalid report - invalid type",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "error", "message"), SERVER_400S, ids=[c[0] for c in SERVER_400S]
)
async def test_servers_own_400s(
    make_client: MakeClient,
    sandbox: Sandbox,
    name: str,
    body: dict[str, Any],
    error: type[APIError],
    message: str,
) -> None:
    async with make_client(retry=FAST) as client:
        with pytest.raises(error) as info:
            await client.send(wire.report_request(body), wire.decode_json)
        stats = client.stats
    assert type(info.value) is error
    assert info.value.status == 400
    assert info.value.message == message
    assert info.value.report_type == body["type"]
    assert sandbox.stats.requests == {KEY_A: 1}
    assert stats.retries == 0


NOT_FOUND = [
    ("unknown-path", wire.Request("api", "GET", "/nope")),
    (
        "report-without-dates",
        wire.Request(
            "api", "POST", "/activity/reports", json={"type": "summary"}, report_type="summary"
        ),
    ),
    ("report-bad-date", wire.report_request(_body("summary", "yesterday", "today"))),
    (
        "from-after-to",
        wire.report_request(
            _body("summary", "2026-02-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00")
        ),
    ),
    (
        "nps-non-nps-form",
        wire.report_request(
            _body("nps_summary", "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00", form=57)
        ),
    ),
    (
        "nps-bad-category",
        wire.report_request(
            _body(
                "nps_volume",
                "2026-01-01T00:00:00+00:00",
                "2026-02-01T00:00:00+00:00",
                form=55,
                nps_category="fans",
            )
        ),
    ),
    ("unknown-report-token", wire.status_request("0" * 32)),
]


@pytest.mark.parametrize(("name", "request_"), NOT_FOUND, ids=[c[0] for c in NOT_FOUND])
async def test_not_found(
    make_client: MakeClient, sandbox: Sandbox, name: str, request_: wire.Request
) -> None:
    async with make_client(retry=FAST) as client:
        with pytest.raises(NotFoundError) as info:
            await client.send(request_, wire.decode_json)
    assert info.value.status == 404
    assert info.value.message == "Not found"
    assert sandbox.stats.requests == {KEY_A: 1}


@pytest.mark.parametrize(
    ("status", "error_name"),
    [
        (500, "ServerError"),
        (502, "ServerError"),
        (503, "ServerError"),
        (504, "ServerError"),
        (408, "RequestTimeoutError"),
    ],
)
async def test_injected_failures_are_retried_then_succeed(
    make_client: MakeClient, sandbox: Sandbox, status: int, error_name: str
) -> None:
    events: list[Any] = []
    sandbox.faults.fail_next(status, count=2)
    async with make_client(retry=FAST, on_event=events.append) as client:
        result = await client.summary(APR_FROM, APR_TO)
        stats = client.stats

    assert result == expected(ReportType.SUMMARY, APR_FROM, APR_TO)
    assert stats.retries == 2
    assert stats.requests == 3
    assert sandbox.stats.requests == {KEY_A: 3}
    assert sandbox.stats.errors_injected == 2
    retrying = [e for e in events if isinstance(e, Retrying)]
    assert [(e.attempt, e.error) for e in retrying] == [(1, error_name), (2, error_name)]


@pytest.mark.parametrize(
    ("status", "error", "text"),
    [
        (500, ServerError, "Internal Server Error"),
        (502, ServerError, "<h1>502 Bad Gateway</h1>"),
        (503, ServerError, "503 Service Unavailable"),
        (408, RequestTimeoutError, "Request Timeout"),
    ],
)
async def test_injected_failures_exhaust_retries(
    make_client: MakeClient, sandbox: Sandbox, status: int, error: type[APIError], text: str
) -> None:
    sandbox.faults.fail_next(status, count=10, path_contains="/activity/reports")
    retry = RetryPolicy(max_retries=2, base=0.01, cap=0.02)
    async with make_client(retry=retry) as client:
        with pytest.raises(error) as info:
            await client.summary(APR_FROM, APR_TO)
        stats = client.stats
        # Other paths are unaffected by the rule.
        assert len(await client.users()) == 4

    assert info.value.status == status
    assert info.value.report_type == "summary"
    assert text in info.value.message
    assert stats.retries == 2
    assert sandbox.stats.requests == {KEY_A: 4}


async def test_injected_429_waits_for_retry_after(
    make_client: MakeClient, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Any] = []
    sandbox.faults.fail_next(429, retry_after="0.3")
    async with make_client(retry=FAST, on_event=events.append) as client:
        result = await client.summary(APR_FROM, APR_TO)
        stats = client.stats

    assert result == expected(ReportType.SUMMARY, APR_FROM, APR_TO)
    assert stats.rate_limited == 1
    assert stats.retries == 0  # 429s do not use up retries
    assert stats.requests == 2
    first, second = sandbox.stats.arrivals[KEY_A]
    assert second - first >= 0.3 - 0.01
    assert [e for e in events if isinstance(e, RateLimited)] == [RateLimited(client.label, 0.3)]
    waits = [e for e in events if isinstance(e, RateLimitWait)]
    assert len(waits) == 1
    assert 0 < waits[0].seconds <= 0.3
    assert any("429" in r.getMessage() and "0.3s" in r.getMessage() for r in caplog.records)


async def test_real_429s_from_the_sandbox_limit_are_retried(
    sandbox_factory: SandboxFactory, client_for: ClientFor
) -> None:
    # The client believes it may send 10 per 0.5 s; the server allows 2: it answers 429
    # (no Retry-After), the client holds the token for a window and tries again.
    tight = await sandbox_factory(max_requests=2, window=0.5)
    events: list[Any] = []
    async with client_for(tight, max_requests=10, window=0.5, on_event=events.append) as client:
        users = await asyncio.gather(*(client.users() for _ in range(4)))
        stats = client.stats

    assert all(len(u) == 4 for u in users)
    assert tight.stats.rate_limited >= 1
    assert stats.rate_limited == tight.stats.rate_limited
    assert tight.stats.requests == {KEY_A: 4}
    assert all(e.retry_after is None for e in events if isinstance(e, RateLimited))


async def test_a_dropped_connection_is_retried_with_one_arrival_per_attempt(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    async with make_client(retry=FAST) as client:
        await client.users()  # the connection is now kept alive: aiohttp would resend a GET
        sandbox.faults.drop_next(1)
        users = await client.users()
        stats = client.stats
    assert len(users) == 4
    assert stats.retries == 1
    assert sandbox.stats.requests == {KEY_A: 3}


async def test_dropped_connections_exhaust_retries(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    retry = RetryPolicy(max_retries=2, base=0.01, cap=0.02)
    async with make_client(retry=retry) as client:
        await client.users()
        sandbox.faults.drop_next(10)
        with pytest.raises(LexerConnectionError) as info:
            await client.users()
        stats = client.stats
    assert info.value.request_sent is True
    assert stats.retries == 2
    # One warm-up, then exactly 1 + max_retries arrivals: no hidden resend by aiohttp.
    assert sandbox.stats.requests == {KEY_A: 4}
    assert sandbox.stats.errors_injected == 3


async def test_malformed_200_is_unexpected_response(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    body = b'{"total_volume": "lots", "padding": "' + b"x" * 500 + b'"}'
    sandbox.faults.malformed_next(body=body)
    async with make_client(retry=FAST) as client:
        with pytest.raises(UnexpectedResponseError) as info:
            await client.summary(APR_FROM, APR_TO)
        sandbox.faults.malformed_next(body=b"<html>definitely not json</html>")
        with pytest.raises(UnexpectedResponseError) as not_json:
            await client.users()
        sandbox.faults.malformed_next()  # the default {"unexpected": "shape"}
        with pytest.raises(UnexpectedResponseError) as shape:
            await client.states_volume(APR_FROM, APR_TO)

    error = info.value
    assert error.status == 200
    assert error.report_type == "summary"
    assert error.body_excerpt == body[:200]
    assert len(error.body_excerpt) == 200
    assert len(str(error).encode()) < 600  # the whole 500-byte padding is not in it
    assert not_json.value.status == 200
    assert not_json.value.report_type is None
    assert "not JSON" in not_json.value.reason
    assert shape.value.report_type == "states_volume"
    assert sandbox.stats.requests == {KEY_A: 3}  # none retried


async def test_connection_refused(registry: LimiterRegistry) -> None:
    port = unused_port()
    url = f"http://127.0.0.1:{port}"
    client = LexerClient(
        TOKEN_A,
        api_url=url + "/v1",
        status_url=url + "/api/public/v1",
        registry=registry,
        retry=RetryPolicy(max_retries=2, base=0.01, cap=0.02),
        now=lambda: NOW,
    )
    async with client:
        with pytest.raises(LexerConnectionError) as info:
            await client.summary(JAN, FEB)
        stats = client.stats
    assert info.value.request_sent is False
    assert info.value.report_type == "summary"
    assert stats.retries == 2
    assert stats.requests == 3


async def test_per_attempt_timeout(sandbox_factory: SandboxFactory, client_for: ClientFor) -> None:
    # The answer comes 1 s after arrival, so each 0.25 s attempt times out whatever the
    # load; 0.25 s leaves each attempt ample time to reach the server first.
    slow = await sandbox_factory(latency=1.0)
    retry = RetryPolicy(max_retries=2, base=0.01, cap=0.02)
    async with client_for(slow, timeout=0.25, retry=retry) as client:
        with pytest.raises(LexerTimeoutError) as info:
            await client.summary(JAN, FEB)
        stats = client.stats
    assert "0.25s" in str(info.value)
    assert info.value.report_type == "summary"
    assert stats.retries == 2
    assert slow.stats.requests == {KEY_A: 3}


async def test_call_deadline(sandbox_factory: SandboxFactory, client_for: ClientFor) -> None:
    slow = await sandbox_factory(latency=0.5)
    async with client_for(slow, timeout=5.0, retry=RetryPolicy(deadline=0.2)) as client:
        with pytest.raises(LexerTimeoutError, match=r"deadline of 0\.2s"):
            await client.users()


# -- lifecycle and the token's secrecy ------------------------------------------------


async def test_async_with_closes_the_owned_session(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    client = make_client()
    async with client:
        session, files = client.session, client.files_session
        await client.users()
    assert session.closed
    assert files.closed
    assert client.closed
    with pytest.raises(ClientClosedError):
        await client.users()
    with pytest.raises(ClientClosedError):
        await client.open()
    with pytest.raises(ClientClosedError):
        _ = client.session
    assert sandbox.stats.requests == {KEY_A: 1}


async def test_a_passed_in_session_is_used_and_not_closed(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    sent: list[str] = []

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        sent.append(params.url.path)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        async with make_client(session=session) as client:
            assert client.session is session
            await client.users()
            await client.summary(JAN, FEB)
        assert client.closed
        assert not session.closed
        # Still usable by its owner.
        own = {"Auth-Api-Token": TOKEN_A}
        async with session.get(sandbox.api_url + "/groups", headers=own) as response:
            assert response.status == 200
    assert sent == ["/v1/users", "/v1/activity/reports", "/v1/groups"]


async def test_api_session_is_shared_by_tokens_without_cookies_or_resends(
    make_client: MakeClient, sandbox: Sandbox
) -> None:
    """`api_session()` is what a client makes for itself, and several clients can share
    it: one connection serves two tokens in turn, each request carrying only its own
    token, with no cookie jar to carry one token's state into another's requests."""
    async with api_session(connections=1) as session:
        assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
        assert getattr(session, "_retry_connection", False) is False
        async with make_client(session=session) as a, make_client(TOKEN_B, session=session) as b:
            for _ in range(3):
                await a.users()
                await b.users()
        assert not session.closed
    assert sandbox.stats.requests == {KEY_A: 3, KEY_B: 3}
    assert sandbox.stats.connections == 1


async def test_closing_twice_and_closing_unopened(make_client: MakeClient) -> None:
    client = make_client()
    await client.aclose()
    await client.aclose()
    with pytest.raises(ClientClosedError):
        await client.summary(JAN, FEB)


def test_repr_and_str_hide_the_token(make_client: MakeClient) -> None:
    client = make_client(label="acme")
    for text in (repr(client), str(client), repr(client._token), str(client._token)):
        assert TOKEN_A not in text
    assert "acme" in repr(client)
    assert "<redacted>" in repr(client)
    default_label = make_client().label
    assert default_label.startswith("token-")
    assert TOKEN_A not in default_label


def _strings_of(error: BaseException) -> list[str]:
    out = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out += [str(current), repr(current), repr(current.args), repr(vars(current))]
        current = current.__cause__ or current.__context__
    return out


async def test_the_token_never_appears_in_logs_errors_or_events(
    make_client: MakeClient, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    events: list[Any] = []
    errors: list[BaseException] = []

    async def expect_error(call: Awaitable[Any]) -> None:
        try:
            await call
        except LexerError as error:
            errors.append(error)
        else:  # pragma: no cover - would make the test vacuous
            raise AssertionError("expected an error")

    retry = RetryPolicy(max_retries=3, base=0.01, cap=0.02)
    telemetry = Telemetry()  # spans and metrics, in memory
    hooks = telemetry.hooks
    async with make_client(retry=retry, on_event=events.append, instrumentation=hooks) as client:
        await client.users()
        sandbox.faults.drop_next(1)
        sandbox.faults.fail_next(500)
        sandbox.faults.fail_next(429, retry_after="0.05")
        await client.summary(APR_FROM, APR_TO)
        sandbox.faults.malformed_next()
        await expect_error(client.users())
        for _, body, _, _ in SERVER_400S:
            await expect_error(client.send(wire.report_request(body), wire.decode_json))
        await expect_error(client.export_status("0" * 32))
        await expect_error(client.summary(datetime(2026, 1, 1), FEB))
        sandbox.faults.fail_next(503, count=10)
        await expect_error(client.users(max_retries=1))
        sandbox.faults.drop_next(10)
        await expect_error(client.users(max_retries=0))
        texts = [repr(client), str(client)]
    await expect_error(client.users())
    async with make_client(token=WRONG_TOKEN, instrumentation=hooks) as wrong:
        await expect_error(wrong.users())
        texts += [repr(wrong), str(wrong)]

    # The scenario really produced logs, events and errors of every kind.
    assert {type(e).__name__ for e in events} >= {"Retrying", "RateLimited", "RateLimitWait"}
    assert len(errors) == 1 + len(SERVER_400S) + 6
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert len(telemetry.spans) > 10
    haystack = texts + [repr(e) for e in events] + telemetry.texts()
    ours = [r for r in caplog.records if r.name.startswith("lexer_activity_async")]
    assert ours
    for record in ours:  # every record has the structured fields, as JSON too
        assert all(hasattr(record, name) for name in FIELDS), record.__dict__
        assert json.loads(JsonFormatter().format(record))["token_label"] is not None
    for record in caplog.records:
        haystack += [record.getMessage(), repr(record.args), str(record.msg)]
        haystack += [str(record.__dict__), JsonFormatter().format(record)]
    for error in errors:
        haystack += _strings_of(error)
    for secret in (TOKEN_A, WRONG_TOKEN):
        assert not [text for text in haystack if secret in text]


async def test_token_and_urls_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox, registry: LimiterRegistry
) -> None:
    monkeypatch.setenv("LEXER_API_TOKEN", TOKEN_B)
    monkeypatch.setenv("LEXER_API_URL", sandbox.api_url + "/")
    monkeypatch.setenv("LEXER_STATUS_URL", sandbox.status_url)
    client = LexerClient(registry=registry, now=lambda: NOW)
    assert client.api_url == sandbox.api_url
    assert client.status_url == sandbox.status_url
    assert TOKEN_B not in repr(client)
    async with client:
        assert len(await client.users()) == 4
        job = await client.start_export("case_details", JAN, FEB)
        polled = await client.export_status(job.token)
    assert polled.token == job.token
    assert sandbox.stats.requests == {KEY_B: 3}
    assert sandbox.stats.status_polls == {job.token: 1}


def test_explicit_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEXER_API_TOKEN", TOKEN_B)
    monkeypatch.setenv("LEXER_API_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LEXER_STATUS_URL", "http://127.0.0.1:9/api/public/v1")
    client = LexerClient(TOKEN_A, api_url="https://a.example/v1", status_url="https://s.example")
    assert client._token.reveal() == TOKEN_A
    assert (client.api_url, client.status_url) == ("https://a.example/v1", "https://s.example")


def test_defaults_and_missing_token(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LEXER_API_TOKEN", "LEXER_API_URL", "LEXER_STATUS_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError):
        LexerClient()
    monkeypatch.setenv("LEXER_API_TOKEN", "   ")
    with pytest.raises(ConfigurationError):
        LexerClient()
    with pytest.raises(ConfigurationError):
        LexerClient(TOKEN_A, api_url="ftp://api.example/v1")
    client = LexerClient(TOKEN_A)
    assert client.api_url == "https://api.lexer.io/v1"
    assert client.status_url == "https://clients.lexer.io/api/public/v1"


# -- the sandbox's strict limit, seen through the client ---------------------------------


async def test_client_limit_matches_a_strict_sandbox(
    sandbox_factory: SandboxFactory, client_for: ClientFor
) -> None:
    strict = await sandbox_factory(max_requests=5, window=1.0)
    async with client_for(strict) as client:
        assert (client.max_requests, client.window) == (5, 1.0)
        results = await asyncio.gather(*(client.users() for _ in range(20)))
        stats = client.stats

    assert all(len(r) == 4 for r in results)
    assert strict.stats.rate_limited == 0
    assert stats.rate_limited == 0
    assert strict.stats.requests == {KEY_A: 20}
    assert strict.stats.max_in_window(KEY_A, 1.0) <= 5
    assert stats.waits > 0  # the limit was actually reached


# -- exact responses through aioresponses ---------------------------------------------

USERS_EXAMPLE = payloads.USERS_AS_PUBLISHED  # verbatim, trailing comma and all

HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)


async def test_the_references_users_example_with_its_trailing_comma(
    mock_http: aioresponses, registry: LimiterRegistry
) -> None:
    mock_http.get(MOCK_API + "/users", body=USERS_EXAMPLE)
    mock_http.get(MOCK_API + "/users", body=USERS_EXAMPLE.replace(b"789,", b"789"))
    async with LexerClient(TOKEN_A, api_url=MOCK_API, registry=registry, retry=FAST) as client:
        with pytest.raises(UnexpectedResponseError) as info:
            await client.users()
        fixed = await client.users()

    assert info.value.status == 200
    assert info.value.body_excerpt == USERS_EXAMPLE[:200]
    assert "not JSON" in info.value.reason
    # Fixed, the single object becomes a list of one.
    assert [u.id for u in fixed] == [12345]
    assert fixed[0].groups == (123, 456, 789)
    assert len(mock_http.requests[("GET", URL(MOCK_API + "/users"))]) == 2


async def test_an_html_502_page(mock_http: aioresponses, registry: LimiterRegistry) -> None:
    url = MOCK_API + "/activity/reports"
    mock_http.post(url, status=502, body=HTML_502, content_type="text/html")
    mock_http.post(url, status=502, body=HTML_502, content_type="text/html")
    mock_http.post(url, status=502, body=HTML_502, content_type="text/html")
    retry = RetryPolicy(max_retries=1, base=0.01, cap=0.02)
    async with LexerClient(
        TOKEN_A, api_url=MOCK_API, registry=registry, retry=retry, now=lambda: NOW
    ) as client:
        with pytest.raises(ServerError) as info:
            await client.summary(JAN, FEB)
        stats = client.stats

    assert info.value.status == 502
    assert "502 Bad Gateway" in info.value.message
    assert info.value.report_type == "summary"
    assert stats.retries == 1
    assert len(mock_http.requests[("POST", URL(url))]) == 2


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_not_followed(
    mock_http: aioresponses, registry: LimiterRegistry, sandbox: Sandbox, status: int
) -> None:
    # The redirect points at the real sandbox (passed through to its socket): had the
    # client followed it, the sandbox would have seen the request and its token.
    target = sandbox.api_url + "/activity/reports"
    mock_http.post(MOCK_API + "/activity/reports", status=status, headers={"Location": target})
    mock_http.get(
        MOCK_API + "/users", status=status, headers={"Location": sandbox.api_url + "/users"}
    )
    async with LexerClient(
        TOKEN_A, api_url=MOCK_API, registry=registry, retry=FAST, now=lambda: NOW
    ) as client:
        with pytest.raises(UnexpectedResponseError) as info:
            await client.summary(JAN, FEB)
        with pytest.raises(UnexpectedResponseError):
            await client.users()

    assert info.value.status == status
    assert info.value.report_type == "summary"
    assert sandbox.stats.requests == {}
    assert sandbox.stats.unauthorized == 0
    assert set(mock_http.requests) == {
        ("POST", URL(MOCK_API + "/activity/reports")),
        ("GET", URL(MOCK_API + "/users")),
    }


async def test_a_redirect_over_real_http_is_not_followed(
    loopback_server: LoopbackServer, registry: LimiterRegistry, sandbox: Sandbox
) -> None:
    from aiohttp import web

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": sandbox.api_url + request.path[3:]})

    url, seen = await loopback_server(redirect)
    async with LexerClient(
        TOKEN_A, api_url=url + "/v1", registry=registry, retry=FAST, now=lambda: NOW
    ) as client:
        with pytest.raises(UnexpectedResponseError) as info:
            await client.summary(JAN, FEB)
    assert info.value.status == 307
    assert [(s["method"], s["path_qs"]) for s in seen] == [("POST", "/v1/activity/reports")]
    assert sandbox.stats.requests == {}
    assert sandbox.stats.unauthorized == 0


# -- a shared in-flight cap ------------------------------------------------------------


async def test_waiting_on_the_rate_limit_holds_no_in_flight_slot(
    sandbox_factory: SandboxFactory, client_for: ClientFor
) -> None:
    """Two tokens share a cap of one request in flight. Token A has spent its window, so
    its next call waits on the rate limit; token B must still get through meanwhile."""
    sb = await sandbox_factory(max_requests=1, window=300.0)
    shared = anyio.CapacityLimiter(1)
    async with (
        client_for(sb, TOKEN_A, max_in_flight=shared) as a,
        client_for(sb, TOKEN_B, max_in_flight=shared) as b,
    ):
        await a.groups()  # A's only request of the window
        waiting = anyio.Event()

        def on_event(event: object) -> None:
            if isinstance(event, RateLimitWait):
                waiting.set()

        a.channel.on_event = on_event
        async with anyio.create_task_group() as group:
            group.start_soon(a.groups)  # blocks for the rest of A's 300 s window
            await waiting.wait()
            with anyio.fail_after(5):
                assert await b.groups()  # would hang if A's wait held the shared slot
            group.cancel_scope.cancel()
    assert shared.borrowed_tokens == 0
    assert sb.stats.max_in_progress == 1


async def test_max_in_flight_caps_requests_on_the_wire(
    sandbox_factory: SandboxFactory, client_for: ClientFor
) -> None:
    sb = await sandbox_factory(latency=0.05)
    async with client_for(sb, max_in_flight=3) as client:
        await asyncio.gather(*(client.groups() for _ in range(12)))
    assert sb.stats.max_in_progress == 3
