"""Typed results: frozen, slotted attrs classes, structured by one cattrs converter.

Every documented field is present with its documented type. Extra fields the server may
add are ignored. Ids are normalised to ``int`` (the reference shows ``user_id`` as a
string in user_summary and a number in user_volume). Time-series points carry parsed, aware
timestamps.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import NewType, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import IterableValidationError, IterableValidationNote

from .reports import parse_datetime

__all__ = [
    "Id",
    "converter",
    "User",
    "Group",
    "Form",
    "Summary",
    "StatePoint",
    "StatesVolume",
    "WorkflowState",
    "Classification",
    "ValuePoint",
    "ResponseVolume",
    "UserSummary",
    "UserVolume",
    "CaseSummary",
    "CaseVolume",
    "CaseClassification",
    "NpsSummary",
    "NpsDay",
    "ExportJob",
]

Id = NewType("Id", int)
"""An entity id, normalised to int whether the server sent ``123`` or ``"123"``."""


@attrs.frozen
class User:
    id: Id
    email: str
    first_name: str
    last_name: str
    timezone: str
    gmtoffset: float
    sign_in_count: int
    last_sign_in_at: datetime | None
    archived: bool
    groups: tuple[Id, ...]


@attrs.frozen
class Group:
    id: Id
    name: str
    comment: str | None


@attrs.frozen
class Form:
    id: Id
    name: str
    title: str
    archived: bool
    created_at: datetime
    groups: tuple[Id, ...]
    nps: bool
    form_url: str


@attrs.frozen
class Summary:
    """``summary``: team-wide handling metrics. Times in seconds, ``*_min`` in minutes."""

    total_volume: int
    total_responded_to: int
    broke_sla: int
    broke_action_sla: int
    avg_response_time: float
    avg_action_response_time: float
    min_response_time: float
    median_response_time: float
    max_response_time: float
    min_action_response_time: float
    median_action_response_time: float
    max_action_response_time: float
    avg_response_time_min: float
    avg_action_response_time_min: float
    median_response_time_min: float
    median_action_response_time_min: float


@attrs.frozen
class StatePoint:
    """One period of one workflow state. ``date_from`` is the period's start, read in the
    UTC offset of the request's ``date_from`` (the server sends it with no offset)."""

    state: str
    value: int
    date_from: datetime


@attrs.frozen
class StatesVolume:
    """``states_volume``: per workflow state, a point per day (per hour under 4 days)."""

    states: dict[str, tuple[StatePoint, ...]]


@attrs.frozen
class WorkflowState:
    """Workflow-state totals (see "Known API ambiguities" for the report type's name)."""

    state: str
    volume: int


@attrs.frozen
class Classification:
    """``classifications``: a classification's volume in one state (or ``all_states``)."""

    classification_id: Id
    classification: str
    state: str
    volume: int


@attrs.frozen
class ValuePoint:
    value: float
    date_from: datetime


@attrs.frozen
class ResponseVolume:
    """``response_volume``: average response time per day (per hour for 3 days or less).

    The unit of ``value`` is ambiguous: the reference documents minutes, but its
    examples look like seconds. Values are returned as the server sends them.
    """

    avg_response_time: tuple[ValuePoint, ...]


@attrs.frozen
class UserSummary:
    """``user_summary``: one agent's metrics. Fractions as the server computes them."""

    user_id: Id
    first_name: str
    last_name: str
    mentions_assigned: int
    responded_to: int
    responded_to_in_private: int
    avg_response_time: float
    min_response_time: float
    max_response_time: float
    avg_action_response_time: float
    min_action_response_time: float
    max_action_response_time: float
    total_responded_to: int
    broke_sla: int
    broke_action_sla: int
    avg_response_time_min: float
    avg_action_response_time_min: float
    fraction_responded_to: float
    fraction_responded_to_in_private: float
    fraction_broke_sla: float
    fraction_broke_action_sla: float


@attrs.frozen
class UserVolume:
    """``user_volume`` (Team Volume): an agent's messages by current workflow state."""

    user_id: Id
    first_name: str
    last_name: str
    states: dict[str, int]


@attrs.frozen
class CaseSummary:
    total_cases: int
    first_reply_time: float
    resolution_time: float
    median_first_reply_time: float
    median_resolution_time: float
    agent_interactions: float
    agents_involved: float


@attrs.frozen
class CaseVolume:
    """``case_volume``: open cases per day."""

    open: tuple[ValuePoint, ...]


@attrs.frozen
class CaseClassification:
    classification_id: Id
    classification: str
    volume: int


@attrs.frozen
class NpsSummary:
    """``nps_summary``. ``nps_score`` is the Net Promoter Score (documented as an average
    score, but the reference's example is the NPS: 9 promoters, 2 detractors of 12)."""

    total_sent: int
    total_received: int
    total_promoters: int
    total_passives: int
    total_detractors: int
    nps_score: float


@attrs.frozen
class NpsDay:
    """``nps_volume``: one local day; ``date`` is its start in UTC, ``timestamp`` the epoch."""

    date: datetime
    timestamp: int
    data: NpsSummary


@attrs.frozen
class ExportJob:
    """An export job as the API describes it: ``token`` is the *report* token, not a secret."""

    status: str
    url: str | None
    token: str


T = TypeVar("T")


def _structure_id(value: object, _: object) -> Id:
    if isinstance(value, bool):
        raise TypeError(f"expected an id, got {value!r}")
    if isinstance(value, int):
        return Id(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return Id(int(value))
    raise TypeError(f"expected an integer id, got {value!r}")


def _structure_datetime(value: object, _: object) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        return parse_datetime(value)
    raise TypeError(f"expected an ISO 8601 timestamp, got {value!r}")


def _strict(kind: type[T]) -> Callable[[object, object], T]:
    def structure(value: object, _: object) -> T:
        # bool is an int subclass: refuse it where another type is expected, not for bool.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise TypeError(f"expected {kind.__name__}, got {value!r}")
        return value

    return structure


def _structure_float(value: object, _: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _structure_int(value: object, _: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _is_array_type(type_: type) -> bool:
    args = get_args(type_)
    origin = get_origin(type_)
    return (origin is list and len(args) == 1) or (
        origin is tuple and len(args) == 2 and args[1] is Ellipsis
    )


Hook = Callable[[object, object], object]


def _array_hook_factory(conv: cattrs.Converter) -> Callable[[type], Hook]:
    """Lists and homogeneous tuples accept only a JSON array: cattrs' default would
    iterate a string (``"123"`` -> ``(1, 2, 3)``) or a dict's keys (``{}`` -> ``[]``)."""

    def factory(type_: type) -> Hook:
        element = get_args(type_)[0]
        as_tuple = get_origin(type_) is tuple
        handler = conv.get_structure_hook(element)  # fetched once, not per item

        def structure(value: object, _: object) -> object:
            if not isinstance(value, list):
                raise TypeError(f"expected an array, got {type(value).__name__}")
            items: list[object] = []
            errors: list[Exception] = []
            for index, item in enumerate(value):
                try:
                    items.append(handler(item, element))
                except Exception as error:
                    note = IterableValidationNote(
                        f"Structuring {type_} @ index {index}", index, element
                    )
                    error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]
                    errors.append(error)
            if errors:
                raise IterableValidationError(f"While structuring {type_!r}", errors, type_)
            return tuple(items) if as_tuple else items

        return structure

    return factory


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)
    conv.register_structure_hook_factory(_is_array_type, _array_hook_factory(conv))
    conv.register_structure_hook(Id, _structure_id)
    conv.register_structure_hook(datetime, _structure_datetime)
    conv.register_unstructure_hook(datetime, datetime.isoformat)  # no Python frame a call
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(str, _strict(str))
    conv.register_structure_hook(bool, _strict(bool))
    return conv


converter: cattrs.Converter = _make_converter()
"""The one converter: structures API payloads into the classes above, and back."""
