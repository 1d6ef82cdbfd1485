"""Report types and the rules a report request must satisfy, as pure functions.

Both the client (to reject bad input before it spends rate budget) and the sandbox (to
answer the documented 400s) use these rules, so the two always agree.
"""

from __future__ import annotations

import calendar
import enum
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone

from .exceptions import ValidationError

__all__ = [
    "ReportType",
    "ExportKind",
    "NpsCategory",
    "DEFAULT_WORKFLOW_STATES_TYPE",
    "MAX_RANGE_MONTHS",
    "add_months",
    "format_datetime",
    "parse_datetime",
    "range_too_long",
    "hourly_states_volume",
    "hourly_response_volume",
    "validate_range",
    "validate_nps",
    "FORMS_HINT",
    "RESERVED_KEYS",
    "ID_FILTERS",
    "build_report_body",
    "split_range",
    "window_stamp",
]

MAX_RANGE_MONTHS = 12

# The reference's Workflow States example uses the type "user_volume", which is Team
# Volume's. Its real name is unpublished; "states" is the natural sibling of
# "states_volume" the way "classifications" is of "case_classifications". Overridable.
DEFAULT_WORKFLOW_STATES_TYPE = "states"


class ReportType(str, enum.Enum):
    """The report types that answer with data directly."""

    SUMMARY = "summary"
    STATES_VOLUME = "states_volume"
    WORKFLOW_STATES = DEFAULT_WORKFLOW_STATES_TYPE
    CLASSIFICATIONS = "classifications"
    RESPONSE_VOLUME = "response_volume"
    USER_SUMMARY = "user_summary"
    USER_VOLUME = "user_volume"
    CASE_SUMMARY = "case_summary"
    CASE_VOLUME = "case_volume"
    CASE_CLASSIFICATIONS = "case_classifications"
    NPS_SUMMARY = "nps_summary"
    NPS_VOLUME = "nps_volume"

    @property
    def needs_form(self) -> bool:
        """An NPS report, which takes one survey as ``form`` (from the report-kind table)."""
        from .kinds import report_kind  # the table imports this module

        return report_kind(self).needs_form


class ExportKind(str, enum.Enum):
    """The report types that start an export job (a CSV file, fetched later)."""

    CASE_DETAILS = "case_details"
    NPS_SUBMISSIONS = "nps_submissions"
    MENTION_SLA_EXPORT = "mention_sla_export"

    @property
    def needs_form(self) -> bool:
        return self is ExportKind.NPS_SUBMISSIONS


class NpsCategory(str, enum.Enum):
    """NPS categories: promoters score 9-10, passives 7-8, detractors 0-6."""

    ALL = "all"
    PROMOTERS = "promoters"
    PASSIVES = "passives"
    DETRACTORS = "detractors"


def add_months(moment: datetime, months: int) -> datetime:
    """``moment`` moved by whole calendar months, the day clamped to the target month's end."""
    index = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def format_datetime(moment: datetime) -> str:
    """The wire format of the reference: ISO 8601 to the second, with its UTC offset."""
    return moment.isoformat(timespec="seconds")


def parse_datetime(text: str) -> datetime:
    """Parse an ISO 8601 timestamp with offset; ``Z`` is accepted for UTC."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no UTC offset")
    return parsed


def range_too_long(date_from: datetime, date_to: datetime) -> bool:
    """True when the range is over 12 months: ``date_to`` past ``date_from`` + 12 calendar
    months, counted on ``date_from``'s own wall clock (as the server reads the request)."""
    limit = add_months(date_from, MAX_RANGE_MONTHS)
    return date_to.astimezone(date_from.tzinfo) > limit


def hourly_states_volume(date_from: datetime, date_to: datetime) -> bool:
    """states_volume is hourly when the range is "less than 4 days"."""
    return date_to - date_from < timedelta(days=4)


def hourly_response_volume(date_from: datetime, date_to: datetime) -> bool:
    """response_volume is hourly when the range is "3 days or less"."""
    return date_to - date_from <= timedelta(days=3)


def _require_aware(name: str, value: object) -> datetime:
    if not isinstance(value, datetime):
        raise ValidationError(
            f"{name} must be a timezone-aware datetime, got {type(value).__name__}"
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(
            f"{name} is a naive datetime ({value.isoformat()}); naive datetimes are rejected "
            "because the API reads wall-clock times in the request's UTC offset: attach a "
            "tzinfo, e.g. datetime(2024, 1, 1, tzinfo=timezone.utc)"
        )
    return value.replace(microsecond=0) if value.microsecond else value


# Every token of a backfill asks for the same windows: these answers are kept. The
# tzinfo is part of each key, as aware datetimes in different zones compare equal.


@functools.lru_cache(maxsize=4096)
def _too_long(start: datetime, _: object, end: datetime, __: object) -> bool:
    return range_too_long(start, end)


@functools.lru_cache(maxsize=4096)
def _formatted(moment: datetime, _: object) -> str:
    return format_datetime(moment)


def validate_range(
    date_from: object,
    date_to: object,
    *,
    now: datetime | None = None,
    max_months: int | None = MAX_RANGE_MONTHS,
) -> tuple[datetime, datetime]:
    """Check a report's range and return it truncated to whole seconds (the wire precision).

    Rules: both aware; ``date_from`` strictly before ``date_to``; at most 12 calendar months
    (``max_months=None`` skips this, for exports that are split into windows); ``date_from``
    not in the future.
    """
    start = _require_aware("date_from", date_from)
    end = _require_aware("date_to", date_to)
    if start >= end:
        raise ValidationError(
            f"date_from ({format_datetime(start)}) must be before date_to ({format_datetime(end)})"
        )
    if max_months is not None and _too_long(start, start.tzinfo, end, end.tzinfo):
        raise ValidationError(
            f"the range {format_datetime(start)} .. {format_datetime(end)} is longer than "
            f"{max_months} months; the API rejects it (split it into windows)"
        )
    current = now if now is not None else datetime.now(timezone.utc)
    if start > current:
        raise ValidationError(f"date_from ({format_datetime(start)}) is in the future")
    return start, end


FORMS_HINT = "list them with `lexer-activity forms` or `await client.forms()`"
"""Where to find NPS survey ids, for error messages."""


def validate_nps(form: object, nps_category: object) -> tuple[int, str]:
    """NPS reports and exports need a form id (an NPS survey from ``/v1/forms``) and a
    valid category."""
    if form is None:
        raise ValidationError(
            "NPS reports need `form`, the id of an NPS survey (a form with nps=true): " + FORMS_HINT
        )
    if isinstance(form, bool) or not isinstance(form, int) or form <= 0:
        raise ValidationError(
            f"NPS reports need `form` to be a positive integer NPS survey id, got {form!r}: "
            + FORMS_HINT
        )
    try:
        category = NpsCategory(nps_category)
    except ValueError:
        allowed = ", ".join(c.value for c in NpsCategory)
        raise ValidationError(
            f"nps_category must be one of {allowed}; got {nps_category!r}"
        ) from None
    return form, category.value


RESERVED_KEYS = frozenset(
    {"type", "date_from", "date_to", "form", "nps_category", "users", "groups", "forms"}
)
"""Body keys the client sets itself; ``extra_filters`` may not set them."""

ID_FILTERS = ("users", "groups", "forms")
"""The id-list filters a report takes as keyword arguments (sent under these names)."""


def _validate_ids(name: str, ids: Sequence[int] | None) -> list[int] | None:
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValidationError(f"{name} must be a sequence of integer ids; got {ids!r}")
    out: list[int] = []
    for item in ids:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValidationError(f"{name} must contain integer ids; got {item!r}")
        out.append(item)
    return out


def _check_json(name: str, value: object) -> None:
    """`ValidationError` unless ``value`` encodes as strict JSON (no NaN or Infinity), so a
    bad filter is refused before it takes a rate-limit slot."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        reason = "too deeply nested" if isinstance(error, RecursionError) else str(error)
        raise ValidationError(f"{name} cannot be sent as JSON: {reason}") from None


def _validate_extra(extra_filters: Mapping[str, object] | None) -> dict[str, object]:
    if extra_filters is None:
        return {}
    if not isinstance(extra_filters, Mapping):
        raise ValidationError(
            f"extra_filters must be a mapping of body field to value; got {extra_filters!r}"
        )
    out: dict[str, object] = {}
    for key, value in extra_filters.items():
        if not isinstance(key, str) or not key:
            raise ValidationError(f"extra_filters keys must be non-empty strings; got {key!r}")
        if key in ID_FILTERS or key in ("form", "nps_category"):
            raise ValidationError(
                f"extra_filters cannot set {key!r}: pass {key}=... to the method instead"
            )
        if key in RESERVED_KEYS:
            raise ValidationError(
                f"extra_filters cannot set {key!r}: the client sets it from the method's "
                "report type and date range"
            )
        _check_json(f"extra_filters[{key!r}]", value)
        out[key] = value
    return out


def build_report_body(
    type_name: str,
    date_from: object,
    date_to: object,
    *,
    needs_form: bool = False,
    form: int | None = None,
    nps_category: str | None = None,
    users: Sequence[int] | None = None,
    groups: Sequence[int] | None = None,
    forms: Sequence[int] | None = None,
    extra_filters: Mapping[str, object] | None = None,
    now: datetime | None = None,
) -> dict[str, object]:
    """Validate a report request and build its JSON body (pure: no I/O).

    ``users``, ``groups`` and ``forms`` are sent as lists of ids under those names (the
    reference says reports may be filtered by them, but publishes no field names);
    ``extra_filters`` adds further fields verbatim, and may not set any of
    `RESERVED_KEYS`. Every value must encode as strict JSON (no NaN or Infinity).
    NPS types (``needs_form``) take one ``form`` instead of ``forms``.
    """
    if not isinstance(type_name, str) or not type_name:
        raise ValidationError(f"report type must be a non-empty string; got {type_name!r}")
    start, end = validate_range(date_from, date_to, now=now)
    body: dict[str, object] = {
        "type": type_name,
        "date_from": _formatted(start, start.tzinfo),
        "date_to": _formatted(end, end.tzinfo),
    }
    if needs_form:
        if forms is not None:
            raise ValidationError(
                f"report type {type_name!r} takes one NPS survey as `form`, not `forms`"
            )
        body["form"], body["nps_category"] = validate_nps(
            form, NpsCategory.ALL.value if nps_category is None else nps_category
        )
    elif form is not None or nps_category is not None:
        raise ValidationError(f"report type {type_name!r} takes no form or nps_category")
    for name, ids in (("users", users), ("groups", groups), ("forms", forms)):
        checked = _validate_ids(name, ids)
        if checked is not None:
            _check_json(name, checked)
            body[name] = checked
    body.update(_validate_extra(extra_filters))
    return body


def split_range(
    date_from: datetime, date_to: datetime, *, months: int = 1
) -> list[tuple[datetime, datetime]]:
    """Split ``[date_from, date_to)`` into half-open, gap-free windows of ``months`` calendar
    months (1 to 12), aligned to ``date_from``'s day and time; the last may be shorter."""
    if not 1 <= months <= MAX_RANGE_MONTHS:
        raise ValidationError(f"window must be 1 to {MAX_RANGE_MONTHS} months; got {months}")
    if date_from >= date_to:
        raise ValidationError("date_from must be before date_to")
    windows = []
    start, step = date_from, 1
    while start < date_to:
        end = min(add_months(date_from, months * step), date_to)
        windows.append((start, end))
        start, step = end, step + 1
    return windows


def window_stamp(date_from: datetime, date_to: datetime) -> str:
    """A window as a file-name-safe string: ``2024-01-01T00-00-00+00-00_2024-02-01T...``."""
    return f"{format_datetime(date_from)}_{format_datetime(date_to)}".replace(":", "-")
