"""Backfill specs are fully type-checked: every wrong type, range, unknown key, unsafe name
and file collision is a `SpecError` naming the key; a hypothesis fuzz test checks that
every generated spec either loads (and plans) or raises `SpecError`, nothing else."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lexer_activity_async.backfill import (
    MAX_NAME_LENGTH,
    BackfillSpec,
    ExportSpec,
    SpecError,
    TokenSource,
    check_name,
    plan,
)
from lexer_activity_async.exports import PollPolicy
from lexer_activity_async.reports import ExportKind

UTC = timezone.utc
BASE: dict[str, Any] = {
    "date_from": "2024-01-01",
    "date_to": "2024-03-01",
    "reports": ["summary"],
    "tokens": [{"label": "a", "env": "X"}],
}

WRONG_TYPES: list[tuple[dict[str, Any], str]] = [
    ({"output": 5}, "`output` must be a string, got int 5"),
    ({"output": ""}, "`output` must be a non-empty path"),
    ({"tokens": [{"label": 5, "env": "X"}]}, "tokens[0].label must be a string, got int 5"),
    ({"tokens": [{"label": "a", "env": 5}]}, "tokens[0].env must be a string, got int 5"),
    ({"tokens": [{"label": "a", "file": 1.5}]}, "tokens[0].file must be a string"),
    ({"tokens": [{"label": "a", "file": "a\0b"}]}, "tokens[0].file must be a non-empty path"),
    ({"window_months": 1.5}, "`window_months` must be an integer, got float 1.5"),
    ({"window_months": True}, "`window_months` must be an integer, got bool True"),
    ({"window_months": "2"}, "`window_months` must be an integer, got a string"),
    ({"concurrency": {"total": 1.5}}, "[concurrency] total must be an integer, got float 1.5"),
    ({"concurrency": {"per_token": "8"}}, "[concurrency] per_token must be an integer"),
    ({"rate_limit": {"max_requests": 1.5}}, "[rate_limit] max_requests must be an integer"),
    ({"rate_limit": {"window": "300"}}, "[rate_limit] window must be a finite number"),
    ({"rate_limit": {"window": math.inf}}, "[rate_limit] window must be a finite number"),
    ({"rate_limit": {"window": -1}}, "rate_limit needs max_requests >= 1 and window > 0"),
    ({"rate_limit": {"maximum": 1}}, "unknown keys in [rate_limit]: maximum"),
    (
        {"rate_limit": {"max_requests": 10, "reserve": 10}},
        "[rate_limit] reserve must be 0 to max_requests - 1 (9), got int 10",
    ),
    ({"rate_limit": {"reserve": -1}}, "[rate_limit] reserve must be 0 to max_requests - 1"),
    ({"rate_limit": {"reserve": "2"}}, "[rate_limit] reserve must be an integer, got a string"),
    ({"poll": {"first_delay": -1}}, "[poll] first_delay must be >= 0, got -1"),
    ({"poll": {"cap": -0.5}}, "[poll] cap must be >= 0, got -0.5"),
    ({"poll": {"timeout": 0}}, "[poll] timeout must be > 0, got 0"),
    ({"poll": {"factor": 0.5}}, "[poll] factor must be >= 1, got 0.5"),
    ({"poll": {"jitter_low": 1.5}}, "[poll] jitter_low must be at most 1"),
    ({"poll": {"jitter_low": 0}}, "[poll] jitter_low must be > 0"),
    ({"poll": {"first_delay": "2"}}, "[poll] first_delay must be a finite number, got a string"),
    ({"poll": {"factor": math.nan}}, "[poll] factor must be a finite number, got float nan"),
    ({"poll": {"cap": True}}, "[poll] cap must be a finite number, got bool True"),
    ({"poll": 3}, "[poll] must be a table, got int 3"),
    ({"nps": {"form": "55"}, "reports": ["nps_volume"]}, "[nps] form must be an integer"),
    ({"nps": {"form": 55, "category": 1}}, "[nps] category must be a string, got int 1"),
    ({"exports": "case_details"}, "`exports` must be a list or an [exports] table, got a string"),
    ({"exports": {"format": "xlsx"}}, '[exports] format must be "csv" or "parquet", got a string'),
    ({"exports": {"format": "csv", "keep_csv": "yes"}}, "[exports] keep_csv must be true or false"),
    ({"exports": {"kinds": [{"kind": 3}]}}, "exports.kinds[0].kind must be a string, got int 3"),
    ({"exports": {"kinds": [{"form": 55}]}}, "exports.kinds[0] needs a `kind`"),
    ({"exports": {"formats": "csv"}}, "unknown keys in `exports`: formats"),
    ({"exports": {"connections": 0}}, "[exports] connections must be an integer from 1 to 32"),
    ({"exports": {"connections": 33}}, "[exports] connections must be an integer from 1 to 32"),
    ({"exports": {"connections": "4"}}, "[exports] connections must be an integer, got a string"),
    ({"exports": {"connections": True}}, "[exports] connections must be an integer, got bool"),
    ({"export_connections": 40}, "export_connections must be an integer from 1 to 32"),
    ({"export_connections": 2.5}, "`export_connections` must be an integer, got float 2.5"),
    (
        {"export_connections": 2, "exports": {"connections": 4}},
        "give [exports] connections or export_connections, not both",
    ),
    ({"exports": [{"kind": 3}]}, "exports[0].kind must be a string, got int 3"),
    ({"exports": [{"form": 55}]}, "exports[0] needs a `kind`"),
    ({"exports": [{"kind": "nps_submissions", "form": 5.5}]}, "exports[0].form must be an integer"),
    (
        {"exports": [{"kind": "nps_submissions", "form": 5, "nps_category": 2}]},
        "exports[0].nps_category must be a string",
    ),
    ({"reports": 5}, '`reports` must be "all", a name or a list, got int 5'),
    ({"reports": [5]}, "reports[0] must be a string, got int 5"),
    ({"api_url": 5}, "`api_url` must be a string, got int 5"),
    ({"api_url": "ftp://127.0.0.1/v1"}, "`api_url` must be a http/https URL"),
    ({"status_url": "http://"}, "`status_url` must be a http/https URL"),
    ({"redis_url": "http://127.0.0.1:6379"}, "`redis_url` must be a redis/rediss/unix URL"),
    ({"workflow_states_type": 7}, "`workflow_states_type` must be a string, got int 7"),
    ({"date_from": 20240101}, "date_from must be a date or datetime, got int 20240101"),
    ({"date_to": time(12, 0)}, "date_to must be a date or datetime, got a time"),
    ({"date_to": "9999-12-15"}, "date_to is too late to plan windows after it"),
]


@pytest.mark.parametrize(("change", "message"), WRONG_TYPES, ids=[m for _, m in WRONG_TYPES])
def test_every_key_is_type_checked_and_the_error_names_it(
    tmp_path: Path, write_spec: Callable[..., Path], change: dict[str, Any], message: str
) -> None:
    data = {**BASE, **change}
    if isinstance(change.get("date_to"), time):  # not writable as TOML; parsed TOML has it
        with pytest.raises(SpecError) as info:
            BackfillSpec.from_dict(data, base_dir=tmp_path)
    else:
        with pytest.raises(SpecError) as info:
            BackfillSpec.from_toml(write_spec(tmp_path / "spec.toml", data))
    assert message in str(info.value)


UNSAFE_LABELS: list[tuple[str, str]] = [
    ("a\0b", "non-printable"),
    ("tab\there", "non-printable"),
    ("x" * 300, f"300 characters long (at most {MAX_NAME_LENGTH})"),
    ("a:b", "contains one of"),
    ("back\\slash", "contains one of"),
    ("../up", "contains one of"),
    (".hidden", "starts with a dot"),
    ("trailing.", "ends with a dot"),
    ("trailing ", "ends with a dot or a space"),
    ("", "it is empty"),
]


@pytest.mark.parametrize(("label", "why"), UNSAFE_LABELS, ids=[w for _, w in UNSAFE_LABELS])
def test_labels_the_file_system_could_refuse_are_refused_up_front(
    tmp_path: Path, write_spec: Callable[..., Path], label: str, why: str
) -> None:
    data = {**BASE, "tokens": [{"label": label, "env": "X"}]}
    with pytest.raises(SpecError) as info:
        BackfillSpec.from_toml(write_spec(tmp_path / "spec.toml", data))
    assert "file-name-safe" in str(info.value)
    assert why in str(info.value)
    with pytest.raises(SpecError, match="file-name-safe"):  # the Python way too
        BackfillSpec(
            tokens=(TokenSource(label, env="X"),),
            date_from=datetime(2024, 1, 1, tzinfo=UTC),
            date_to=datetime(2024, 2, 1, tzinfo=UTC),
            output=tmp_path,
            reports=("summary",),
        )


def test_longest_allowed_and_non_ascii_labels_load(tmp_path: Path) -> None:
    labels = ["x" * MAX_NAME_LENGTH, "équipe-soins", "チーム 7"]
    spec = BackfillSpec.from_dict(
        {**BASE, "tokens": [{"label": lbl, "env": "X"} for lbl in labels]}, base_dir=tmp_path
    )
    assert [t.label for t in spec.tokens] == labels
    assert check_name("label", "ok") == "ok"


COLLISIONS: list[tuple[dict[str, Any], str]] = [
    (
        {"tokens": [{"label": "Care", "env": "X"}, {"label": "care", "env": "Y"}]},
        "unique, ignoring case: 'Care' and 'care' would share a folder",
    ),
    ({"tokens": [{"label": "a", "env": "X"}, {"label": "a", "file": "t"}]}, "unique"),
    (
        {"reports": ["summary", "user_volume", "summary"]},
        "reports listed twice (they would write the same files): ['summary']",
    ),
    ({"exports": ["case_details", {"kind": "case_details"}]}, "export case_details listed twice"),
    (
        {
            "exports": [
                {"kind": "nps_submissions", "form": 1},
                {"kind": "nps_submissions", "form": 2},
            ]
        },
        "export nps_submissions listed twice",
    ),
    ({"workflow_states_type": "summary"}, "'summary' is already the name of another report"),
    ({"workflow_states_type": "case_details"}, "already the name of another report or export"),
    ({"workflow_states_type": "a/b"}, "workflow_states_type 'a/b' must be a plain file-name"),
]


@pytest.mark.parametrize(("change", "message"), COLLISIONS, ids=[m for _, m in COLLISIONS])
def test_entries_that_would_write_the_same_file_are_refused(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError) as info:
        BackfillSpec.from_dict({**BASE, **change}, base_dir=tmp_path)
    assert message in str(info.value)


def test_type_errors_never_echo_a_string_value(tmp_path: Path) -> None:
    secret = "sk-live-pasted-in-the-wrong-place-77"
    for change in (
        {"window_months": secret},
        {"tokens": [{"label": "a", "env": "X"}], "poll": {"cap": secret}},
        {"rate_limit": {"max_requests": secret}},
        {"exports": secret},
    ):
        with pytest.raises(SpecError) as info:
            BackfillSpec.from_dict({**BASE, **change}, base_dir=tmp_path)
        assert secret not in str(info.value)


def test_a_valid_spec_still_loads_with_every_table(tmp_path: Path) -> None:
    spec = BackfillSpec.from_dict(
        {
            **BASE,
            "reports": ["summary", "nps_volume", "wf"],
            "workflow_states_type": "wf",
            "nps": {"form": 55},
            "exports": ["case_details", {"kind": "nps_submissions", "form": 55}],
            "concurrency": {"per_token": 2, "total": 3},
            "rate_limit": {"max_requests": 10, "window": 2.5, "reserve": 3},
            "poll": {"first_delay": 0, "factor": 1, "cap": 0.5, "jitter_low": 1, "timeout": 9},
            "redis_url": "redis://127.0.0.1:6379/0",
            "api_url": "http://[::1]:8080/v1",
        },
        base_dir=tmp_path,
    )
    assert spec.poll == PollPolicy(first_delay=0, factor=1, cap=0.5, jitter_low=1, timeout=9)
    assert spec.exports == (
        ExportSpec(ExportKind.CASE_DETAILS),
        ExportSpec(ExportKind.NPS_SUBMISSIONS, 55),
    )
    assert (spec.window, spec.reserve) == (2.5, 3)
    assert len(plan(spec).units) == 2 * 5


# -- the fuzz test ----------------------------------------------------------------------

OFFSETS = st.sampled_from([UTC, timezone(timedelta(hours=10)), timezone(timedelta(hours=-5))])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.dates()
    | st.datetimes(timezones=st.none() | OFFSETS)
    | st.times()
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
NUMBER = st.integers(-3, 200) | st.floats(-1.0, 400.0) | st.sampled_from([math.nan, math.inf])
WHEN = (
    st.sampled_from(
        [
            "2024-01-01",
            "2024-03-01T00:00:00+10:00",
            "2024-02-30",
            "2024-05-01Z",
            "2023-12-31T23:00:00",
            "9999-12-31",
        ]
    )
    | st.dates(min_value=date(2020, 1, 1), max_value=date(2026, 1, 1))
    | st.datetimes(
        min_value=datetime(2020, 1, 1),
        max_value=datetime(2026, 1, 1),
        timezones=st.one_of(st.none(), OFFSETS),
    )
)
LABEL = st.sampled_from(["a", "b", "A", "care team", ".x", "a/b", "x" * 101, "n\0l"]) | st.text(
    max_size=8
)
TOKEN_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "label": LABEL | ANY_VALUE,
        "env": st.sampled_from(["X", "LEXER_T"]) | ANY_VALUE,
        "file": st.sampled_from(["t.token", "", "a\0b"]) | ANY_VALUE,
        "token": st.just("secret"),
    },
)
REPORT_NAME = st.sampled_from(["summary", "nps_volume", "states", "wf", "sumary", "case_details"])
EXPORT_ENTRY = st.sampled_from(
    ["case_details", "nps_submissions", "cases"]
) | st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(["case_details", "nps_submissions"]) | ANY_VALUE,
        "form": st.integers(-1, 99) | ANY_VALUE,
        "nps_category": st.sampled_from(["all", "promoters", "fans"]) | ANY_VALUE,
        "extra": ANY_VALUE,
    },
)


VALID_SPECS = st.fixed_dictionaries(
    {
        "tokens": st.lists(
            st.sampled_from(
                [
                    {"label": "a", "env": "X"},
                    {"label": "b", "file": "t.token"},
                    {"label": "care team", "env": "LEXER_T"},
                ]
            ),
            min_size=1,
            max_size=3,
            unique_by=lambda e: e["label"],
        ),
        "date_from": st.dates(min_value=date(2023, 1, 1), max_value=date(2023, 12, 1)),
        "date_to": st.dates(min_value=date(2024, 1, 1), max_value=date(2024, 12, 1))
        | st.datetimes(
            min_value=datetime(2024, 1, 1), max_value=datetime(2024, 12, 1), timezones=OFFSETS
        ),
        "nps": st.just({"form": 55, "category": "all"}),
    },
    optional={
        "output": st.just("out"),
        "reports": st.just("all")
        | st.lists(st.sampled_from(["summary", "nps_volume", "user_volume"]), unique=True),
        "exports": st.lists(
            st.sampled_from(["case_details", {"kind": "nps_submissions", "form": 55}]),
            unique_by=str,
        ),
        "window_months": st.integers(1, 12),
        "concurrency": st.just({"per_token": 2, "total": 4}),
        "rate_limit": st.just({"max_requests": 10, "window": 1.5}),
        "poll": st.just({"first_delay": 0.1, "factor": 2, "cap": 1, "timeout": 60}),
        "workflow_states_type": st.just("states"),
    },
)
"""Specs that load, to be mutated: the fuzz test reaches every check, not just the first."""
WILD: dict[str, st.SearchStrategy[Any]] = {
    "tokens": st.lists(TOKEN_ENTRY, min_size=1, max_size=3),
    "date_from": WHEN | st.sampled_from(["-90d", "-2w", "-0d", "-3x", "90d", "-"]),
    "date_to": WHEN | st.sampled_from(["now", "Now", "2026-12-31"]),
    "settle": st.sampled_from(["2d", "36h", "0d", "3y", "", 7200, -1, 1e300]),
    "lookback": st.sampled_from(["3d", "400d", "1w", "x", 0]),
    "output": st.sampled_from(["out", "", "a\0b"]),
    "reports": st.just("all") | st.lists(REPORT_NAME, max_size=3),
    "exports": st.lists(EXPORT_ENTRY, max_size=3),
    "window_months": st.integers(-1, 13),
    "api_url": st.sampled_from(["http://127.0.0.1:1/v1", "ftp://x", "http://[::1", "http://"]),
    "redis_url": st.sampled_from(["redis://127.0.0.1:1", "unix:///tmp/r.sock", "x"]),
    "workflow_states_type": st.sampled_from(["states", "wf", "summary", "a/b"]),
    "form": st.integers(-1, 99),
    "category": st.sampled_from(["all", "promoters", "fans"]),
}
TABLES = {
    "nps": ["form", "category"],
    "concurrency": ["per_token", "total"],
    "rate_limit": ["max_requests", "window", "reserve"],
    "poll": ["first_delay", "factor", "cap", "jitter_low", "timeout"],
}
TOP_KEYS = [
    "tokens",
    "date_from",
    "date_to",
    "output",
    "reports",
    "exports",
    "nps",
    "window_months",
    "concurrency",
    "api_url",
    "status_url",
    "rate_limit",
    "redis_url",
    "workflow_states_type",
    "poll",
    "settle",
    "lookback",
    "unknown",
    "token",
]


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid spec with up to four keys (or keys of its tables) replaced or removed."""
    spec: dict[str, Any] = draw(VALID_SPECS)
    spec = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.items()}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(TOP_KEYS))
        target, sub = spec, key
        if key in TABLES and draw(st.booleans()):
            if not isinstance(spec.get(key), dict):
                spec[key] = {}
            target, sub = spec[key], draw(st.sampled_from([*TABLES[key], "bogus"]))
        if draw(st.integers(0, 5)) == 0:
            target.pop(sub, None)
        else:
            wild = WILD.get(sub, NUMBER if key in TABLES and target is not spec else ANY_VALUE)
            target[sub] = draw(wild | ANY_VALUE)
    return spec


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=specs())
def test_every_generated_spec_loads_or_raises_spec_error(data: dict[str, Any]) -> None:
    message = None
    try:
        spec = BackfillSpec.from_dict(data, base_dir=Path("/nonexistent-spec-dir"))
    except SpecError as error:
        message = str(error)
    if message is not None:
        assert "secret" not in message
        return
    # A spec that loads is one the planner (and so --dry-run and the runner) can use;
    # one relative to "now" may only be refused as such (a range not yet begun).
    now = datetime(2026, 6, 15, tzinfo=UTC)
    start, end = spec.date_from, spec.date_to
    if isinstance(start, datetime) and end is not None and end <= now:
        if end - start < timedelta(days=3660):
            assert plan(spec, now=now).units
        return
    refusal = None
    try:
        units = plan(spec, now=now).units
    except SpecError as error:
        refusal = str(error)
    if refusal is None:
        assert units
    else:
        assert any(
            why in refusal for why in ("in the future", "longer than the range", "must be before")
        )
