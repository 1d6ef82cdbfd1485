"""`reports` (pure request rules) and `LexerClient` construction and pre-send validation."""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime, timedelta, timezone
from typing import Any

import payloads as ref
import pytest

from lexer_activity_async import LexerClient, RetryPolicy
from lexer_activity_async import exceptions as exc
from lexer_activity_async.limits import LimiterRegistry
from lexer_activity_async.reports import (
    DEFAULT_WORKFLOW_STATES_TYPE,
    RESERVED_KEYS,
    ExportKind,
    NpsCategory,
    ReportType,
    add_months,
    build_report_body,
    format_datetime,
    hourly_response_volume,
    hourly_states_volume,
    parse_datetime,
    range_too_long,
    validate_nps,
    validate_range,
)

UTC = timezone.utc
PLUS_11 = timezone(timedelta(hours=11))
MINUS_0530 = timezone(-timedelta(hours=5, minutes=30))
ONE_SECOND = timedelta(seconds=1)
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)

# The reference's report request: {"type": ..., "date_from": ..., "date_to": ...}
REF_FROM = datetime(2018, 4, 1, 0, 0, 0, tzinfo=PLUS_11)
REF_TO = datetime(2018, 4, 30, 23, 59, 59, tzinfo=PLUS_11)


# -- add_months ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (date(2024, 1, 15), 1, date(2024, 2, 15)),
        (date(2024, 1, 31), 1, date(2024, 2, 29)),  # leap year
        (date(2023, 1, 31), 1, date(2023, 2, 28)),
        (date(2024, 3, 31), 1, date(2024, 4, 30)),
        (date(2024, 12, 31), 1, date(2025, 1, 31)),  # year boundary
        (date(2024, 2, 29), 12, date(2025, 2, 28)),
        (date(2024, 2, 29), 48, date(2028, 2, 29)),
        (date(2023, 3, 31), 12, date(2024, 3, 31)),
        (date(2024, 8, 31), 6, date(2025, 2, 28)),
        (date(2024, 1, 15), 0, date(2024, 1, 15)),
        (date(2024, 3, 31), -1, date(2024, 2, 29)),
        (date(2023, 3, 31), -1, date(2023, 2, 28)),
        (date(2024, 1, 15), -1, date(2023, 12, 15)),
        (date(2024, 2, 29), -12, date(2023, 2, 28)),
        (date(2024, 5, 31), -13, date(2023, 4, 30)),
        (date(2024, 1, 1), -24, date(2022, 1, 1)),
        (date(2024, 12, 1), 25, date(2027, 1, 1)),
    ],
)
def test_add_months(start: date, months: int, expected: date) -> None:
    moment = datetime(start.year, start.month, start.day, 13, 45, 7, 123, tzinfo=PLUS_11)
    moved = add_months(moment, months)
    assert moved.date() == expected
    assert (moved.hour, moved.minute, moved.second, moved.microsecond) == (13, 45, 7, 123)
    assert moved.tzinfo is PLUS_11


# -- format_datetime / parse_datetime -------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (REF_FROM, "2018-04-01T00:00:00+11:00"),
        (REF_TO, "2018-04-30T23:59:59+11:00"),
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02T03:04:05+00:00"),
        (datetime(2024, 1, 2, 3, 4, 5, 999999, tzinfo=UTC), "2024-01-02T03:04:05+00:00"),
        (datetime(2024, 1, 2, 3, 4, tzinfo=MINUS_0530), "2024-01-02T03:04:00-05:30"),
    ],
)
def test_format_datetime(moment: datetime, text: str) -> None:
    assert format_datetime(moment) == text


def test_format_datetime_matches_the_reference_request() -> None:
    assert format_datetime(REF_FROM) == ref.REQUEST_DATE_FROM
    assert format_datetime(REF_TO) == ref.REQUEST_DATE_TO


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2018-03-21T06:09:01Z", datetime(2018, 3, 21, 6, 9, 1, tzinfo=UTC)),
        ("2018-03-21T06:09:01z", datetime(2018, 3, 21, 6, 9, 1, tzinfo=UTC)),
        ("2018-04-01T00:00:00+11:00", datetime(2018, 4, 1, tzinfo=PLUS_11)),
        ("2018-04-01T13:00:00+00:00", datetime(2018, 4, 1, 13, tzinfo=UTC)),
        ("2024-01-02T03:04:00-05:30", datetime(2024, 1, 2, 3, 4, tzinfo=MINUS_0530)),
    ],
)
def test_parse_datetime(text: str, expected: datetime) -> None:
    parsed = parse_datetime(text)
    assert parsed == expected
    assert parsed.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize(
    "text", ["2018-03-21T06:09:01", "2018-03-21", "2018-03-21 06:09", "yesterday", ""]
)
def test_parse_datetime_rejects_naive_and_garbage(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - ValueError is the contract
        parse_datetime(text)


def test_format_parse_round_trip() -> None:
    for text in (ref.REQUEST_DATE_FROM, ref.REQUEST_DATE_TO, ref.EXPORT_DATE_FROM):
        assert format_datetime(parse_datetime(text)) == text


# -- range_too_long -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("date_from", "date_to", "too_long"),
    [
        # exactly 12 calendar months is allowed, one second more is not
        (
            datetime(2023, 1, 15, 10, tzinfo=PLUS_11),
            datetime(2024, 1, 15, 10, tzinfo=PLUS_11),
            False,
        ),
        (
            datetime(2023, 1, 15, 10, tzinfo=PLUS_11),
            datetime(2024, 1, 15, 10, 0, 1, tzinfo=PLUS_11),
            True,
        ),
        # month ends: 2023-03-31 + 12 months is 2024-03-31 (not clamped to 30 or rolled over)
        (datetime(2023, 3, 31, tzinfo=UTC), datetime(2024, 3, 31, tzinfo=UTC), False),
        (datetime(2023, 3, 31, tzinfo=UTC), datetime(2024, 3, 31, 0, 0, 1, tzinfo=UTC), True),
        # leap day: 2024-02-29 + 12 months is 2025-02-28
        (datetime(2024, 2, 29, tzinfo=UTC), datetime(2025, 2, 28, tzinfo=UTC), False),
        (datetime(2024, 2, 29, tzinfo=UTC), datetime(2025, 2, 28, 0, 0, 1, tzinfo=UTC), True),
        (datetime(2024, 2, 29, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC), True),
        # calendar months, not 365 days: 2023-03-01 .. 2024-03-01 spans 366 days
        (datetime(2023, 3, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC), False),
        # the reference's one-month request
        (REF_FROM, REF_TO, False),
    ],
)
def test_range_too_long(date_from: datetime, date_to: datetime, too_long: bool) -> None:
    assert range_too_long(date_from, date_to) is too_long


def test_range_too_long_compares_date_to_in_another_offset_as_the_same_instant() -> None:
    start = datetime(2023, 1, 15, 10, tzinfo=PLUS_11)
    limit = datetime(2024, 1, 15, 10, tzinfo=PLUS_11)
    limit_in_utc = limit.astimezone(UTC)
    assert limit_in_utc == datetime(2024, 1, 14, 23, tzinfo=UTC)  # earlier wall clock, same instant
    assert range_too_long(start, limit_in_utc) is False
    assert range_too_long(start, limit_in_utc + ONE_SECOND) is True
    # same wall clock in UTC is 11 hours later: too long
    assert range_too_long(start, datetime(2024, 1, 15, 10, tzinfo=UTC)) is True
    # a later-looking wall clock in +11:00 that is the same instant as the limit in UTC
    utc_start = datetime(2023, 1, 15, 0, tzinfo=UTC)
    assert range_too_long(utc_start, datetime(2024, 1, 15, 11, tzinfo=PLUS_11)) is False
    assert range_too_long(utc_start, datetime(2024, 1, 15, 11, 0, 1, tzinfo=PLUS_11)) is True


# -- hourly thresholds ----------------------------------------------------------------------

START = datetime(2024, 5, 1, tzinfo=PLUS_11)


@pytest.mark.parametrize(
    ("length", "hourly"),
    [
        (timedelta(days=4) - ONE_SECOND, True),
        (timedelta(days=4), False),  # "less than 4 days"
        (timedelta(days=4) + ONE_SECOND, False),
        (timedelta(hours=1), True),
        (REF_TO - REF_FROM, False),
    ],
)
def test_hourly_states_volume(length: timedelta, hourly: bool) -> None:
    assert hourly_states_volume(START, START + length) is hourly


@pytest.mark.parametrize(
    ("length", "hourly"),
    [
        (timedelta(days=3) - ONE_SECOND, True),
        (timedelta(days=3), True),  # "3 days or less"
        (timedelta(days=3) + ONE_SECOND, False),
        (timedelta(days=3, hours=12), False),
        (REF_TO - REF_FROM, False),
    ],
)
def test_hourly_response_volume(length: timedelta, hourly: bool) -> None:
    assert hourly_response_volume(START, START + length) is hourly


def test_hourly_thresholds_differ_between_3_and_4_days() -> None:
    end = START + timedelta(days=3, hours=12)
    assert hourly_states_volume(START, end) is True
    assert hourly_response_volume(START, end) is False


def test_hourly_thresholds_use_instants_across_offsets() -> None:
    end = (START + timedelta(days=3)).astimezone(UTC)
    assert hourly_response_volume(START, end) is True
    assert hourly_response_volume(START, end + ONE_SECOND) is False


# -- validate_range -------------------------------------------------------------------------


def test_validate_range_returns_the_range() -> None:
    start, end = validate_range(REF_FROM, REF_TO, now=NOW)
    assert (start, end) == (REF_FROM, REF_TO)
    assert start.utcoffset() == timedelta(hours=11)


@pytest.mark.parametrize("which", ["date_from", "date_to"])
def test_validate_range_rejects_naive_with_a_fix(which: str) -> None:
    naive = datetime(2018, 4, 1)
    args = (naive, REF_TO) if which == "date_from" else (REF_FROM, naive.replace(month=5))
    with pytest.raises(exc.ValidationError) as caught:
        validate_range(*args, now=NOW)
    message = str(caught.value)
    assert which in message
    assert "naive" in message
    assert "tzinfo" in message  # tells how to fix it
    assert "timezone.utc" in message


@pytest.mark.parametrize(
    "value",
    ["2018-04-01T00:00:00+11:00", date(2018, 4, 1), 1522587600, None],
    ids=["str", "date", "int", "none"],
)
def test_validate_range_rejects_non_datetimes(value: object) -> None:
    with pytest.raises(exc.ValidationError) as caught:
        validate_range(value, REF_TO, now=NOW)
    assert "date_from" in str(caught.value)
    with pytest.raises(exc.ValidationError) as caught:
        validate_range(REF_FROM, value, now=NOW)
    assert "date_to" in str(caught.value)


def test_validation_error_is_a_value_error_and_a_lexer_error() -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        validate_range(REF_TO, REF_FROM, now=NOW)
    assert issubclass(exc.ValidationError, exc.LexerError)


@pytest.mark.parametrize(
    ("date_from", "date_to"),
    [
        (REF_FROM, REF_FROM),
        (REF_TO, REF_FROM),
        (REF_FROM, REF_FROM.astimezone(UTC)),  # same instant, other offset
        (
            datetime(2024, 1, 1, 0, 0, 0, 200_000, tzinfo=UTC),
            datetime(2024, 1, 1, 0, 0, 0, 700_000, tzinfo=UTC),
        ),  # equal once truncated to the second
    ],
)
def test_validate_range_requires_from_before_to(date_from: datetime, date_to: datetime) -> None:
    with pytest.raises(exc.ValidationError, match="before"):
        validate_range(date_from, date_to, now=NOW)


def test_validate_range_rejects_over_12_months() -> None:
    start = datetime(2023, 3, 31, tzinfo=UTC)
    assert validate_range(start, datetime(2024, 3, 31, tzinfo=UTC), now=NOW)
    with pytest.raises(exc.ValidationError, match="12 months"):
        validate_range(start, datetime(2024, 3, 31, 0, 0, 1, tzinfo=UTC), now=NOW)
    # exports split long ranges into windows themselves
    long_end = datetime(2025, 3, 31, tzinfo=UTC)
    assert validate_range(start, long_end, now=NOW, max_months=None) == (start, long_end)


def test_validate_range_rejects_a_future_start_against_injected_now() -> None:
    end = NOW + timedelta(days=2)
    assert validate_range(NOW, end, now=NOW) == (NOW, end)  # starting now is fine
    assert validate_range(NOW - ONE_SECOND, end, now=NOW)[0] == NOW - ONE_SECOND
    with pytest.raises(exc.ValidationError, match="future"):
        validate_range(NOW + ONE_SECOND, end, now=NOW)
    # the same instant expressed in another offset is not in the future
    assert validate_range(NOW.astimezone(PLUS_11), end, now=NOW)
    # with another `now`, the same start is in the past
    assert validate_range(NOW + ONE_SECOND, end, now=NOW + timedelta(hours=1))


def test_validate_range_uses_the_real_clock_by_default() -> None:
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    with pytest.raises(exc.ValidationError, match="future"):
        validate_range(tomorrow, tomorrow + timedelta(days=1))
    assert validate_range(REF_FROM, REF_TO) == (REF_FROM, REF_TO)


def test_validate_range_truncates_microseconds() -> None:
    start = datetime(2024, 1, 1, 0, 0, 0, 999_999, tzinfo=PLUS_11)
    end = datetime(2024, 1, 31, 23, 59, 59, 500_000, tzinfo=PLUS_11)
    got_start, got_end = validate_range(start, end, now=NOW)
    assert got_start == datetime(2024, 1, 1, tzinfo=PLUS_11)
    assert got_end == datetime(2024, 1, 31, 23, 59, 59, tzinfo=PLUS_11)
    assert got_start.microsecond == got_end.microsecond == 0
    assert got_start.tzinfo is PLUS_11


# -- validate_nps ---------------------------------------------------------------------------


@pytest.mark.parametrize("category", ["all", "promoters", "passives", "detractors"])
def test_validate_nps_categories(category: str) -> None:
    assert validate_nps(123, category) == (123, category)


def test_validate_nps_accepts_the_enum() -> None:
    form, category = validate_nps(7, NpsCategory.DETRACTORS)
    assert (form, category) == (7, "detractors")
    assert type(category) is str  # the wire value, not the enum member
    assert {c.value for c in NpsCategory} == {"all", "promoters", "passives", "detractors"}


@pytest.mark.parametrize("form", [0, -1, True, False, "123", 12.0, None, [123]])
def test_validate_nps_rejects_bad_forms(form: object) -> None:
    with pytest.raises(exc.ValidationError, match="form"):
        validate_nps(form, "all")


@pytest.mark.parametrize("form", [None, 0, "123"], ids=repr)
def test_missing_or_bad_form_says_what_is_needed_and_where_to_find_it(form: object) -> None:
    with pytest.raises(exc.ValidationError) as caught:
        validate_nps(form, "all")
    message = str(caught.value)
    assert message.startswith("NPS reports need `form`")
    assert "NPS survey" in message
    assert "`lexer-activity forms`" in message
    assert "`await client.forms()`" in message
    assert "got None" not in message


@pytest.mark.parametrize("category", ["ALL", "promoter", "", None, 9, "neutral"])
def test_validate_nps_rejects_bad_categories(category: object) -> None:
    with pytest.raises(exc.ValidationError, match="nps_category") as caught:
        validate_nps(123, category)
    for allowed in ("all", "promoters", "passives", "detractors"):
        assert allowed in str(caught.value)


# -- build_report_body ----------------------------------------------------------------------

# The reference's curl bodies, as published.
REF_SUMMARY_BODY = json.loads(
    '{ "type": "summary", "date_from": "2018-04-01T00:00:00+11:00", '
    '"date_to": "2018-04-30T23:59:59+11:00" }'
)
REF_NPS_BODY = json.loads(
    '{ "type": "nps_summary", "date_from": "2018-04-01T00:00:00+11:00", '
    '"date_to": "2018-04-30T23:59:59+11:00", "form": 123, "nps_category": "all" }'
)


def test_build_report_body_matches_the_reference() -> None:
    body = build_report_body("summary", REF_FROM, REF_TO, now=NOW)
    assert body == REF_SUMMARY_BODY
    assert json.loads(json.dumps(body)) == body


def test_build_report_body_nps_defaults_to_all() -> None:
    body = build_report_body("nps_summary", REF_FROM, REF_TO, needs_form=True, form=123, now=NOW)
    assert body == REF_NPS_BODY
    promoters = build_report_body(
        "nps_volume",
        REF_FROM,
        REF_TO,
        needs_form=True,
        form=5,
        nps_category="promoters",
        now=NOW,
    )
    assert (promoters["form"], promoters["nps_category"]) == (5, "promoters")


def test_build_report_body_nps_needs_a_form() -> None:
    with pytest.raises(exc.ValidationError, match="form"):
        build_report_body("nps_summary", REF_FROM, REF_TO, needs_form=True, now=NOW)


@pytest.mark.parametrize(
    "kwargs", [{"form": 123}, {"nps_category": "all"}], ids=["form", "nps_category"]
)
def test_build_report_body_rejects_form_on_non_nps(kwargs: dict[str, Any]) -> None:
    with pytest.raises(exc.ValidationError, match="summary"):
        build_report_body("summary", REF_FROM, REF_TO, now=NOW, **kwargs)


def test_build_report_body_wire_dates_are_seconds_with_offset() -> None:
    start = datetime(2024, 1, 1, 9, 30, 15, 654_321, tzinfo=MINUS_0530)
    end = datetime(2024, 1, 2, tzinfo=UTC)
    body = build_report_body("summary", start, end, now=NOW)
    assert body["date_from"] == "2024-01-01T09:30:15-05:30"
    assert body["date_to"] == "2024-01-02T00:00:00+00:00"


def test_build_report_body_users_and_groups_become_lists() -> None:
    body = build_report_body(
        "user_summary", REF_FROM, REF_TO, users=(123, 789), groups=[456], now=NOW
    )
    assert body["users"] == [123, 789]
    assert type(body["users"]) is list
    assert body["groups"] == [456]
    assert type(body["groups"]) is list
    plain = build_report_body("user_summary", REF_FROM, REF_TO, now=NOW)
    assert "users" not in plain
    assert "groups" not in plain
    empty = build_report_body("user_summary", REF_FROM, REF_TO, users=[], now=NOW)
    assert empty["users"] == []


@pytest.mark.parametrize(
    "users", ["123", b"123", 123, [True], ["123"], [1.0], {"a": 1}.keys()], ids=repr
)
def test_build_report_body_rejects_bad_ids(users: Any) -> None:
    with pytest.raises(exc.ValidationError, match="users"):
        build_report_body("summary", REF_FROM, REF_TO, users=users, now=NOW)
    with pytest.raises(exc.ValidationError, match="groups"):
        build_report_body("summary", REF_FROM, REF_TO, groups=users, now=NOW)


def test_build_report_body_extra_filters_pass_through() -> None:
    extra = {"channel": "twitter", "classifications": [1, 2], "nested": {"a": None}}
    body = build_report_body("summary", REF_FROM, REF_TO, extra_filters=extra, now=NOW)
    assert body == {**REF_SUMMARY_BODY, **extra}


def test_build_report_body_forms_filter_becomes_a_list() -> None:
    body = build_report_body("summary", REF_FROM, REF_TO, forms=(55, 123), now=NOW)
    assert body == {**REF_SUMMARY_BODY, "forms": [55, 123]}
    assert type(body["forms"]) is list


def test_build_report_body_nps_takes_form_not_forms() -> None:
    with pytest.raises(exc.ValidationError, match="`form`, not `forms`"):
        build_report_body(
            "nps_summary", REF_FROM, REF_TO, needs_form=True, form=123, forms=[55], now=NOW
        )


@pytest.mark.parametrize("key", sorted(RESERVED_KEYS))
@pytest.mark.parametrize("needs_form", [True, False], ids=["nps", "plain"])
def test_build_report_body_rejects_extra_filters_on_reserved_keys(
    key: str, needs_form: bool
) -> None:
    """Reserved keys are refused whether or not this body would set them."""
    with pytest.raises(exc.ValidationError, match=f"extra_filters cannot set '{key}'"):
        build_report_body(
            "nps_summary" if needs_form else "summary",
            REF_FROM,
            REF_TO,
            needs_form=needs_form,
            form=1 if needs_form else None,
            extra_filters={key: "x"},
            now=NOW,
        )


@pytest.mark.parametrize("key", ["users", "groups", "forms", "form", "nps_category"])
def test_extra_filters_point_at_the_keyword_for_known_filters(key: str) -> None:
    with pytest.raises(exc.ValidationError, match=f"pass {key}=\\.\\.\\. to the method"):
        build_report_body("summary", REF_FROM, REF_TO, extra_filters={key: [1]}, now=NOW)


@pytest.mark.parametrize("extra", [["channel"], "channel=x", {1: "x"}, {"": "x"}], ids=repr)
def test_build_report_body_rejects_malformed_extra_filters(extra: Any) -> None:
    with pytest.raises(exc.ValidationError, match="extra_filters"):
        build_report_body("summary", REF_FROM, REF_TO, extra_filters=extra, now=NOW)


def _deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def _circular() -> object:
    loop: list[object] = []
    loop.append(loop)
    return loop


NOT_JSON: list[tuple[str, object, str]] = [
    ("nan", float("nan"), "Out of range float values are not JSON compliant"),
    ("infinity", float("inf"), "Out of range float values are not JSON compliant"),
    ("minus-infinity", float("-inf"), "Out of range float values are not JSON compliant"),
    ("nested-nan", {"score": [1.0, float("nan")]}, "Out of range float"),
    ("set", {1, 2}, "set is not JSON serializable"),
    ("datetime", NOW, "datetime is not JSON serializable"),
    ("bytes", b"x", "bytes is not JSON serializable"),
    ("object", object(), "object is not JSON serializable"),
    ("tuple-key", {(1, 2): "x"}, "keys must be str"),
    ("circular", _circular(), "Circular reference"),
    ("too-deep", _deep(100_000), "too deeply nested"),
]


@pytest.mark.parametrize(
    ("value", "reason"), [(v, r) for _, v, r in NOT_JSON], ids=[n for n, _, _ in NOT_JSON]
)
def test_build_report_body_refuses_values_that_are_not_strict_json(
    value: object, reason: str
) -> None:
    with pytest.raises(exc.ValidationError) as caught:
        build_report_body("summary", REF_FROM, REF_TO, extra_filters={"score": value}, now=NOW)
    message = str(caught.value)
    assert message.startswith("extra_filters['score'] cannot be sent as JSON: ")
    assert reason in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_build_report_body_is_strict_json() -> None:
    """What it returns always encodes with allow_nan=False: the body sent is the body built."""
    extra = {"score": 9.5, "flags": [True, None], "nested": {"k": [1, "two"]}}
    body = build_report_body(
        "summary",
        REF_FROM,
        REF_TO,
        users=[1],
        groups=[2],
        forms=[3],
        extra_filters=extra,
        now=NOW,
    )
    assert json.loads(json.dumps(body, allow_nan=False)) == body


@pytest.mark.parametrize("type_name", ["", None, 5])
def test_build_report_body_rejects_bad_type_names(type_name: Any) -> None:
    with pytest.raises(exc.ValidationError, match="type"):
        build_report_body(type_name, REF_FROM, REF_TO, now=NOW)


def test_build_report_body_validates_the_range() -> None:
    with pytest.raises(exc.ValidationError, match="naive"):
        build_report_body("summary", datetime(2018, 4, 1), REF_TO, now=NOW)
    with pytest.raises(exc.ValidationError, match="future"):
        build_report_body("summary", NOW + ONE_SECOND, NOW + timedelta(days=1), now=NOW)
    with pytest.raises(exc.ValidationError, match="12 months"):
        build_report_body("summary", REF_FROM, add_months(REF_FROM, 12) + ONE_SECOND, now=NOW)


def test_report_types_are_the_documented_ones() -> None:
    assert {k.value for k in ReportType} == {
        "summary",
        "states_volume",
        DEFAULT_WORKFLOW_STATES_TYPE,
        "classifications",
        "response_volume",
        "user_summary",
        "user_volume",
        "case_summary",
        "case_volume",
        "case_classifications",
        "nps_summary",
        "nps_volume",
    }
    assert {k.value for k in ExportKind} == {
        "case_details",
        "nps_submissions",
        "mention_sla_export",
    }
    assert {k for k in ReportType if k.needs_form} == {
        ReportType.NPS_SUMMARY,
        ReportType.NPS_VOLUME,
    }
    assert {k for k in ExportKind if k.needs_form} == {ExportKind.NPS_SUBMISSIONS}


# -- LexerClient: construction (no network) -------------------------------------------------

SECRET = "s3cr3t-token-0123456789abcdef"
UNUSED = "http://127.0.0.1:9"  # the discard port: nothing listens, a send would fail


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("LEXER_API_TOKEN", "LEXER_API_URL", "LEXER_STATUS_URL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("token", [None, "", "   "])
def test_missing_token_names_the_argument_and_the_variable(
    clean_env: pytest.MonkeyPatch, token: str | None
) -> None:
    with pytest.raises(exc.ConfigurationError) as caught:
        LexerClient(token)
    message = str(caught.value)
    assert "token" in message
    assert "LEXER_API_TOKEN" in message


def test_token_from_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LEXER_API_TOKEN", SECRET)
    client = LexerClient()
    # the default label is derived from the token's SHA-256, so it proves which token is used
    assert client.label == "token-" + hashlib.sha256(SECRET.encode()).hexdigest()[:8]
    assert SECRET not in client.label


def test_explicit_token_wins_over_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LEXER_API_TOKEN", "from-env")
    client = LexerClient(SECRET)
    assert client.label == "token-" + hashlib.sha256(SECRET.encode()).hexdigest()[:8]


def test_default_urls_are_the_published_hosts(clean_env: pytest.MonkeyPatch) -> None:
    client = LexerClient(SECRET)
    assert client.api_url == "https://api.lexer.io/v1"
    assert client.status_url == "https://clients.lexer.io/api/public/v1"


def test_urls_from_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LEXER_API_URL", "http://127.0.0.1:8001/v1/")
    clean_env.setenv("LEXER_STATUS_URL", "http://127.0.0.1:8002/api/public/v1")
    client = LexerClient(SECRET)
    assert client.api_url == "http://127.0.0.1:8001/v1"
    assert client.status_url == "http://127.0.0.1:8002/api/public/v1"
    explicit = LexerClient(SECRET, api_url="http://localhost:1/a", status_url="http://localhost:2")
    assert (explicit.api_url, explicit.status_url) == ("http://localhost:1/a", "http://localhost:2")


def test_repr_never_contains_the_token(clean_env: pytest.MonkeyPatch) -> None:
    client = LexerClient(SECRET, api_url=UNUSED, status_url=UNUSED)
    for text in (repr(client), str(client), f"{client!r}"):
        assert SECRET not in text
        assert "LexerClient" in text
    labelled = LexerClient(SECRET, label="reporting")
    assert SECRET not in repr(labelled)
    assert "reporting" in repr(labelled)


# -- resolve_report_type --------------------------------------------------------------------


def test_resolve_report_types(clean_env: pytest.MonkeyPatch) -> None:
    client = LexerClient(SECRET)
    assert client.resolve_report_type("summary") == (ReportType.SUMMARY, "summary")
    assert client.resolve_report_type(ReportType.USER_VOLUME) == (
        ReportType.USER_VOLUME,
        "user_volume",
    )
    assert client.resolve_report_type(DEFAULT_WORKFLOW_STATES_TYPE) == (
        ReportType.WORKFLOW_STATES,
        DEFAULT_WORKFLOW_STATES_TYPE,
    )
    for kind in ReportType:
        assert client.resolve_report_type(kind.value)[0] is kind


@pytest.mark.parametrize("name", ["bogus", "Summary", "", "users"])
def test_resolve_unknown_type(clean_env: pytest.MonkeyPatch, name: str) -> None:
    with pytest.raises(exc.ValidationError, match="unknown report type") as caught:
        LexerClient(SECRET).resolve_report_type(name)
    assert "summary" in str(caught.value)  # lists the known ones


@pytest.mark.parametrize("kind", list(ExportKind), ids=lambda k: k.value)
def test_resolve_export_kind_points_to_export(
    clean_env: pytest.MonkeyPatch, kind: ExportKind
) -> None:
    with pytest.raises(exc.ValidationError, match="export") as caught:
        LexerClient(SECRET).resolve_report_type(kind.value)
    assert kind.value in str(caught.value)


def test_workflow_states_type_override(clean_env: pytest.MonkeyPatch) -> None:
    client = LexerClient(SECRET, workflow_states_type="workflow_states")
    assert client.resolve_report_type("workflow_states") == (
        ReportType.WORKFLOW_STATES,
        "workflow_states",
    )
    assert client.resolve_report_type(ReportType.WORKFLOW_STATES) == (
        ReportType.WORKFLOW_STATES,
        "workflow_states",
    )
    with pytest.raises(exc.ValidationError, match="workflow_states"):
        client.resolve_report_type(DEFAULT_WORKFLOW_STATES_TYPE)
    with pytest.raises(exc.ValidationError) as caught:
        client.resolve_report_type("bogus")
    assert "workflow_states" in str(caught.value)


# -- client.report validates before sending anything ----------------------------------------


def _client(**kw: Any) -> LexerClient:
    return LexerClient(
        SECRET,
        api_url=UNUSED,
        status_url=UNUSED,
        retry=RetryPolicy(max_retries=0),
        registry=LimiterRegistry(),
        now=lambda: NOW,
        **kw,
    )


JAN = datetime(2024, 1, 1, tzinfo=PLUS_11)
FEB = datetime(2024, 2, 1, tzinfo=PLUS_11)

INVALID_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("naive", ("summary", datetime(2024, 1, 1), FEB), {}),
    ("string-date", ("summary", "2024-01-01T00:00:00+11:00", FEB), {}),
    ("reversed", ("summary", FEB, JAN), {}),
    ("over-12-months", ("summary", JAN, add_months(JAN, 12) + ONE_SECOND), {}),
    ("future", ("summary", NOW + ONE_SECOND, NOW + timedelta(days=1)), {}),
    ("unknown-type", ("bogus", JAN, FEB), {}),
    ("export-type", ("case_details", JAN, FEB), {}),
    ("nps-without-form", ("nps_summary", JAN, FEB), {}),
    ("nps-bool-form", ("nps_volume", JAN, FEB), {"form": True}),
    ("nps-bad-category", ("nps_summary", JAN, FEB), {"form": 1, "nps_category": "fans"}),
    ("form-on-summary", ("summary", JAN, FEB), {"form": 1}),
    ("users-string", ("user_summary", JAN, FEB), {"users": "123"}),
    ("clashing-filter", ("summary", JAN, FEB), {"extra_filters": {"type": "user_volume"}}),
    ("nan-filter", ("summary", JAN, FEB), {"extra_filters": {"score": float("nan")}}),
    ("set-filter", ("summary", JAN, FEB), {"extra_filters": {"channels": {"a", "b"}}}),
    ("forms-on-nps", ("nps_summary", JAN, FEB), {"form": 55, "forms": [55]}),
]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [pytest.param(a, k, id=name) for name, a, k in INVALID_CALLS],
)
async def test_report_validates_before_sending(
    clean_env: pytest.MonkeyPatch, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    async with _client() as client:
        with pytest.raises(exc.ValidationError):
            await client.report(*args, **kwargs)
        assert client.stats.requests == 0


async def test_typed_methods_validate_too(clean_env: pytest.MonkeyPatch) -> None:
    async with _client() as client:
        with pytest.raises(exc.ValidationError, match="naive"):
            await client.summary(datetime(2024, 1, 1), FEB)
        with pytest.raises(exc.ValidationError, match="form"):
            await client.nps_volume(JAN, FEB, form=0)
        assert client.stats.requests == 0


async def test_a_valid_report_is_sent_control(clean_env: pytest.MonkeyPatch) -> None:
    """Control for the tests above: a valid request does reach the network (and fails to
    connect), so a ValidationError there really means nothing was sent."""
    async with _client() as client:
        with pytest.raises(exc.LexerConnectionError) as caught:
            await client.report("summary", JAN, FEB)
        assert caught.value.request_sent is False
        assert caught.value.report_type == "summary"
        assert client.stats.requests == 1
        assert SECRET not in str(caught.value)
