"""The request-minimizing planner: adjacent windows of a series report fetched in one
request and sliced per window.

The property test runs a backfill twice over loopback HTTP against the consistent
sandbox, joined and window by window (``join=False``), for random ranges, UTC offsets,
window lengths and "now"s, and requires the same files byte for byte. The other tests pin
the rules per window: what is done never joins a fetch, a window reaching past now ends
its group, a file that cannot be written fails its window alone, a failed request fails
every window of its group, and a joined fetch is one slot of the per-token cap.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import TOKEN_A, TOKEN_B
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lexer_activity_async import LimiterRegistry, wire
from lexer_activity_async.backfill import (
    CHECKPOINT_NAME,
    BackfillEvent,
    BackfillSpec,
    ExportSpec,
    FetchGroup,
    TokenSource,
    Unit,
    UnitFinished,
    UnitStarted,
    export_window_costs,
    fetch_groups,
    plan,
    run_backfill,
)
from lexer_activity_async.backfill.plan import Fetches, requests_of, window_order
from lexer_activity_async.backfill.slicing import Slicer, slice_series
from lexer_activity_async.backfill.spec import run_identity
from lexer_activity_async.checkpoint import DONE
from lexer_activity_async.reports import ExportKind, ReportType, add_months
from lexer_activity_async.sandbox import Sandbox, _data

UTC = timezone.utc
NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
ENV_A, ENV_B = "LEXER_TEST_PLANNER_A", "LEXER_TEST_PLANNER_B"
SERIES = ("states_volume", "response_volume", "case_volume", "nps_volume")


def spec_for(sb: Sandbox | None, output: Path, **overrides: Any) -> BackfillSpec:
    fields: dict[str, Any] = {
        "tokens": (TokenSource("a", env=ENV_A),),
        "date_from": datetime(2024, 1, 1, tzinfo=UTC),
        "date_to": datetime(2024, 7, 1, tzinfo=UTC),
        "output": output,
        "reports": (*SERIES, "summary"),
        "nps_form": 55,
        "api_url": sb.api_url if sb else "http://127.0.0.1:9",
        "status_url": sb.status_url if sb else "http://127.0.0.1:9",
        "max_requests": 10_000,
    }
    fields.update(overrides)
    return BackfillSpec(**fields)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the checkpoint, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(CHECKPOINT_NAME)
    }


def shape(fetches: list[Unit | FetchGroup]) -> list[tuple[str, int]]:
    """Each fetch as (report, windows it serves)."""
    return [(f.name, len(f.units)) if isinstance(f, FetchGroup) else (f.name, 1) for f in fetches]


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_A, TOKEN_A)
    monkeypatch.setenv(ENV_B, TOKEN_B)


# -- which windows join (pure) -------------------------------------------------------------


def test_series_windows_join_up_to_twelve_months_and_aggregates_never() -> None:
    spec = spec_for(
        None,
        Path("out"),
        date_from=datetime(2023, 1, 1, tzinfo=UTC),
        date_to=datetime(2025, 3, 1, tzinfo=UTC),
        reports=("summary", "case_volume"),
    )
    fetches = fetch_groups(plan(spec, now=NOW).units_of("a"))
    assert shape([f for f in fetches if f.name == "case_volume"]) == [
        ("case_volume", 12),
        ("case_volume", 12),
        ("case_volume", 2),
    ]
    assert shape([f for f in fetches if f.name == "summary"]) == [("summary", 1)] * 26
    # Every unit is served exactly once, in plan order of each group's first window.
    served = [u for f in fetches for u in (f.units if isinstance(f, FetchGroup) else (f,))]
    assert sorted(u.id for u in served) == sorted(u.id for u in plan(spec, now=NOW).units)
    assert [f.name for f in fetches[:2]] == ["summary", "case_volume"]
    # Five-month windows: two make ten months, a third would pass twelve.
    five = spec_for(None, Path("o"), window_months=5, date_to=datetime(2026, 1, 1, tzinfo=UTC))
    assert shape(fetch_groups(plan(five, now=NOW).units_of("a"), join=True))[:5] == [
        ("states_volume", 2),
        ("response_volume", 2),
        ("case_volume", 2),
        ("nps_volume", 2),
        ("summary", 1),
    ]
    assert all(
        n == 1 for _, n in shape(fetch_groups(plan(five, now=NOW).units_of("a"), join=False))
    )


def chain_positions(total: int, share: int) -> set[int]:
    """The request positions a token's last rate window waits on: the first ``tail`` of
    every window (``tail``: the requests of the last one) and the whole last window."""
    windows = -(-total // share)
    tail = total - (windows - 1) * share
    last = (windows - 1) * share
    return {p for p in range(total) if p >= last or p % share < tail}


def positions(fetches: list[Unit | FetchGroup]) -> list[int]:
    out, at = [], 0
    for fetch in fetches:
        out.append(at)
        at += requests_of((fetch,))
    return out


def test_joined_fetches_go_to_the_end_of_the_first_window_off_the_chain() -> None:
    """26 months of 12 reports: 220 requests, 90 a window (the bulk share of 100), so the
    last window holds 40. The 12 joined fetches go to the end of the first window
    (positions 78-89), not among the first 40 of a window nor into the last one; every
    other fetch keeps its order."""
    spec = spec_for(
        None,
        Path("out"),
        date_from=datetime(2023, 1, 1, tzinfo=UTC),
        date_to=datetime(2025, 3, 1, tzinfo=UTC),
        reports=tuple(r.value for r in ReportType),
        max_requests=100,
    )
    fetches = fetch_groups(plan(spec, now=NOW).units_of("a"))
    assert requests_of(fetches) == 220
    ordered = window_order(fetches, spec.bulk_max_requests)
    assert spec.bulk_max_requests == 90
    assert sorted(map(id, ordered)) == sorted(map(id, fetches))  # the same fetches
    at = positions(ordered)
    joined_at = [p for p, f in zip(at, ordered, strict=True) if isinstance(f, FetchGroup)]
    assert joined_at == list(range(78, 90))
    assert not set(joined_at) & chain_positions(220, 90)
    others = [f for f in ordered if not isinstance(f, FetchGroup)]
    assert others == [f for f in fetches if not isinstance(f, FetchGroup)]
    # Before: the first window's first fetches and the last window held joined ones.
    before = [
        p for p, f in zip(positions(fetches), fetches, strict=True) if isinstance(f, FetchGroup)
    ]
    assert set(before) & chain_positions(220, 90)


@settings(max_examples=200, deadline=None)
@given(
    months=st.integers(min_value=1, max_value=40),
    share=st.integers(min_value=1, max_value=120),
    reports=st.sets(st.sampled_from([r.value for r in ReportType]), min_size=1),
)
def test_window_order_keeps_joined_fetches_off_the_chain_when_they_fit(
    months: int, share: int, reports: set[str]
) -> None:
    spec = spec_for(
        None,
        Path("out"),
        date_from=datetime(2022, 1, 1, tzinfo=UTC),
        date_to=add_months(datetime(2022, 1, 1, tzinfo=UTC), months),
        reports=tuple(sorted(reports)),
    )
    fetches = fetch_groups(plan(spec, now=NOW).units_of("a"))
    ordered = window_order(fetches, share)
    assert sorted(map(id, ordered)) == sorted(map(id, fetches))
    others = [f for f in ordered if not isinstance(f, FetchGroup)]
    assert others == [f for f in fetches if not isinstance(f, FetchGroup)]
    total = requests_of(fetches)
    joined = sum(isinstance(f, FetchGroup) for f in fetches)
    if total <= share:
        assert ordered == fetches  # one window: nothing to gain
        return
    chain = chain_positions(total, share)
    off_chain_room = total - len(chain)
    on_chain = sum(
        isinstance(f, FetchGroup) and p in chain
        for p, f in zip(positions(ordered), ordered, strict=True)
    )
    assert on_chain == max(0, joined - off_chain_room)


def test_a_token_keeps_its_fetches_as_codes_and_takes_them_back_equal() -> None:
    """`Fetches`: every fetch (joined groups, single windows, exports, a window reaching
    past now, a subset with done windows left out) comes back equal and in order,
    ``until`` and export format included; `units` gives what is left."""
    spec = spec_for(
        None,
        Path("out"),
        date_from=datetime(2023, 1, 1, tzinfo=UTC),
        date_to=datetime(2026, 9, 1, tzinfo=UTC),  # past NOW: the last windows are clipped
        reports=("summary", "case_volume", "nps_volume"),
        exports=(ExportSpec(ExportKind.CASE_DETAILS), ExportSpec(ExportKind.NPS_SUBMISSIONS, 55)),
        export_window_months=3,
        export_format="parquet",
    )
    the_plan = plan(spec, now=NOW)
    units = the_plan.units_of("a")
    subset = [u for i, u in enumerate(units) if i % 7 != 3]  # some done: groups split
    for chosen in (units, subset):
        expected = fetch_groups(chosen)
        fetches = Fetches(the_plan, "a", expected)
        assert len(fetches) == len(expected)
        served = [u for f in expected for u in (f.units if isinstance(f, FetchGroup) else (f,))]
        assert sorted(u.id for u in served) == sorted(u.id for u in chosen)
        assert list(fetches.units()) == served
        taken = [fetches.popleft() for _ in range(len(expected))]
        assert taken == expected
        flat = [u for f in taken for u in (f.units if isinstance(f, FetchGroup) else (f,))]
        assert [(u.until, u.export_format) for u in flat] == [
            (u.until, u.export_format) for u in served
        ]
        assert {u.until for u in flat} == {None, NOW}
        assert {u.export_format for u in flat if u.is_export} == {"parquet"}
        assert not fetches
        with pytest.raises(IndexError):
            fetches.popleft()
    fetches = Fetches(the_plan, "a", fetch_groups(units))
    fetches.popleft()
    fetches.clear()
    assert (len(fetches), list(fetches.units())) == (0, [])


def test_only_daily_windows_on_period_boundaries_join() -> None:
    # The last window is 3 days: hourly for states_volume and response_volume, so alone.
    short = spec_for(None, Path("o"), date_to=datetime(2024, 3, 4, tzinfo=UTC))
    assert sorted(shape(fetch_groups(plan(short, now=NOW).units_of("a")))) == sorted(
        [
            ("states_volume", 2),
            ("states_volume", 1),
            ("response_volume", 2),
            ("response_volume", 1),
            ("case_volume", 3),
            ("nps_volume", 3),
            *[("summary", 1)] * 3,
        ]
    )
    # Windows starting at 06:00 UTC: no boundary starts a day, nothing joins ...
    off = spec_for(None, Path("o"), date_from=datetime(2024, 1, 1, 6, tzinfo=UTC))
    assert all(n == 1 for _, n in shape(fetch_groups(plan(off, now=NOW).units_of("a"))))
    # ... but at local midnight of their own offset they do.
    sydney = timezone(timedelta(hours=11))
    local = spec_for(
        None,
        Path("o"),
        date_from=datetime(2024, 1, 1, tzinfo=sydney),
        date_to=datetime(2024, 7, 1, tzinfo=sydney),
    )
    assert ("case_volume", 6) in shape(fetch_groups(plan(local, now=NOW).units_of("a")))


def test_export_windows_are_set_apart_and_the_dry_run_costs_each_choice() -> None:
    exports = (ExportSpec(ExportKind.CASE_DETAILS), ExportSpec(ExportKind.NPS_SUBMISSIONS, 55))
    base = spec_for(
        None,
        Path("o"),
        date_from=datetime(2023, 1, 1, tzinfo=UTC),
        date_to=datetime(2025, 3, 1, tzinfo=UTC),
        reports=("summary",),
        exports=exports,
        max_requests=100,
    )
    apart = plan(BackfillSpec(**{**_fields(base), "export_window_months": 12}), now=NOW)
    assert len(apart.windows) == 26
    assert [w[0].year for w in apart.export_windows] == [2023, 2024, 2025]
    units = apart.units_of("a")
    assert sum(u.is_export for u in units) == 3 * 2
    assert {(u.date_from, u.date_to) for u in units if u.is_export} == set(apart.export_windows)
    assert apart.export_windows[-1] == (datetime(2025, 1, 1, tzinfo=UTC), base.date_to)
    # 26 summaries + 6 jobs x (start + 2 polls), against 26 + 52 x 3 window by window.
    assert apart.requests_of("a") == 26 + 18
    costs = {c.months: c for c in export_window_costs(plan(base, now=NOW))}
    assert sorted(costs) == [1, 3, 6, 12]
    assert (costs[1].windows, costs[1].requests) == (26, 26 + 26 * 2 * 3)
    assert (costs[12].windows, costs[12].requests) == (3, 26 + 18)
    assert costs[12].least_seconds < costs[1].least_seconds


def _fields(spec: BackfillSpec) -> dict[str, Any]:
    import attrs

    return attrs.asdict(spec, recurse=False)


def test_export_window_months_in_the_spec_file(tmp_path: Path) -> None:
    text = (
        'date_from = "2024-01-01"\ndate_to = "2025-01-01"\nreports = ["summary"]\n'
        "export_window_months = 6\n"
        '[[tokens]]\nlabel = "a"\nenv = "X"\n[[exports]]\nkind = "case_details"\n'
    )
    (tmp_path / "spec.toml").write_text(text)
    spec = BackfillSpec.from_toml(tmp_path / "spec.toml")
    assert spec.export_window_months == 6
    assert len(plan(spec, now=NOW).export_windows) == 2
    (tmp_path / "bad.toml").write_text(text.replace("= 6", "= 13"))
    with pytest.raises(ValueError, match="export_window_months must be 1 to 12"):
        BackfillSpec.from_toml(tmp_path / "bad.toml")


@pytest.mark.parametrize(
    ("key", "value"),
    [("export_window_months", 6), ("export_format", "parquet"), ("format", "raw")],
)
def test_keys_that_change_the_files_are_in_the_run_identity(
    tmp_path: Path, key: str, value: Any
) -> None:
    """Workers sharing a checkpoint must agree on them: each changes which files are
    written (export windows change the export units and their names). At their default
    they stay out, so a database written before they were keys still matches."""
    spec = spec_for(None, tmp_path, exports=(ExportSpec(ExportKind.CASE_DETAILS),))
    base = run_identity(spec)
    assert key not in base
    changed = run_identity(attrs.evolve(spec, **{key: value}))
    assert sorted(k for k in changed if changed[k] != base.get(k)) == [key]


# -- byte for byte, for random ranges and offsets (loopback HTTP) ---------------------------

offsets = st.builds(
    lambda h, m: timezone(timedelta(hours=h, minutes=m if h >= 0 else -m)),
    st.integers(-12, 13),
    st.sampled_from([0, 0, 30]),
)
days = st.datetimes(datetime(2019, 1, 1), datetime(2025, 6, 1)).map(
    lambda d: d.replace(hour=0, minute=0, second=0, microsecond=0)
)


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    start=days,
    tz=offsets,
    span_days=st.integers(2, 500),
    window_months=st.integers(1, 3),
    open_end=st.booleans(),
    odd_start=st.integers(0, 4),
)
@example(  # one 3-month window holds all 70 days: nothing to join
    start=datetime(2025, 6, 1),
    tz=timezone.utc,
    span_days=70,
    window_months=3,
    open_end=False,
    odd_start=1,
)
def test_joined_fetches_write_the_window_by_window_files_byte_for_byte(
    sandbox_in_thread: Callable[..., Sandbox],
    token_env: None,
    start: datetime,
    tz: timezone,
    span_days: int,
    window_months: int,
    open_end: bool,
    odd_start: int,
) -> None:
    date_from = start.replace(tzinfo=tz)
    if odd_start == 0:  # now and then a window grid off the day starts
        date_from += timedelta(hours=5, seconds=7)
    end = date_from + timedelta(days=span_days, hours=odd_start * 5)
    # An open end: "now" is the range's end, so the last window reaches past it.
    now = end if open_end else NOW
    sb = sandbox_in_thread(now=lambda: now, tokens=None)
    out = Path(tempfile.mkdtemp(prefix="planner-"))
    try:
        spec = spec_for(
            sb,
            out / "joined",
            date_from=date_from,
            date_to=None if open_end else end,
            window_months=window_months,
            settle=timedelta(0),
        )
        joined = _run(spec, now)
        each = _run(spec_for_output(spec, out / "each"), now, join=False)
        assert joined.ok
        assert each.ok
        assert tree(out / "joined") == tree(out / "each")
        the_plan = plan(spec, now=now)
        assert joined.requests == the_plan.requests_of("a")
        assert each.requests == the_plan.requests_of("a", join=False) == the_plan.units_per_token
        if odd_start and span_days >= 70 * window_months:  # day starts, two whole windows
            assert joined.requests < each.requests
    finally:
        shutil.rmtree(out, ignore_errors=True)


def spec_for_output(spec: BackfillSpec, output: Path) -> BackfillSpec:
    return BackfillSpec(**{**_fields(spec), "output": output})


def _run(spec: BackfillSpec, now: datetime, *, join: bool = True) -> Any:
    return asyncio.run(
        run_backfill(spec, registry=LimiterRegistry(), now=lambda: now, join=join, tune_gc=False)
    )


# -- the rules per window --------------------------------------------------------------


@pytest.mark.usefixtures("token_env")
async def test_done_windows_never_join_and_a_missing_file_is_fetched_alone(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    sb = await sandbox_factory()
    key = Sandbox.key(TOKEN_A)
    spec = spec_for(sb, tmp_path / "out", reports=("case_volume", "summary"))
    first = await run_backfill(spec, registry=LimiterRegistry(), now=lambda: NOW)
    assert first.ok
    assert first.requests == sb.stats.requests[key] == 1 + 6
    files = tree(spec.output)
    march = Unit("a", "case_volume", False, *plan(spec, now=NOW).windows[2]).path(spec.output)
    march.unlink()
    again = await run_backfill(spec, registry=LimiterRegistry(), now=lambda: NOW)
    assert (again.requests, sum(again.done.values()), sum(again.skipped.values())) == (1, 1, 11)
    assert tree(spec.output) == files
    # Two more months: only they are fetched, the new series windows in one request.
    longer = BackfillSpec(**{**_fields(spec), "date_to": datetime(2024, 9, 1, tzinfo=UTC)})
    more = await run_backfill(longer, registry=LimiterRegistry(), now=lambda: NOW)
    assert (more.requests, sum(more.done.values())) == (1 + 2, 4)
    reference = BackfillSpec(**{**_fields(longer), "output": tmp_path / "each"})
    each = await run_backfill(reference, registry=LimiterRegistry(), now=lambda: NOW, join=False)
    assert each.requests == 2 * 8
    assert tree(longer.output) == tree(reference.output)


@pytest.mark.usefixtures("token_env")
@pytest.mark.parametrize(
    ("now", "first_requests"),
    [
        # June reaches past now, daily (14.5 days): last in the one group of each series.
        (datetime(2026, 6, 15, 12, tzinfo=UTC), 4),
        # June is 1.5 days: hourly for states_volume and response_volume, so fetched alone.
        (datetime(2026, 6, 2, 12, tzinfo=UTC), 6),
    ],
)
async def test_a_window_reaching_past_now_ends_its_group_and_is_refetched_alone(
    sandbox_factory: Callable[..., Any], tmp_path: Path, now: datetime, first_requests: int
) -> None:
    sb = await sandbox_factory(now=lambda: now)
    spec = spec_for(
        sb,
        tmp_path / "out",
        date_from=datetime(2026, 1, 1, tzinfo=UTC),
        date_to=None,
        reports=SERIES,
        settle=timedelta(hours=12),  # May has settled even on June 2
    )
    the_plan = plan(spec, now=now)
    june = [u for u in the_plan.units_of("a") if u.until is not None]
    assert len(june) == 4
    assert all(the_plan.is_provisional(u) for u in june)
    first = await run_backfill(spec, registry=LimiterRegistry(), now=lambda: now)
    assert first.ok
    assert first.requests == first_requests
    assert first.provisional == {"a": 4}
    # The next run refetches the provisional windows only, each alone.
    again = await run_backfill(spec, registry=LimiterRegistry(), now=lambda: now)
    assert (again.requests, sum(again.done.values()), sum(again.skipped.values())) == (4, 4, 20)
    reference = BackfillSpec(**{**_fields(spec), "output": tmp_path / "each"})
    await run_backfill(reference, registry=LimiterRegistry(), now=lambda: now, join=False)
    assert tree(spec.output) == tree(reference.output)


@pytest.mark.usefixtures("token_env")
async def test_a_window_whose_file_cannot_be_written_fails_alone(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    sb = await sandbox_factory()
    spec = spec_for(sb, tmp_path / "out", reports=("nps_volume",))
    feb = Unit("a", "nps_volume", False, *plan(spec, now=NOW).windows[1]).path(spec.output)
    feb.mkdir(parents=True)  # a folder where the file goes: the OS refuses to write it
    summary = await run_backfill(spec, registry=LimiterRegistry(), now=lambda: NOW)
    assert summary.requests == 1
    assert summary.done == {"a": 5}
    [(unit_id, error)] = summary.failed["a"]
    assert unit_id.endswith(feb.name.removesuffix(".json"))
    assert "OutputError" in error
    feb.rmdir()
    retried = await run_backfill(
        spec, registry=LimiterRegistry(), now=lambda: NOW, retry_failed=True
    )
    assert (retried.requests, retried.done) == (1, {"a": 1})
    reference = BackfillSpec(**{**_fields(spec), "output": tmp_path / "each"})
    await run_backfill(reference, registry=LimiterRegistry(), now=lambda: NOW, join=False)
    assert tree(spec.output) == tree(reference.output)


@pytest.mark.usefixtures("token_env")
async def test_a_failed_joined_request_fails_every_window_and_retry_completes_them(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    sb = await sandbox_factory(tokens=frozenset({TOKEN_A}))
    spec = spec_for(sb, tmp_path / "out", tokens=(TokenSource("a", env=ENV_B),))
    summary = await run_backfill(spec, registry=LimiterRegistry(), now=lambda: NOW)
    assert summary.done == {"a": 0}
    assert len(summary.failed["a"]) == 5 * 6
    assert all("401" in error or "not attempted" in error for _, error in summary.failed["a"])
    fixed = BackfillSpec(**{**_fields(spec), "tokens": (TokenSource("a", env=ENV_A),)})
    retried = await run_backfill(
        fixed, registry=LimiterRegistry(), now=lambda: NOW, retry_failed=True
    )
    assert retried.ok
    assert (retried.done, retried.requests) == ({"a": 30}, 4 + 6)


@pytest.mark.usefixtures("token_env")
async def test_a_joined_fetch_is_one_slot_of_the_per_token_cap(
    sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    sb = await sandbox_factory(latency=0.01)
    spec = spec_for(sb, tmp_path / "out", per_token_concurrency=1, total_concurrency=1)
    events: list[tuple[str, str]] = []

    def watch(event: BackfillEvent) -> None:
        if isinstance(event, (UnitStarted, UnitFinished)):
            events.append((type(event).__name__, event.unit.name))

    summary = await run_backfill(spec, on_event=watch, registry=LimiterRegistry(), now=lambda: NOW)
    assert summary.ok
    assert summary.requests == 4 + 6
    assert sb.stats.max_in_progress == 1
    # One fetch at a time: a series' six windows start together and finish before the
    # next fetch starts.
    runs = [(kind, name, len(list(g))) for (kind, name), g in itertools.groupby(events)]
    assert runs[:4] == [
        ("UnitStarted", "states_volume", 6),
        ("UnitFinished", "states_volume", 6),
        ("UnitStarted", "response_volume", 6),
        ("UnitFinished", "response_volume", 6),
    ]
    assert states_of(spec.output) == {DONE}


def states_of(output: Path) -> set[str]:
    import sqlite3

    with sqlite3.connect(output / CHECKPOINT_NAME) as db:
        return {row[0] for row in db.execute("SELECT state FROM units")}


def test_exports_table_window_months(tmp_path: Path) -> None:
    """``[exports] window_months`` sets the export windows where exports are a table; set
    twice (there and top-level) it is refused."""
    text = (
        'date_from = "2024-01-01"\ndate_to = "2025-01-01"\nreports = ["summary"]\n'
        '[[tokens]]\nlabel = "a"\nenv = "X"\n'
        '[exports]\nwindow_months = 6\n[[exports.kinds]]\nkind = "case_details"\n'
    )
    (tmp_path / "spec.toml").write_text(text)
    spec = BackfillSpec.from_toml(tmp_path / "spec.toml")
    assert spec.export_window_months == 6
    assert len(plan(spec, now=NOW).export_windows) == 2
    (tmp_path / "bad.toml").write_text(text.replace("= 6", "= 0"))
    with pytest.raises(ValueError, match=r"\[exports\] window_months must be 1 to 12"):
        BackfillSpec.from_toml(tmp_path / "bad.toml")
    (tmp_path / "twice.toml").write_text("export_window_months = 3\n" + text)
    with pytest.raises(ValueError, match="not both"):
        BackfillSpec.from_toml(tmp_path / "twice.toml")


@settings(max_examples=25, deadline=None, database=None)
@given(
    st.sampled_from(["states_volume", "response_volume", "case_volume", "nps_volume"]),
    st.integers(-12, 14),
    st.lists(st.tuples(st.integers(-3, 40), st.integers(1, 30)), min_size=1, max_size=6),
    st.booleans(),
)
def test_a_slicer_cuts_every_window_as_slice_series(
    name: str, hours: int, windows: list[tuple[int, int]], shuffled: bool
) -> None:
    """`Slicer` (period starts read once, windows bisected) gives each window the points
    `slice_series` gives, for series in order and, read point by point, out of order."""
    tz = timezone(timedelta(hours=hours))
    start = datetime(2024, 3, 1, tzinfo=tz)
    kind = ReportType(name)
    params = {"form": 55} if kind.needs_form else {}
    body = _data.report_body(kind, "0123abcd", start, start + timedelta(days=40), params)
    result: Any = wire.decode_report(kind, 200, body, tz=tz)
    if shuffled:  # a server sending its points out of order
        if isinstance(result, list):
            result = result[::-1]
        else:
            field = attrs.fields(type(result))[0].name
            value = getattr(result, field)
            flipped = (
                {k: v[::-1] for k, v in value.items()} if isinstance(value, dict) else value[::-1]
            )
            result = attrs.evolve(result, **{field: flipped})
    window_of = Slicer(result)
    for first, days in windows:
        lo = start + timedelta(days=first)
        hi = lo + timedelta(days=days)
        assert window_of(lo, hi) == slice_series(result, lo, hi)
