"""Every example payload of the reference decodes into its typed result, field by field.

The oracle is the reference itself: each payload is also read with the standard library's
``json`` and every documented field is compared with the decoded attribute, together with
the type the reference documents for it. A few values are also spelled out literally, so a
decoder that garbled both sides the same way could not pass.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
import payloads as ref
import pytest

from lexer_activity_async import models as m
from lexer_activity_async import wire
from lexer_activity_async.exceptions import BODY_EXCERPT_BYTES, UnexpectedResponseError
from lexer_activity_async.reports import ReportType

UTC = timezone.utc
PLUS_11 = timezone(timedelta(hours=11))
# The offset of the requests the examples were published for, read by the standard library.
REQUEST_TZ = datetime.fromisoformat(ref.REQUEST_DATE_FROM).tzinfo

INT, FLOAT, STR, BOOL = int, float, str, bool


def raw(payload: bytes) -> Any:
    return json.loads(payload)


def assert_fields(obj: Any, source: dict[str, Any], documented: dict[str, type]) -> None:
    """The class has exactly the documented fields; each has the documented type and the
    value of ``source`` (ids compare as ints, numbers as numbers)."""
    assert {f.name for f in attrs.fields(type(obj))} == set(documented)
    for name, kind in documented.items():
        value = getattr(obj, name)
        assert type(value) is kind, f"{name}: {type(value).__name__}, expected {kind.__name__}"
        expected = source[name]
        if kind is INT and isinstance(expected, str):
            expected = int(expected)
        assert value == expected, name


def decode(kind: ReportType, payload: bytes, **kw: Any) -> Any:
    return wire.decode_report(kind, 200, payload, **kw)


# -- documented fields (names and types from the reference's property tables) -----------

SUMMARY_FIELDS = {
    "total_volume": INT,
    "total_responded_to": INT,
    "broke_sla": INT,
    "broke_action_sla": INT,
    "min_response_time": FLOAT,
    "max_response_time": FLOAT,
    "min_action_response_time": FLOAT,
    "max_action_response_time": FLOAT,
    "median_response_time": FLOAT,
    "median_response_time_min": FLOAT,
    "median_action_response_time": FLOAT,
    "median_action_response_time_min": FLOAT,
    "avg_response_time": FLOAT,
    "avg_action_response_time": FLOAT,
    "avg_response_time_min": FLOAT,
    "avg_action_response_time_min": FLOAT,
}

USER_SUMMARY_FIELDS = {
    "first_name": STR,
    "last_name": STR,
    "mentions_assigned": INT,
    "user_id": INT,
    "responded_to": INT,
    "responded_to_in_private": INT,
    "avg_response_time": FLOAT,
    "min_response_time": FLOAT,
    "max_response_time": FLOAT,
    "avg_action_response_time": FLOAT,
    "min_action_response_time": FLOAT,
    "max_action_response_time": FLOAT,
    "total_responded_to": INT,
    "broke_sla": INT,
    "broke_action_sla": INT,
    "avg_response_time_min": FLOAT,
    "avg_action_response_time_min": FLOAT,
    "fraction_responded_to": FLOAT,
    "fraction_responded_to_in_private": FLOAT,
    "fraction_broke_sla": FLOAT,
    "fraction_broke_action_sla": FLOAT,
}

CASE_SUMMARY_FIELDS = {
    "total_cases": INT,
    "first_reply_time": FLOAT,
    "resolution_time": FLOAT,
    "median_first_reply_time": FLOAT,
    "median_resolution_time": FLOAT,
    "agent_interactions": FLOAT,
    "agents_involved": FLOAT,
}

NPS_SUMMARY_FIELDS = {
    "total_sent": INT,
    "total_received": INT,
    "total_promoters": INT,
    "total_passives": INT,
    "total_detractors": INT,
    "nps_score": FLOAT,
}

CLASSIFICATION_FIELDS = {
    "classification_id": INT,
    "classification": STR,
    "state": STR,
    "volume": INT,
}
CASE_CLASSIFICATION_FIELDS = {"classification_id": INT, "classification": STR, "volume": INT}
WORKFLOW_STATE_FIELDS = {"state": STR, "volume": INT}
GROUP_FIELDS = {"id": INT, "name": STR, "comment": STR}
STATE_NAMES = {
    "all_states",
    "all_closed_states",
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
}


# -- summary ------------------------------------------------------------------------------


def test_summary_all_16_fields() -> None:
    result = decode(ReportType.SUMMARY, ref.SUMMARY)
    assert isinstance(result, m.Summary)
    assert len(SUMMARY_FIELDS) == 16
    assert_fields(result, raw(ref.SUMMARY), SUMMARY_FIELDS)
    assert result.total_volume == 81
    assert result.avg_response_time == 181795.692883103
    assert result.median_response_time_min == 10.8325319


# -- user_summary: user_id "123" -> 123 -------------------------------------------------


def test_user_summary_both_agents_all_21_fields() -> None:
    result = decode(ReportType.USER_SUMMARY, ref.USER_SUMMARY)
    source = raw(ref.USER_SUMMARY)
    assert len(USER_SUMMARY_FIELDS) == 21
    assert isinstance(result, list)
    assert len(result) == len(source) == 2
    for agent, agent_source in zip(result, source, strict=True):
        assert isinstance(agent, m.UserSummary)
        assert_fields(agent, agent_source, USER_SUMMARY_FIELDS)
    jane, barry = result
    assert (jane.user_id, jane.first_name, jane.last_name) == (123, "Jane", "Pear")
    assert (barry.user_id, barry.first_name, barry.last_name) == (789, "Barry", "Banana")
    assert jane.fraction_responded_to_in_private == 0.6666666666666666
    assert barry.avg_action_response_time_min == 2.241892833333333
    assert type(barry.fraction_broke_sla) is float
    assert barry.fraction_broke_sla == 1.0


def test_user_summary_user_id_is_normalised_from_string() -> None:
    source = raw(ref.USER_SUMMARY)
    assert [agent["user_id"] for agent in source] == ["123", "789"]  # as published
    result = decode(ReportType.USER_SUMMARY, ref.USER_SUMMARY)
    assert [agent.user_id for agent in result] == [123, 789]
    assert all(type(agent.user_id) is int for agent in result)


# -- user_volume: user_id is already a number --------------------------------------------


def test_user_volume_both_agents() -> None:
    result = decode(ReportType.USER_VOLUME, ref.USER_VOLUME)
    source = raw(ref.USER_VOLUME)
    assert len(result) == 2
    for agent, agent_source in zip(result, source, strict=True):
        assert isinstance(agent, m.UserVolume)
        assert {f.name for f in attrs.fields(m.UserVolume)} == {
            "user_id",
            "first_name",
            "last_name",
            "states",
        }
        assert type(agent.user_id) is int
        assert agent.user_id == agent_source["user_id"]
        assert agent.first_name == agent_source["first_name"]
        assert agent.last_name == agent_source["last_name"]
        assert isinstance(agent.states, dict)
        assert set(agent.states) == STATE_NAMES
        assert agent.states == agent_source["states"]
        assert all(type(count) is int for count in agent.states.values())
    assert [a.user_id for a in result] == [123, 789]
    assert result[0].states["all_states"] == 166
    assert result[1].states["closed"] == 1


# -- states_volume: points read in the request's offset ---------------------------------


def test_states_volume_points_in_request_offset() -> None:
    result = decode(ReportType.STATES_VOLUME, ref.STATES_VOLUME, tz=REQUEST_TZ)
    source = raw(ref.STATES_VOLUME)
    assert isinstance(result, m.StatesVolume)
    assert set(result.states) == set(source) == {"closed"}
    points = result.states["closed"]
    assert len(points) == len(source["closed"]) == 4
    for point, point_source in zip(points, source["closed"], strict=True):
        assert isinstance(point, m.StatePoint)
        assert type(point.state) is str
        assert point.state == point_source["state"] == "closed"
        assert type(point.value) is int
        assert point.value == point_source["value"]
        assert isinstance(point.date_from, datetime)
        assert point.date_from.utcoffset() == timedelta(hours=11)
    assert [p.value for p in points] == [174, 234, 255, 108]
    assert [p.date_from for p in points] == [
        datetime(2018, 4, day, 0, 0, tzinfo=PLUS_11) for day in (27, 28, 29, 30)
    ]
    # The same instant in UTC: local midnight at +11:00 is 13:00 the day before.
    assert points[0].date_from == datetime(2018, 4, 26, 13, 0, tzinfo=UTC)


def test_states_volume_defaults_to_utc_and_offset_changes_the_instant() -> None:
    in_utc = decode(ReportType.STATES_VOLUME, ref.STATES_VOLUME)
    in_plus_11 = decode(ReportType.STATES_VOLUME, ref.STATES_VOLUME, tz=PLUS_11)
    first_utc = in_utc.states["closed"][0].date_from
    assert first_utc == datetime(2018, 4, 27, tzinfo=UTC)
    assert first_utc.utcoffset() == timedelta(0)
    assert first_utc - in_plus_11.states["closed"][0].date_from == timedelta(hours=11)


def test_states_volume_several_states_and_hourly_periods() -> None:
    payload = raw(ref.STATES_VOLUME)
    payload["open"] = [
        {"state": "open", "value": 3, "date_range": {"date_from": "2018-04-27 01:00"}},
        {"state": "open", "value": 0, "date_range": {"date_from": "2018-04-27 02:00"}},
    ]
    result = decode(ReportType.STATES_VOLUME, json.dumps(payload).encode(), tz=PLUS_11)
    assert set(result.states) == {"closed", "open"}
    assert [p.date_from for p in result.states["open"]] == [
        datetime(2018, 4, 27, 1, tzinfo=PLUS_11),
        datetime(2018, 4, 27, 2, tzinfo=PLUS_11),
    ]


# -- workflow states (published under user_volume; decoded as a list of {state, volume}) --


def test_workflow_states() -> None:
    result = decode(ReportType.WORKFLOW_STATES, ref.WORKFLOW_STATES)
    source = raw(ref.WORKFLOW_STATES)
    assert isinstance(result, list)
    assert len(result) == len(source) == 6
    for item, item_source in zip(result, source, strict=True):
        assert isinstance(item, m.WorkflowState)
        assert_fields(item, item_source, WORKFLOW_STATE_FIELDS)
    assert [(w.state, w.volume) for w in result] == [
        ("closed", 92),
        ("responded", 49),
        ("assigned", 26),
        ("in_progress", 13),
        ("duplicate", 4),
        ("awaiting_approval", 1),
    ]


def test_workflow_states_payload_is_not_team_volume() -> None:
    # The two examples published under "user_volume" have different shapes.
    with pytest.raises(UnexpectedResponseError):
        decode(ReportType.USER_VOLUME, ref.WORKFLOW_STATES)
    with pytest.raises(UnexpectedResponseError):
        decode(ReportType.WORKFLOW_STATES, ref.USER_VOLUME)


# -- classifications ----------------------------------------------------------------------


def test_classifications() -> None:
    result = decode(ReportType.CLASSIFICATIONS, ref.CLASSIFICATIONS)
    source = raw(ref.CLASSIFICATIONS)
    assert len(result) == len(source) == 5
    for item, item_source in zip(result, source, strict=True):
        assert isinstance(item, m.Classification)
        assert_fields(item, item_source, CLASSIFICATION_FIELDS)
    assert [c.state for c in result].count("all_states") == 2
    assert (result[3].classification_id, result[3].classification) == (143, "customer service")


def test_case_classifications() -> None:
    result = decode(ReportType.CASE_CLASSIFICATIONS, ref.CASE_CLASSIFICATIONS)
    source = raw(ref.CASE_CLASSIFICATIONS)
    assert len(result) == len(source) == 7
    for item, item_source in zip(result, source, strict=True):
        assert isinstance(item, m.CaseClassification)
        assert_fields(item, item_source, CASE_CLASSIFICATION_FIELDS)
    assert [c.classification_id for c in result] == [466, 526, 528, 1246, 1465, 1467, 1472]


# -- response_volume and case_volume ------------------------------------------------------


def test_response_volume() -> None:
    result = decode(ReportType.RESPONSE_VOLUME, ref.RESPONSE_VOLUME, tz=REQUEST_TZ)
    source = raw(ref.RESPONSE_VOLUME)["avg_response_time"]
    assert isinstance(result, m.ResponseVolume)
    assert {f.name for f in attrs.fields(m.ResponseVolume)} == {"avg_response_time"}
    assert len(result.avg_response_time) == len(source) == 4
    for point, point_source in zip(result.avg_response_time, source, strict=True):
        assert isinstance(point, m.ValuePoint)
        assert type(point.value) is float
        assert point.value == point_source["value"]
    assert result.avg_response_time[0].value == 317691.388907962
    assert [p.date_from for p in result.avg_response_time] == [
        datetime(2018, 6, day, tzinfo=PLUS_11) for day in (5, 6, 7, 8)
    ]


def test_case_volume() -> None:
    result = decode(ReportType.CASE_VOLUME, ref.CASE_VOLUME, tz=REQUEST_TZ)
    source = raw(ref.CASE_VOLUME)["open"]
    assert isinstance(result, m.CaseVolume)
    assert len(result.open) == len(source) == 7
    for point, point_source in zip(result.open, source, strict=True):
        assert isinstance(point, m.ValuePoint)
        assert type(point.value) in (int, float)  # "number"
        assert point.value == point_source["value"]
        assert point.date_from.utcoffset() == timedelta(hours=11)
    assert [p.value for p in result.open] == [9, 9, 9, 9, 9, 10, 9]
    assert [p.date_from for p in result.open] == [
        datetime(2018, 4, day, tzinfo=PLUS_11) for day in range(1, 8)
    ]


# -- case_summary, nps_summary, nps_volume ------------------------------------------------


def test_case_summary() -> None:
    result = decode(ReportType.CASE_SUMMARY, ref.CASE_SUMMARY)
    assert isinstance(result, m.CaseSummary)
    assert_fields(result, raw(ref.CASE_SUMMARY), CASE_SUMMARY_FIELDS)
    assert result.total_cases == 10
    assert result.agent_interactions == 2.4


def test_nps_summary() -> None:
    result = decode(ReportType.NPS_SUMMARY, ref.NPS_SUMMARY)
    assert isinstance(result, m.NpsSummary)
    assert_fields(result, raw(ref.NPS_SUMMARY), NPS_SUMMARY_FIELDS)
    assert (result.total_promoters, result.total_passives, result.total_detractors) == (9, 1, 2)
    # The score is the Net Promoter Score of the counts, not an average.
    net = (result.total_promoters - result.total_detractors) / result.total_received * 100
    assert result.nps_score == pytest.approx(net)


def test_nps_volume_date_timestamp_data() -> None:
    result = decode(ReportType.NPS_VOLUME, ref.NPS_VOLUME)
    source = raw(ref.NPS_VOLUME)
    assert isinstance(result, list)
    assert len(result) == len(source) == 7
    assert {f.name for f in attrs.fields(m.NpsDay)} == {"date", "timestamp", "data"}
    for index, (day, day_source) in enumerate(zip(result, source, strict=True)):
        assert isinstance(day, m.NpsDay)
        assert isinstance(day.date, datetime)
        assert day.date.utcoffset() == timedelta(0)
        assert day.date == datetime(2018, 4, 1 + index, 13, 0, tzinfo=UTC)
        # one entry per local day of the request's +11:00 offset
        assert day.date.astimezone(PLUS_11) == datetime(2018, 4, 2 + index, tzinfo=PLUS_11)
        assert type(day.timestamp) is int
        assert day.timestamp == day_source["timestamp"]
        assert day.date.timestamp() == day.timestamp
        assert isinstance(day.data, m.NpsSummary)
        assert_fields(day.data, day_source["data"], NPS_SUMMARY_FIELDS)
    assert result[0].timestamp == 1522587600


# -- GET lists: a single object becomes a list of one ------------------------------------


def test_users_example_as_published_is_invalid_json() -> None:
    with pytest.raises(UnexpectedResponseError) as caught:
        wire.decode_list(m.User, 200, ref.USERS_AS_PUBLISHED)
    error = caught.value
    assert error.status == 200
    assert error.report_type is None
    assert error.body_excerpt == ref.USERS_AS_PUBLISHED[:BODY_EXCERPT_BYTES]
    assert len(error.body_excerpt) == BODY_EXCERPT_BYTES < len(ref.USERS_AS_PUBLISHED)


def test_users_example_without_trailing_comma() -> None:
    result = wire.decode_list(m.User, 200, ref.USERS)
    source = raw(ref.USERS)
    assert isinstance(result, list)
    assert len(result) == 1
    user = result[0]
    assert isinstance(user, m.User)
    assert {f.name for f in attrs.fields(m.User)} == {
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
    }
    assert type(user.id) is int
    assert user.id == source["id"] == 12345
    assert user.email == source["email"] == "[email\u00a0protected]"
    assert (user.first_name, user.last_name) == ("Jane", "Remington")
    assert user.timezone == "Australia/Sydney"
    assert isinstance(user.gmtoffset, (int, float))
    assert not isinstance(user.gmtoffset, bool)
    assert user.gmtoffset == 10
    assert type(user.sign_in_count) is int
    assert user.sign_in_count == 76
    assert user.last_sign_in_at == datetime(2018, 3, 21, 6, 9, 1, tzinfo=UTC)
    assert user.last_sign_in_at is not None
    assert user.last_sign_in_at.utcoffset() == timedelta(0)
    assert user.archived is False
    assert list(user.groups) == source["groups"] == [123, 456, 789]
    assert all(type(group) is int for group in user.groups)


def test_groups_example() -> None:
    result = wire.decode_list(m.Group, 200, ref.GROUPS)
    assert len(result) == 1
    assert isinstance(result[0], m.Group)
    assert_fields(result[0], raw(ref.GROUPS), GROUP_FIELDS)
    assert result[0].name == "Social Customer Care"


def test_forms_example() -> None:
    result = wire.decode_list(m.Form, 200, ref.FORMS)
    source = raw(ref.FORMS)
    assert len(result) == 1
    form = result[0]
    assert isinstance(form, m.Form)
    assert {f.name for f in attrs.fields(m.Form)} == set(source)
    assert type(form.id) is int
    assert form.id == 55
    assert (form.name, form.title) == ("NPS Survey", "Lexer NPS Survey")
    assert form.archived is False
    assert form.nps is True
    assert form.created_at == datetime(2018, 5, 26, 21, 54, 19, tzinfo=UTC)
    assert form.created_at.utcoffset() == timedelta(0)
    assert list(form.groups) == [123]
    assert form.form_url == source["form_url"]
    assert form.form_url.startswith("https://")


@pytest.mark.parametrize(
    ("cls", "payload"),
    [(m.User, ref.USERS), (m.Group, ref.GROUPS), (m.Form, ref.FORMS)],
    ids=["users", "groups", "forms"],
)
def test_lists_accept_a_json_array(cls: type[m.User | m.Group | m.Form], payload: bytes) -> None:
    one = raw(payload)
    other = dict(one, id=one["id"] + 1)
    result = wire.decode_list(cls, 200, json.dumps([one, other]).encode())
    assert [item.id for item in result] == [one["id"], one["id"] + 1]
    assert wire.decode_list(cls, 200, b"[]") == []


def test_group_comment_may_be_null() -> None:
    body = json.dumps(dict(raw(ref.GROUPS), comment=None)).encode()
    assert wire.decode_list(m.Group, 200, body)[0].comment is None


# -- export jobs ------------------------------------------------------------------------


def test_export_start_pending() -> None:
    job = wire.decode_export_job(200, ref.EXPORT_PENDING, "case_details")
    assert isinstance(job, m.ExportJob)
    assert {f.name for f in attrs.fields(m.ExportJob)} == {"status", "url", "token"}
    assert job.status == "pending"
    assert job.url is None
    assert job.token == "<report_token>"


def test_export_status_complete() -> None:
    job = wire.decode_export_job(200, ref.EXPORT_COMPLETE)
    assert (job.status, job.url, job.token) == ("complete", "<CSV File Location>", "<report_token>")


def test_export_status_complete_as_published_is_invalid_json() -> None:
    with pytest.raises(UnexpectedResponseError) as caught:
        wire.decode_export_job(200, ref.EXPORT_COMPLETE_AS_PUBLISHED, "nps_submissions")
    assert caught.value.report_type == "nps_submissions"
    assert caught.value.body_excerpt == ref.EXPORT_COMPLETE_AS_PUBLISHED


# -- every example, and RESULT_TYPES covers every report type ------------------------------

EXAMPLES = {
    ReportType.SUMMARY: ref.SUMMARY,
    ReportType.STATES_VOLUME: ref.STATES_VOLUME,
    ReportType.WORKFLOW_STATES: ref.WORKFLOW_STATES,
    ReportType.CLASSIFICATIONS: ref.CLASSIFICATIONS,
    ReportType.RESPONSE_VOLUME: ref.RESPONSE_VOLUME,
    ReportType.USER_SUMMARY: ref.USER_SUMMARY,
    ReportType.USER_VOLUME: ref.USER_VOLUME,
    ReportType.CASE_SUMMARY: ref.CASE_SUMMARY,
    ReportType.CASE_VOLUME: ref.CASE_VOLUME,
    ReportType.CASE_CLASSIFICATIONS: ref.CASE_CLASSIFICATIONS,
    ReportType.NPS_SUMMARY: ref.NPS_SUMMARY,
    ReportType.NPS_VOLUME: ref.NPS_VOLUME,
}


def test_every_report_type_has_an_example_and_a_result_type() -> None:
    assert set(EXAMPLES) == set(ReportType) == set(wire.RESULT_TYPES)


@pytest.mark.parametrize("kind", list(ReportType), ids=lambda k: k.value)
def test_results_are_frozen(kind: ReportType) -> None:
    result = decode(kind, EXAMPLES[kind], tz=REQUEST_TZ)
    item = result[0] if isinstance(result, list) else result
    first = attrs.fields(type(item))[0].name
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(item, first, None)


# -- extra fields are tolerated -----------------------------------------------------------


def _with_extras(value: Any) -> Any:
    """Add an unknown field to every object, at every depth (not inside ``states`` maps,
    whose keys are data)."""
    if isinstance(value, list):
        return [_with_extras(item) for item in value]
    if isinstance(value, dict):
        out = {k: (v if k == "states" else _with_extras(v)) for k, v in value.items()}
        out["added_later"] = {"nested": [1, "two"]}
        return out
    return value


@pytest.mark.parametrize(
    "kind",
    [k for k in ReportType if k is not ReportType.STATES_VOLUME],
    ids=lambda k: k.value,
)
def test_unknown_fields_are_ignored(kind: ReportType) -> None:
    noisy = json.dumps(_with_extras(raw(EXAMPLES[kind]))).encode()
    assert decode(kind, noisy, tz=PLUS_11) == decode(kind, EXAMPLES[kind], tz=PLUS_11)


def test_unknown_fields_in_states_volume_points_are_ignored() -> None:
    payload = raw(ref.STATES_VOLUME)
    for point in payload["closed"]:
        point["extra"] = True
        point["date_range"]["date_to"] = "2018-04-28 00:00"
    noisy = json.dumps(payload).encode()
    assert decode(ReportType.STATES_VOLUME, noisy) == decode(
        ReportType.STATES_VOLUME, ref.STATES_VOLUME
    )


@pytest.mark.parametrize(
    ("cls", "payload"),
    [(m.User, ref.USERS), (m.Group, ref.GROUPS), (m.Form, ref.FORMS)],
    ids=["users", "groups", "forms"],
)
def test_unknown_fields_in_lists_are_ignored(cls: type, payload: bytes) -> None:
    noisy = json.dumps(_with_extras(raw(payload))).encode()
    assert wire.decode_list(cls, 200, noisy) == wire.decode_list(cls, 200, payload)


def test_unknown_fields_in_export_job_are_ignored() -> None:
    noisy = json.dumps(dict(raw(ref.EXPORT_PENDING), progress=0.5)).encode()
    assert wire.decode_export_job(200, noisy) == wire.decode_export_job(200, ref.EXPORT_PENDING)


# -- wrong shapes raise UnexpectedResponseError, never a half-filled object ---------------


def _edit(payload: bytes, change: Any) -> bytes:
    """The payload with ``change`` applied in place (or replaced by what it returns)."""
    data = raw(payload)
    result = change(data)
    edited = json.dumps(data if result is None else result).encode()
    assert edited != json.dumps(raw(payload)).encode()
    return edited


def _drop(key: str) -> Any:
    def change(d: dict[str, Any]) -> None:
        del d[key]

    return change


def _set(key: str, value: Any) -> Any:
    return lambda d: d.__setitem__(key, value)


def _first(change: Any) -> Any:
    return lambda d: change(d[0])


BAD_REPORTS = [
    # missing fields
    (ReportType.SUMMARY, _edit(ref.SUMMARY, _drop("broke_sla")), "missing-field"),
    (ReportType.USER_SUMMARY, _edit(ref.USER_SUMMARY, _first(_drop("user_id"))), "missing-id"),
    (ReportType.NPS_SUMMARY, _edit(ref.NPS_SUMMARY, _drop("nps_score")), "missing-score"),
    (ReportType.RESPONSE_VOLUME, b"{}", "missing-series"),
    (ReportType.CASE_VOLUME, b'{"closed": []}', "wrong-series-key"),
    (
        ReportType.NPS_VOLUME,
        _edit(ref.NPS_VOLUME, _first(lambda d: _drop("total_sent")(d["data"]))),
        "missing-nested",
    ),
    # wrong types
    (ReportType.SUMMARY, _edit(ref.SUMMARY, _set("total_volume", "81")), "string-for-int"),
    (ReportType.SUMMARY, _edit(ref.SUMMARY, _set("avg_response_time", "1.5")), "str-for-float"),
    (ReportType.SUMMARY, _edit(ref.SUMMARY, _set("total_volume", True)), "bool-for-int"),
    (ReportType.SUMMARY, _edit(ref.SUMMARY, _set("avg_response_time", False)), "bool-for-float"),
    (ReportType.SUMMARY, _edit(ref.SUMMARY, _set("total_volume", 81.5)), "fraction-for-int"),
    (ReportType.SUMMARY, _edit(ref.SUMMARY, _set("broke_sla", None)), "null-for-int"),
    (ReportType.CASE_SUMMARY, _edit(ref.CASE_SUMMARY, _set("total_cases", [10])), "list-for-int"),
    (ReportType.USER_SUMMARY, _edit(ref.USER_SUMMARY, _first(_set("user_id", "abc"))), "bad-id"),
    (ReportType.USER_SUMMARY, _edit(ref.USER_SUMMARY, _first(_set("user_id", True))), "bool-id"),
    (ReportType.USER_SUMMARY, _edit(ref.USER_SUMMARY, _first(_set("user_id", 1.5))), "float-id"),
    (ReportType.USER_SUMMARY, _edit(ref.USER_SUMMARY, _first(_set("first_name", 7))), "int-name"),
    (
        ReportType.CLASSIFICATIONS,
        _edit(ref.CLASSIFICATIONS, _first(_set("classification_id", "x"))),
        "bad-class-id",
    ),
    (ReportType.WORKFLOW_STATES, _edit(ref.WORKFLOW_STATES, _first(_set("volume", "92"))), "vol"),
    (ReportType.USER_VOLUME, _edit(ref.USER_VOLUME, _first(_set("states", []))), "states-list"),
    (
        ReportType.USER_VOLUME,
        _edit(ref.USER_VOLUME, _first(lambda d: d["states"].__setitem__("new", "0"))),
        "state-count-string",
    ),
    (
        ReportType.NPS_VOLUME,
        _edit(ref.NPS_VOLUME, _first(_set("timestamp", "1522587600"))),
        "string-timestamp",
    ),
    (ReportType.NPS_VOLUME, _edit(ref.NPS_VOLUME, _first(_set("data", []))), "data-list"),
    # list where an object is expected, and the reverse
    (ReportType.SUMMARY, b"[" + ref.SUMMARY + b"]", "list-for-object"),
    (ReportType.STATES_VOLUME, b"[]", "list-for-states"),
    (ReportType.STATES_VOLUME, b'{"closed": {"state": "closed"}}', "object-for-points"),
    (ReportType.RESPONSE_VOLUME, b'{"avg_response_time": {}}', "object-for-series"),
    (ReportType.CASE_VOLUME, b'{"open": null}', "null-series"),
    (ReportType.USER_SUMMARY, b"{}", "empty-object-for-list"),
    (ReportType.CLASSIFICATIONS, _edit(ref.CLASSIFICATIONS, lambda d: d[0]), "object-for-list"),
    (ReportType.WORKFLOW_STATES, b'"closed"', "string-for-list"),
    (ReportType.CASE_CLASSIFICATIONS, b"null", "null-for-list"),
    (ReportType.NPS_SUMMARY, b"null", "null-for-object"),
    (ReportType.NPS_SUMMARY, b"42", "number-for-object"),
    # bad dates
    (ReportType.NPS_VOLUME, _edit(ref.NPS_VOLUME, _first(_set("date", "soon"))), "bad-date"),
    (
        ReportType.NPS_VOLUME,
        _edit(ref.NPS_VOLUME, _first(_set("date", "2018-04-01T13:00:00"))),
        "naive-date",
    ),
    (ReportType.NPS_VOLUME, _edit(ref.NPS_VOLUME, _first(_set("date", 1522587600))), "int-date"),
    (
        ReportType.STATES_VOLUME,
        _edit(ref.STATES_VOLUME, lambda d: d["closed"][0]["date_range"].update(date_from="x")),
        "bad-period",
    ),
    (
        ReportType.STATES_VOLUME,
        _edit(
            ref.STATES_VOLUME,
            lambda d: d["closed"][0]["date_range"].update(date_from="2018-02-30 00:00"),
        ),
        "impossible-period",
    ),
    (
        ReportType.CASE_VOLUME,
        _edit(ref.CASE_VOLUME, lambda d: d["open"][0]["date_range"].update(date_from=20180401)),
        "number-period",
    ),
    (
        ReportType.RESPONSE_VOLUME,
        _edit(ref.RESPONSE_VOLUME, lambda d: d["avg_response_time"][0].pop("date_range")),
        "missing-period",
    ),
    (
        ReportType.STATES_VOLUME,
        _edit(ref.STATES_VOLUME, lambda d: d["closed"][1].__setitem__("date_range", "2018-04")),
        "string-date-range",
    ),
    (ReportType.CASE_VOLUME, b'{"open": [7]}', "number-point"),
    (
        ReportType.STATES_VOLUME,
        _edit(ref.STATES_VOLUME, lambda d: d["closed"][2].__setitem__("value", "255")),
        "string-point-value",
    ),
    # not JSON at all
    (ReportType.SUMMARY, b"<html><body>502 Bad Gateway</body></html>", "html"),
    (ReportType.SUMMARY, b"", "empty"),
    (ReportType.SUMMARY, b"\xff\xfe\x00", "binary"),
    (ReportType.SUMMARY, ref.SUMMARY[:-10], "truncated"),
]


@pytest.mark.parametrize(
    ("kind", "body"),
    [pytest.param(kind, body, id=f"{kind.value}-{name}") for kind, body, name in BAD_REPORTS],
)
def test_wrong_shape_raises_unexpected_response(kind: ReportType, body: bytes) -> None:
    with pytest.raises(UnexpectedResponseError) as caught:
        wire.decode_report(kind, 201, body, tz=PLUS_11)
    error = caught.value
    assert error.status == 201
    assert error.report_type == kind.value
    assert error.body_excerpt == body[:BODY_EXCERPT_BYTES]
    assert len(error.body_excerpt) <= 200
    assert "201" in str(error)


def test_report_type_name_on_the_error_is_the_wire_name() -> None:
    with pytest.raises(UnexpectedResponseError) as caught:
        wire.decode_report(ReportType.WORKFLOW_STATES, 200, b"{}", report_type="user_volume")
    assert caught.value.report_type == "user_volume"


def test_body_excerpt_is_the_first_200_bytes_only() -> None:
    data = raw(ref.SUMMARY)
    del data["total_volume"]
    data["padding"] = "x" * 5000
    body = json.dumps(data).encode()
    with pytest.raises(UnexpectedResponseError) as caught:
        wire.decode_report(ReportType.SUMMARY, 200, body)
    assert len(body) > 5000
    assert caught.value.body_excerpt == body[:200]
    assert len(caught.value.body_excerpt) == 200
    assert "x" * 300 not in str(caught.value)


def _user(**changes: Any) -> bytes:
    return json.dumps(dict(raw(ref.USERS), **changes)).encode()


BAD_LISTS = [
    (m.User, _user(groups="123"), "string-for-groups"),
    (m.User, _user(groups={"123": 1}), "object-for-groups"),
    (m.User, _user(groups=[123, "x"]), "bad-group-id"),
    (m.User, _user(archived="false"), "string-for-bool"),
    (m.User, _user(archived=0), "int-for-bool"),
    (m.User, _user(id=True), "bool-id"),
    (m.User, _user(sign_in_count="76"), "string-for-int"),
    (m.User, _user(last_sign_in_at="yesterday"), "bad-date"),
    (m.User, _user(last_sign_in_at="2018-03-21 06:09:01"), "naive-date"),
    (m.User, json.dumps({k: v for k, v in raw(ref.USERS).items() if k != "email"}).encode(), "m"),
    (m.Form, json.dumps(dict(raw(ref.FORMS), nps="yes")).encode(), "string-nps"),
    (m.Form, json.dumps(dict(raw(ref.FORMS), created_at=None)).encode(), "null-created"),
    (m.Group, json.dumps(dict(raw(ref.GROUPS), name=None)).encode(), "null-name"),
    (m.Group, b'"groups"', "string"),
    (m.Group, b"42", "number"),
    (m.Group, b"[1, 2]", "numbers"),
    (m.Group, b"[[]]", "nested-list"),
    (m.Group, b"Not JSON", "not-json"),
]


@pytest.mark.parametrize(
    ("cls", "body"),
    [pytest.param(cls, body, id=f"{cls.__name__}-{name}") for cls, body, name in BAD_LISTS],
)
def test_wrong_list_shape_raises_unexpected_response(cls: type, body: bytes) -> None:
    with pytest.raises(UnexpectedResponseError) as caught:
        wire.decode_list(cls, 200, body)
    assert caught.value.status == 200
    assert caught.value.report_type is None
    assert caught.value.body_excerpt == body[:200]


@pytest.mark.parametrize(
    "body",
    [
        b'{"status": "pending", "url": null}',
        b'{"status": "pending", "url": 5, "token": "t"}',
        b'{"status": null, "url": null, "token": "t"}',
        b'{"status": "pending", "url": null, "token": 12}',
        b'[{"status": "pending", "url": null, "token": "t"}]',
        b"pending",
    ],
)
def test_wrong_export_job_shape(body: bytes) -> None:
    with pytest.raises(UnexpectedResponseError) as caught:
        wire.decode_export_job(202, body, "mention_sla_export")
    assert (caught.value.status, caught.value.report_type) == (202, "mention_sla_export")
    assert caught.value.body_excerpt == body[:200]


def test_ids_accept_numeric_strings_and_ints_only() -> None:
    assert m.converter.structure("123", m.Id) == 123
    assert m.converter.structure(123, m.Id) == 123
    for bad in ("12a", "", 1.5, None, True, [1]):
        with pytest.raises(Exception):  # noqa: B017, PT011 - any structuring error
            m.converter.structure(bad, m.Id)


def test_integral_float_for_int_field_is_accepted_as_int() -> None:
    # JSON has one number type; 81.0 is the same number as 81.
    result = decode(ReportType.SUMMARY, _edit(ref.SUMMARY, _set("total_volume", 81.0)))
    assert type(result.total_volume) is int
    assert result.total_volume == 81


@pytest.mark.parametrize(
    "value",
    ["123", {"123": 1}, {}, "", 123, None],
    ids=["str", "dict", "empty-dict", "empty-str", "int", "none"],
)
@pytest.mark.parametrize(
    "target",
    [tuple[m.Id, ...], list[m.WorkflowState], tuple[m.StatePoint, ...]],
    ids=["id-tuple", "list", "point-tuple"],
)
def test_arrays_accept_only_json_arrays(value: Any, target: Any) -> None:
    # Iterating a string or a dict's keys would invent data: "123" -> (1, 2, 3), {} -> [].
    with pytest.raises(Exception):  # noqa: B017, PT011 - any structuring error
        m.converter.structure(value, target)
    assert m.converter.structure([], target) == target.__origin__()
