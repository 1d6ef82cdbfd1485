"""The fast decoding path (`structuring`) agrees with the cattrs converter, its reference:
the same result for every valid payload, a refusal for every invalid one."""

from __future__ import annotations

import copy
import json
from datetime import timedelta, timezone
from typing import Any

import attrs
import payloads as ref
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_models import BAD_REPORTS

from lexer_activity_async import models as m
from lexer_activity_async import structuring, wire
from lexer_activity_async.exceptions import UnexpectedResponseError
from lexer_activity_async.kinds import REPORT_KINDS
from lexer_activity_async.reports import ReportType

PLUS_11 = timezone(timedelta(hours=11))

EXAMPLES: dict[ReportType, bytes] = {
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


def outcome(kind: ReportType, body: bytes, *, fast: bool) -> object:
    """The decoded result, or the fact that it was refused."""
    try:
        return wire.decode_report(kind, 200, body, tz=PLUS_11, fast=fast)
    except UnexpectedResponseError:
        return "refused"


def fast_only(kind: ReportType, body: bytes) -> object:
    """What the compiled decoder alone makes of ``body`` (no converter behind it)."""
    result = REPORT_KINDS[kind].result
    series = structuring.series_decoder(result)
    payload = json.loads(body)
    if series is not None:
        return series(payload, PLUS_11)
    return structuring.compile_structurer(result)(payload)


def test_every_report_type_has_an_example() -> None:
    assert set(EXAMPLES) == set(ReportType)


@pytest.mark.parametrize("kind", list(ReportType), ids=lambda k: k.value)
def test_fast_path_equals_the_converter_on_the_reference_examples(kind: ReportType) -> None:
    fast, reference = (
        outcome(kind, EXAMPLES[kind], fast=True),
        outcome(kind, EXAMPLES[kind], fast=False),
    )
    assert reference != "refused"
    assert fast == reference
    assert fast_only(kind, EXAMPLES[kind]) == reference


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        pytest.param(kind, body, id=f"{kind.value}-{name}")
        for kind, body, name in BAD_REPORTS
        if _is_json(body)  # the others are refused by the parser, before any structuring
    ],
)
def test_fast_path_alone_refuses_every_wrong_shape(kind: ReportType, body: bytes) -> None:
    with pytest.raises((TypeError, KeyError, ValueError)):
        fast_only(kind, body)
    assert outcome(kind, body, fast=False) == "refused"


def test_points_share_one_parsed_period_per_response() -> None:
    payload = json.loads(ref.STATES_VOLUME)
    payload["open"] = [dict(point, state="open") for point in payload["closed"]]
    body = json.dumps(payload).encode()
    result = wire.decode_report(ReportType.STATES_VOLUME, 200, body, tz=PLUS_11)
    assert isinstance(result, m.StatesVolume)
    firsts = [series[0].date_from for series in result.states.values()]
    assert len(firsts) > 1
    assert all(first is firsts[0] for first in firsts)
    assert firsts[0].utcoffset() == timedelta(hours=11)


def test_a_model_with_a_validator_is_built_through_its_init() -> None:
    @attrs.frozen
    class Checked:
        value: int = attrs.field(validator=attrs.validators.gt(0))

    with pytest.raises(ValueError, match="must be > 0"):
        structuring.compile_structurer(Checked)({"value": 0})


def test_records_built_from_slot_setters_equal_their_init() -> None:
    payload = {"classification_id": "7", "classification": "x", "state": "new", "volume": 2.0}
    made = structuring.compile_structurer(m.Classification)(payload)
    assert made == m.Classification(m.Id(7), "x", "new", 2)
    assert type(made.volume) is int
    assert type(made.classification_id) is int
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.volume = 3


def test_a_model_with_post_init_or_no_slots_is_built_through_its_init() -> None:
    seen: list[int] = []

    @attrs.frozen
    class Posted:
        value: int

        def __attrs_post_init__(self) -> None:
            seen.append(self.value)

    @attrs.frozen(slots=False)
    class Plain:
        value: int

    assert structuring.compile_structurer(Posted)({"value": 4}) == Posted(4)
    assert seen == [4, 4]
    assert structuring.compile_structurer(Plain)({"value": 5}) == Plain(5)


def test_equal_timestamps_parse_once_and_malformed_ones_still_fail() -> None:
    decode = structuring.compile_structurer(list[m.NpsDay])
    day = {"date": "2026-11-01T00:00:00+00:00", "timestamp": 1, "data": json.loads(ref.NPS_SUMMARY)}
    first, second = decode([day, dict(day)])
    assert first.date is second.date
    assert first.date.utcoffset() == timedelta(0)
    for bad in ("2026-11-01T00:00:00", "2026-13-01T00:00:00+00:00"):
        body = json.dumps([day, dict(day, date=bad)]).encode()
        with pytest.raises(UnexpectedResponseError, match="wrong shape"):
            wire.decode_report(ReportType.NPS_VOLUME, 200, body)


# -- random edits of valid payloads: both paths agree ------------------------------------

REPLACEMENTS = st.sampled_from(
    [None, True, False, 0, 1, -3, 2.0, 1.5, "x", "12", " 7", "", [], {}, [1], {"a": 1},
     "2018-04-01 00:00", "2018-04-01T00:00:00+00:00", "2018-02-30 00:00", "DELETE"]
)  # fmt: skip


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out.extend(_paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.extend(_paths(item, (*prefix, index)))
    return out


def _edited(payload: Any, path: tuple[Any, ...], replacement: object) -> Any:
    if not path:
        return None if replacement == "DELETE" else copy.deepcopy(replacement)
    parent = payload
    for step in path[:-1]:
        parent = parent[step]
    if replacement == "DELETE":
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(replacement)
    return payload


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(list(ReportType)),
    pick=st.integers(min_value=0),
    replacement=REPLACEMENTS,
    edits=st.integers(min_value=1, max_value=3),
)
def test_fast_path_and_converter_agree_on_edited_payloads(
    kind: ReportType, pick: int, replacement: object, edits: int
) -> None:
    payload = json.loads(EXAMPLES[kind])
    for n in range(edits):
        paths = _paths(payload)
        payload = _edited(payload, paths[(pick + n * 7919) % len(paths)], replacement)
    body = json.dumps(payload).encode()
    assert outcome(kind, body, fast=True) == outcome(kind, body, fast=False)


# -- the collector pause around large answers --------------------------------------------


def _big_states_volume() -> bytes:
    payload = json.loads(ref.STATES_VOLUME)
    for n in range(40):
        payload[f"state_{n}"] = [dict(point, state=f"state_{n}") for point in payload["closed"]]
    body = json.dumps(payload).encode()
    assert len(body) > 4096
    return body


def test_the_collector_runs_again_after_a_large_answer_decodes_or_fails() -> None:
    import gc

    body = _big_states_volume()
    assert gc.isenabled()
    wire.decode_report(ReportType.STATES_VOLUME, 200, body)
    assert gc.isenabled()
    with pytest.raises(UnexpectedResponseError):
        wire.decode_report(ReportType.STATES_VOLUME, 200, body.replace(b'"value"', b'"valve"'))
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled() -> None:
    import gc

    gc.disable()
    try:
        wire.decode_report(ReportType.STATES_VOLUME, 200, _big_states_volume())
        assert not gc.isenabled()
    finally:
        gc.enable()
