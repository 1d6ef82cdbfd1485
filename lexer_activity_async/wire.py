"""Wire logic, free of I/O: building requests, decoding responses, mapping errors.

Everything here is a pure function of its arguments, so it is tested without a server.
The token never enters this module: the transport adds the ``Auth-Api-Token`` header.
"""

from __future__ import annotations

import gc
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timezone, tzinfo
from email.utils import parsedate_to_datetime
from ipaddress import ip_address
from typing import Literal, NoReturn, TypeVar, overload
from urllib.parse import urlsplit

import attrs
import cattrs
import orjson

from . import exceptions as exc
from . import models as m
from .kinds import REPORT_KINDS, ReportKind, ReportResult
from .reports import ReportType
from .structuring import Structurer, compile_structurer, local_time, series_decoder

__all__ = [
    "Request",
    "TOKEN_HEADER",
    "users_request",
    "groups_request",
    "forms_request",
    "report_request",
    "status_request",
    "decode_json",
    "decode_list",
    "decode_report",
    "decode_export_job",
    "map_error",
    "parse_retry_after",
    "retry_after_header",
    "RESULT_TYPES",
    "is_loopback_url",
]

TOKEN_HEADER = "Auth-Api-Token"

Origin = Literal["api", "status"]
T = TypeVar("T")


@attrs.frozen
class Request:
    """A request to send: its origin (API or status host), method, path and payload."""

    origin: Origin
    method: str
    path: str
    json: Mapping[str, object] | None = None
    params: Mapping[str, str] | None = None
    report_type: str | None = None


def users_request() -> Request:
    return Request("api", "GET", "/users")


def groups_request() -> Request:
    return Request("api", "GET", "/groups")


def forms_request() -> Request:
    return Request("api", "GET", "/forms")


def report_request(body: Mapping[str, object]) -> Request:
    """A report or export-start request; ``body`` comes from `reports.build_report_body`."""
    return Request("api", "POST", "/activity/reports", json=body, report_type=str(body["type"]))


def status_request(report_token: str) -> Request:
    """The export status poll, on the status host."""
    return Request("status", "GET", "/activity/reports/status", params={"token": report_token})


RESULT_TYPES: Mapping[ReportType, object] = {
    report_type: kind.result for report_type, kind in REPORT_KINDS.items()
}
"""What each report type decodes to (from the table in `kinds`)."""


def _unexpected(
    reason: str, status: int, body: bytes, report_type: str | None
) -> exc.UnexpectedResponseError:
    return exc.UnexpectedResponseError(reason, status=status, report_type=report_type, body=body)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"non-finite number {name} (not JSON)")


def _loads(body: bytes | str) -> object:
    """`json.loads`, strict: ``NaN``/``Infinity`` (which Python accepts but JSON does not)
    raise ValueError, so no non-finite number ever reaches a result or an output file."""
    return json.loads(body, parse_constant=_reject_constant)


def decode_json(status: int, body: bytes, report_type: str | None = None) -> object:
    """Parse a JSON body with orjson, or raise `UnexpectedResponseError`: not JSON,
    not UTF-8, a non-finite number (``NaN``, ``1e400``), nesting over 1,024 levels."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        message = str(error)
    reason = (
        "body is JSON nested too deeply to parse"
        if message.startswith(("depth limit", "recursion limit", "array and object recursion"))
        else f"body is not JSON ({message})"
    )
    raise _unexpected(reason, status, body, report_type)


def _structure(
    payload: object, cls: type[T], status: int, body: bytes, report_type: str | None
) -> T:
    detail: str
    try:
        return m.converter.structure(payload, cls)
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, cattrs.BaseValidationError):
            problems = cattrs.transform_error(e)
            detail = "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
        else:
            detail = repr(e)
    except RecursionError:
        detail = "nested too deeply"
    raise _unexpected(f"wrong shape: {detail}", status, body, report_type)


def decode_list(cls: type[T], status: int, body: bytes) -> list[T]:
    """Decode ``/users``, ``/groups`` or ``/forms``.

    The reference's examples show a single object while the endpoints
    are described as lists; both are accepted, a single object becoming a list of one.
    """
    payload = decode_json(status, body)
    if isinstance(payload, dict):
        payload = [payload]
    if not isinstance(payload, list):
        raise _unexpected("expected a list of objects", status, body, None)
    items: list[T] = _structure(payload, list[cls], status, body, None)  # type: ignore[valid-type]
    return items


def _points(
    series: object, tz: tzinfo, keep: tuple[str, ...], seen: dict[str, datetime]
) -> list[dict[str, object]]:
    """Flatten ``{..., "date_range": {"date_from": "YYYY-MM-DD HH:MM"}}`` points for the
    converter (the slow path, which explains what is wrong). ``seen`` caches parsed
    period starts: every state's series repeats the same few."""
    if not isinstance(series, list):
        raise TypeError(f"expected a list of points, got {type(series).__name__}")
    out = []
    for point in series:
        if not isinstance(point, dict):
            raise TypeError(f"expected a point object, got {type(point).__name__}")
        flat: dict[str, object] = {key: point[key] for key in keep}
        text = _member(point["date_range"], "date_from")
        moment = seen.get(text) if isinstance(text, str) else None
        if moment is None:
            moment = local_time(text, tz)
            seen[str(text)] = moment
        flat["date_from"] = moment
        out.append(flat)
    return out


def _member(value: object, key: str) -> object:
    """``value[key]`` of a JSON object (TypeError when it is none, KeyError when absent)."""
    if not isinstance(value, dict):
        raise TypeError(f"expected an object with {key!r}, got {type(value).__name__}")
    return value[key]


def _prepare(kind: ReportType, payload: object, tz: tzinfo) -> object:
    """Reshape the few payloads whose wire form differs from their model."""
    seen: dict[str, datetime] = {}
    if kind is ReportType.STATES_VOLUME:
        if not isinstance(payload, dict):
            raise TypeError("expected an object keyed by workflow state")
        return {"states": {k: _points(v, tz, ("state", "value"), seen) for k, v in payload.items()}}
    if kind is ReportType.RESPONSE_VOLUME:
        series = _member(payload, "avg_response_time")
        return {"avg_response_time": _points(series, tz, ("value",), seen)}
    if kind is ReportType.CASE_VOLUME:
        return {"open": _points(_member(payload, "open"), tz, ("value",), seen)}
    return payload


@overload
def decode_report(
    kind: ReportKind[T],
    status: int,
    body: bytes,
    *,
    tz: tzinfo = ...,
    report_type: str | None = ...,
    fast: bool = ...,
) -> T: ...


@overload
def decode_report(
    kind: ReportType,
    status: int,
    body: bytes,
    *,
    tz: tzinfo = ...,
    report_type: str | None = ...,
    fast: bool = ...,
) -> ReportResult: ...


def decode_report(
    kind: ReportKind[T] | ReportType,
    status: int,
    body: bytes,
    *,
    tz: tzinfo = timezone.utc,
    report_type: str | None = None,
    fast: bool = True,
) -> T | ReportResult:
    """Decode a successful report response into its typed result (the kind's ``result``).

    ``tz`` is the UTC offset of the request's ``date_from``: series periods come without
    an offset and are read in it. Any deviation from the documented shape raises
    `UnexpectedResponseError`; no partly-built object escapes.

    The compiled one-pass decoder (`structuring`) runs first; when it refuses the
    payload, the cattrs converter runs to say what is wrong. ``fast=False`` runs the
    converter alone (the reference the fast path is tested against).
    """
    row = kind if isinstance(kind, ReportKind) else REPORT_KINDS[kind]
    name = report_type or row.name
    if fast:
        # A large answer makes over a thousand containers and points at once, enough to
        # start a collection mid-decode that traverses them all while they are still
        # alive (half a 27 KB states_volume's cost). Nothing here makes a cycle, so the
        # collector waits until the parsed payload is freed.
        collecting = len(body) > _GC_PAUSE_BYTES and gc.isenabled()
        if collecting:
            gc.disable()
        try:
            payload = decode_json(status, body, name)
            try:
                return _fast_path(row.result)(payload, tz)  # type: ignore[return-value]
            except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
                pass  # the converter below says what is wrong (and stays the reference)
        finally:
            if collecting:
                gc.enable()
    else:
        payload = decode_json(status, body, name)
    detail: str
    try:
        prepared = _prepare(row.report_type, payload, tz)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        detail = repr(error)
    except RecursionError:
        detail = "nested too deeply"
    else:
        return _structure(prepared, row.result, status, body, name)
    raise _unexpected(f"wrong shape: {detail}", status, body, name)


_GC_PAUSE_BYTES = 4096
"""Answers over this size are decoded with the cyclic garbage collector paused."""

_FAST: dict[object, Callable[[object, tzinfo], object]] = {}


def _fast_path(result: object) -> Callable[[object, tzinfo], object]:
    """The compiled one-pass decoder of a result type (`structuring`), made once."""
    found = _FAST.get(result)
    if found is None:
        series = series_decoder(result)
        if series is not None:
            found = series
        else:
            structure: Structurer = compile_structurer(result)
            found = lambda payload, _tz: structure(payload)  # noqa: E731
        _FAST[result] = found
    return found


def decode_export_job(status: int, body: bytes, report_type: str | None = None) -> m.ExportJob:
    """Decode an export start or status answer: ``{"status", "url", "token"}``."""
    payload = decode_json(status, body, report_type)
    return _structure(payload, m.ExportJob, status, body, report_type)


def _message(body: bytes) -> str | None:
    """The server's message in an error body; None for JSON nested too deeply to read."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        payload = _loads(text)
    except ValueError:
        return text[:500]
    except RecursionError:
        return None
    if isinstance(payload, dict):
        for key in ("error", "message", "errors", "detail"):
            if isinstance(payload.get(key), str):
                return str(payload[key])
    if isinstance(payload, str):
        return payload
    return text[:500]


_DELTA_SECONDS = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,9})?")
"""Delta-seconds as sent in practice (an integer, leniently a decimal); longer digit runs
are nonsense, not delays (and would overflow the clock's arithmetic)."""


def parse_retry_after(
    value: str | None, now: datetime | None = None, *, maximum: float | None = None
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), at
    most ``maximum`` when given. None when absent or unusable: garbage, negative,
    non-finite or absurdly long numbers, unparseable dates."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    seconds: float
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
    else:  # an HTTP date; "-3", "1e400", "nan" or a 5000-digit run fail here too
        try:
            when = parsedate_to_datetime(value)
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            current = now if now is not None else datetime.now(timezone.utc)
            seconds = max(0.0, (when - current).total_seconds())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return seconds if maximum is None else min(seconds, maximum)


def retry_after_header(headers: Mapping[str, str] | None) -> str | None:
    """The ``Retry-After`` header's value (any case), or None."""
    found = None
    for key, value in (headers or {}).items():
        if key.lower() == "retry-after":
            found = value
    return found


_BAD_REQUESTS: tuple[tuple[str, type[exc.BadRequestError]], ...] = (
    ("date range is too long", exc.DateRangeTooLongError),
    ("future date", exc.FutureStartDateError),
    ("invalid type", exc.InvalidReportTypeError),
)


def map_error(
    status: int,
    body: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    report_type: str | None = None,
    now: Callable[[], datetime] | None = None,
    max_retry_after: float | None = None,
) -> exc.LexerError:
    """The typed exception for an error response (status >= 400); a 429's ``retry_after``
    is at most ``max_retry_after`` seconds when given."""
    found = _message(body)
    if found is None and status != 429:  # a 429 is a rate limit whatever its body
        return _unexpected(
            "error body is JSON nested too deeply to parse", status, body, report_type
        )
    message = found or ""
    lowered = message.lower()
    if status == 400:
        for needle, cls in _BAD_REQUESTS:
            if needle in lowered:
                return cls(message, status=status, report_type=report_type)
        return exc.BadRequestError(message, status=status, report_type=report_type)
    if status == 401:
        cls401 = exc.TokenMismatchError if "not matching" in lowered else exc.MissingTokenError
        return cls401(message or "Unauthorized", status=status, report_type=report_type)
    if status == 404:
        return exc.NotFoundError(message or "Not found", status=status, report_type=report_type)
    if status == 408:
        return exc.RequestTimeoutError(message, status=status, report_type=report_type)
    if status == 429:
        return exc.RateLimitedError(
            message or "Rate limited exceeded",
            report_type=report_type,
            retry_after=parse_retry_after(
                retry_after_header(headers), now() if now else None, maximum=max_retry_after
            ),
        )
    if 500 <= status <= 599:
        return exc.ServerError(message, status=status, report_type=report_type)
    return _unexpected(f"undocumented status {status}", status, body, report_type)


def is_loopback_url(url: str) -> bool:
    """True for URLs whose host is localhost or a loopback address."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False
