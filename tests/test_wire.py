"""`wire`: request builders, error mapping, Retry-After, and the exceptions it produces."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import attrs
import pytest

from lexer_activity_async import exceptions as exc
from lexer_activity_async import wire
from lexer_activity_async.client import DEFAULT_API_URL, DEFAULT_STATUS_URL

UTC = timezone.utc
FIXED_NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


# -- request builders -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "path", "published"),
    [
        (wire.users_request, "/users", "https://api.lexer.io/v1/users"),
        (wire.groups_request, "/groups", "https://api.lexer.io/v1/groups"),
        (wire.forms_request, "/forms", "https://api.lexer.io/v1/forms"),
    ],
)
def test_list_requests(build: object, path: str, published: str) -> None:
    request = build()  # type: ignore[operator]
    assert isinstance(request, wire.Request)
    assert request.origin == "api"
    assert request.method == "GET"
    assert request.path == path
    assert request.json is None
    assert request.params is None
    assert request.report_type is None
    assert DEFAULT_API_URL + request.path == published


def test_report_request() -> None:
    body = {
        "type": "nps_summary",
        "date_from": "2018-04-01T00:00:00+11:00",
        "date_to": "2018-04-30T23:59:59+11:00",
        "form": 123,
        "nps_category": "all",
    }
    request = wire.report_request(body)
    assert request.origin == "api"
    assert request.method == "POST"
    assert request.path == "/activity/reports"
    assert DEFAULT_API_URL + request.path == "https://api.lexer.io/v1/activity/reports"
    assert request.json == body
    assert request.params is None
    assert request.report_type == "nps_summary"
    # the body is sent as JSON exactly as built
    assert json.loads(json.dumps(request.json)) == body


def test_report_request_type_of_an_export() -> None:
    body = {"type": "case_details", "date_from": "a", "date_to": "b"}
    assert wire.report_request(body).report_type == "case_details"


def test_status_request() -> None:
    request = wire.status_request("abc-123")
    assert request.origin == "status"
    assert request.method == "GET"
    assert request.path == "/activity/reports/status"
    assert request.params == {"token": "abc-123"}
    assert request.json is None
    assert request.report_type is None
    assert (
        DEFAULT_STATUS_URL + request.path
        == "https://clients.lexer.io/api/public/v1/activity/reports/status"
    )


def test_requests_are_frozen_and_carry_no_token_header() -> None:
    request = wire.users_request()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.path = "/other"  # type: ignore[misc]
    assert wire.TOKEN_HEADER == "Auth-Api-Token"
    assert "token" not in {f.name for f in attrs.fields(wire.Request)}


# -- map_error: every documented error ----------------------------------------------------

DOCUMENTED = [
    (400, "Invalid report - date range is too long", exc.DateRangeTooLongError),
    (400, "Invalid report - starting date is a future date", exc.FutureStartDateError),
    (400, "Invalid report - invalid type", exc.InvalidReportTypeError),
    (401, "Unauthorized - api token not matching", exc.TokenMismatchError),
    (401, "Unauthorized", exc.MissingTokenError),
    (404, "Not found", exc.NotFoundError),
    (429, "Rate limited exceeded", exc.RateLimitedError),
    (408, "Request Timeout", exc.RequestTimeoutError),
    (500, "Internal Server Error", exc.ServerError),
    (502, "Bad Gateway", exc.ServerError),
    (503, "Service Unavailable", exc.ServerError),
    (504, "Gateway Timeout", exc.ServerError),
    (599, "Network Connect Timeout", exc.ServerError),
]

BODY_FORMS: dict[str, Callable[[str], bytes]] = {
    "plain": lambda msg: msg.encode(),
    "plain-newline": lambda msg: (msg + "\n").encode(),
    "json-error": lambda msg: json.dumps({"error": msg}).encode(),
    "json-message": lambda msg: json.dumps({"message": msg}).encode(),
    "json-string": lambda msg: json.dumps(msg).encode(),
}


@pytest.mark.parametrize("form", list(BODY_FORMS))
@pytest.mark.parametrize(
    ("status", "message", "cls"),
    DOCUMENTED,
    ids=[f"{s}-{c.__name__}" for s, _, c in DOCUMENTED],
)
def test_map_error_documented(status: int, message: str, cls: type, form: str) -> None:
    error = wire.map_error(status, BODY_FORMS[form](message), report_type="summary")
    assert type(error) is cls
    assert isinstance(error, exc.APIError)
    assert isinstance(error, exc.LexerError)
    assert error.status == status
    assert error.message == message
    assert error.report_type == "summary"
    assert str(status) in str(error)
    assert message in str(error)
    assert "summary" in str(error)


@pytest.mark.parametrize(
    ("cls", "parent"),
    [
        (exc.DateRangeTooLongError, exc.BadRequestError),
        (exc.FutureStartDateError, exc.BadRequestError),
        (exc.InvalidReportTypeError, exc.BadRequestError),
        (exc.TokenMismatchError, exc.UnauthorizedError),
        (exc.MissingTokenError, exc.UnauthorizedError),
    ],
)
def test_error_hierarchy(cls: type, parent: type) -> None:
    assert issubclass(cls, parent)
    assert issubclass(parent, exc.APIError)


def test_map_error_without_report_type() -> None:
    error = wire.map_error(404, b"Not found")
    assert isinstance(error, exc.NotFoundError)
    assert error.report_type is None
    assert "report type" not in str(error)


def test_unrecognised_400_is_a_plain_bad_request() -> None:
    error = wire.map_error(400, b'{"error": "Invalid report - something new"}')
    assert type(error) is exc.BadRequestError
    assert error.message == "Invalid report - something new"


def test_400_messages_match_case_insensitively() -> None:
    assert isinstance(
        wire.map_error(400, b"INVALID REPORT - DATE RANGE IS TOO LONG"), exc.DateRangeTooLongError
    )


@pytest.mark.parametrize(
    ("status", "cls", "default"),
    [
        (401, exc.MissingTokenError, "Unauthorized"),
        (404, exc.NotFoundError, "Not found"),
        (429, exc.RateLimitedError, "Rate limited exceeded"),
    ],
)
def test_empty_bodies_get_the_documented_message(
    status: int, cls: type[exc.APIError], default: str
) -> None:
    error = wire.map_error(status, b"")
    assert type(error) is cls
    assert isinstance(error, exc.APIError)
    assert error.message == default
    assert error.status == status


def test_json_error_field_wins_over_other_text() -> None:
    body = json.dumps({"status": 401, "error": "Unauthorized - api token not matching"})
    error = wire.map_error(401, body.encode())
    assert isinstance(error, exc.TokenMismatchError)
    assert error.message == "Unauthorized - api token not matching"


@pytest.mark.parametrize("status", [418, 302, 405, 409, 422, 600])
def test_undocumented_status_is_unexpected(status: int) -> None:
    body = b"I'm a teapot " * 40
    error = wire.map_error(status, body, report_type="summary")
    assert type(error) is exc.UnexpectedResponseError
    assert not isinstance(error, exc.APIError)
    assert error.status == status
    assert error.report_type == "summary"
    assert error.body_excerpt == body[:200]
    assert len(error.body_excerpt) == 200
    assert str(status) in str(error)


# -- 429 and Retry-After ------------------------------------------------------------------


def test_429_retry_after_seconds() -> None:
    error = wire.map_error(429, b"Rate limited exceeded", {"Retry-After": "120"})
    assert isinstance(error, exc.RateLimitedError)
    assert error.status == 429
    assert error.retry_after == 120.0


def test_429_retry_after_header_name_is_case_insensitive() -> None:
    error = wire.map_error(429, b"", {"retry-after": "7", "Content-Type": "text/plain"})
    assert isinstance(error, exc.RateLimitedError)
    assert error.retry_after == 7.0


def test_429_retry_after_http_date_uses_injected_now() -> None:
    later = FIXED_NOW + timedelta(seconds=90)
    header = later.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert header == "Fri, 01 Mar 2024 12:01:30 GMT"
    error = wire.map_error(
        429, b"Rate limited exceeded", {"Retry-After": header}, now=lambda: FIXED_NOW
    )
    assert isinstance(error, exc.RateLimitedError)
    assert error.retry_after == pytest.approx(90.0)


def test_429_without_retry_after() -> None:
    error = wire.map_error(429, b"Rate limited exceeded", {"Content-Type": "text/plain"})
    assert isinstance(error, exc.RateLimitedError)
    assert error.retry_after is None
    assert wire.map_error(429, b"").retry_after is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 5 ", 5.0),
        ("1.5", 1.5),
        ("-3", None),
        ("Fri, 01 Mar 2024 12:00:10 GMT", 10.0),
        ("Fri, 01 Mar 2024 13:00:00 +0000", 3600.0),
        ("Fri, 01 Mar 2024 23:00:00 +1100", 0.0),  # = 12:00 UTC: now
        ("Fri, 01 Mar 2024 11:59:00 GMT", 0.0),  # in the past: no wait
        (None, None),
        ("", None),
        ("soon", None),
        ("inf", None),
        ("nan", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    result = wire.parse_retry_after(value, FIXED_NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


# -- the exceptions survive pickling (multiprocessing, task results) ----------------------


API_ERRORS = [
    exc.BadRequestError,
    exc.DateRangeTooLongError,
    exc.FutureStartDateError,
    exc.InvalidReportTypeError,
    exc.UnauthorizedError,
    exc.TokenMismatchError,
    exc.MissingTokenError,
    exc.NotFoundError,
    exc.ServerError,
    exc.RequestTimeoutError,
]


def _all_subclasses(cls: type[object]) -> set[type[object]]:
    out: set[type[object]] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def test_api_error_list_is_complete() -> None:
    assert _all_subclasses(exc.APIError) == set(API_ERRORS) | {exc.RateLimitedError}


@pytest.mark.parametrize("cls", API_ERRORS, ids=lambda c: c.__name__)
def test_api_errors_pickle(cls: type[exc.APIError]) -> None:
    error = cls("Invalid report - invalid type", status=400, report_type="bogus")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert (copy.message, copy.status, copy.report_type) == (
        "Invalid report - invalid type",
        400,
        "bogus",
    )
    assert str(copy) == str(error)


@pytest.mark.parametrize("retry_after", [30.0, None])
def test_rate_limited_error_pickles_with_retry_after(retry_after: float | None) -> None:
    error = exc.RateLimitedError(
        "Rate limited exceeded", report_type="summary", retry_after=retry_after
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is exc.RateLimitedError
    assert copy.retry_after == retry_after
    assert (copy.status, copy.message, copy.report_type) == (
        429,
        "Rate limited exceeded",
        "summary",
    )


def test_mapped_errors_pickle() -> None:
    error = wire.map_error(429, b"Rate limited exceeded", {"Retry-After": "42"}, report_type="x")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, exc.RateLimitedError)
    assert copy.retry_after == 42.0
    assert copy.report_type == "x"


def test_unexpected_response_error_pickles() -> None:
    body = b"<html>" + b"x" * 500
    error = exc.UnexpectedResponseError("not JSON", status=502, report_type="summary", body=body)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is exc.UnexpectedResponseError
    assert (copy.reason, copy.status, copy.report_type) == ("not JSON", 502, "summary")
    assert copy.body_excerpt == body[:200]
    assert str(copy) == str(error)


def test_other_library_errors_pickle() -> None:
    failed = pickle.loads(
        pickle.dumps(exc.ExportFailedError("job failed", status="failed", kind="case_details"))
    )
    assert (str(failed), failed.status, failed.kind) == ("job failed", "failed", "case_details")
    conn = pickle.loads(
        pickle.dumps(exc.LexerConnectionError("refused", report_type="x", request_sent=False))
    )
    assert (str(conn), conn.report_type, conn.request_sent) == ("refused", "x", False)
    timeout = pickle.loads(pickle.dumps(exc.LexerTimeoutError("slow", report_type="y")))
    assert (str(timeout), timeout.report_type) == ("slow", "y")


# -- decode_json --------------------------------------------------------------------------


def test_decode_json() -> None:
    assert wire.decode_json(200, b'{"a": [1]}') == {"a": [1]}
    with pytest.raises(exc.UnexpectedResponseError) as caught:
        wire.decode_json(200, b"{'a': 1}", "summary")
    assert (caught.value.status, caught.value.report_type) == (200, "summary")
    assert caught.value.body_excerpt == b"{'a': 1}"
