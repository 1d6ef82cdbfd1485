"""Bulk backfills in-process: the spec (TOML and Python), the planner, the runner against
the sandbox (caps, layout, atomic writes, the checkpoint, resume, isolated failures and
``retry_failed``), and the rate-limit floor. The CLI and crash-by-SIGKILL tests are in
``test_cli.py``."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from conftest import TOKEN_A, TOKEN_B

from lexer_activity_async import LimiterRegistry
from lexer_activity_async.backfill import (
    ALL_REPORTS,
    CHECKPOINT_NAME,
    GC_THRESHOLDS,
    BackfillEvent,
    BackfillSpec,
    BackfillSummary,
    ExportSpec,
    SpecError,
    TokenSource,
    Unit,
    UnitFinished,
    UnitStarted,
    gc_tuned,
    plan,
    rate_limit_floor,
    run_backfill,
)
from lexer_activity_async.backfill.admission import LARGE_SHARE, RankedCapacity
from lexer_activity_async.backfill.writer import ReportWriter
from lexer_activity_async.checkpoint import DONE, FAILED, PENDING, Checkpoint
from lexer_activity_async.events import ExportState, RateLimitWait, RequestSent
from lexer_activity_async.exports import PollPolicy
from lexer_activity_async.models import converter
from lexer_activity_async.reports import ExportKind, add_months
from lexer_activity_async.sandbox import Sandbox

UTC = timezone.utc
JAN = datetime(2024, 1, 1, tzinfo=UTC)
MAR = datetime(2024, 3, 1, tzinfo=UTC)
ENV_A, ENV_B = "LEXER_TEST_BACKFILL_A", "LEXER_TEST_BACKFILL_B"
FAST_POLL = PollPolicy(first_delay=0.05, cap=0.2)
EXPORTS = (ExportSpec(ExportKind.CASE_DETAILS), ExportSpec(ExportKind.NPS_SUBMISSIONS, 55))


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_A, TOKEN_A)
    monkeypatch.setenv(ENV_B, TOKEN_B)


def make_spec(sb: Sandbox, output: Path, **overrides: Any) -> BackfillSpec:
    """Two tokens (a, b) x two months x two reports and two exports, against ``sb``."""
    fields: dict[str, Any] = {
        "tokens": (TokenSource("a", env=ENV_A), TokenSource("b", env=ENV_B)),
        "date_from": JAN,
        "date_to": MAR,
        "output": output,
        "reports": ("summary", "nps_volume"),
        "nps_form": 55,
        "exports": EXPORTS,
        "api_url": sb.api_url,
        "status_url": sb.status_url,
        "max_requests": sb.config.max_requests,
        "window": sb.config.window,
        "poll": FAST_POLL,
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


def assert_no_token_anywhere(root: Path, *tokens: str) -> None:
    for path in root.rglob("*"):
        for token in tokens:
            assert token not in str(path)
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


def states(output: Path) -> dict[str, tuple[str, str | None, str | None]]:
    with sqlite3.connect(output / CHECKPOINT_NAME) as db:
        rows = db.execute("SELECT unit_id, state, report_token, error FROM units").fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


# -- the spec ------------------------------------------------------------------------------


def test_toml_spec_equals_the_python_object(
    tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    (tmp_path / "secrets").mkdir()
    path = write_spec(
        tmp_path / "spec.toml",
        {
            "date_from": "2023-11-15",
            "date_to": "2025-02-03T00:00:00+10:00",
            "output": "out",
            "reports": ["summary", "nps_summary"],
            "window_months": 2,
            "api_url": "http://127.0.0.1:1/v1",
            "status_url": "http://127.0.0.1:2/api/public/v1",
            "tokens": [
                {"label": "care", "env": "CARE_TOKEN"},
                {"label": "sales", "file": "secrets/sales.token"},
            ],
            "nps": {"form": 55, "category": "promoters"},
            "exports": [
                "case_details",
                {"kind": "nps_submissions", "form": 55, "nps_category": "detractors"},
            ],
            "concurrency": {"per_token": 3, "total": 5},
            "rate_limit": {"max_requests": 50, "window": 60},
            "poll": {"first_delay": 0.05, "cap": 0.2},
        },
    )
    expected = BackfillSpec(
        tokens=(
            TokenSource("care", env="CARE_TOKEN"),
            TokenSource("sales", file=tmp_path / "secrets" / "sales.token"),
        ),
        date_from=datetime(2023, 11, 15, tzinfo=UTC),
        date_to=datetime(2025, 2, 3, tzinfo=timezone(timedelta(hours=10))),
        output=tmp_path / "out",
        reports=("summary", "nps_summary"),
        exports=(
            ExportSpec(ExportKind.CASE_DETAILS),
            ExportSpec(ExportKind.NPS_SUBMISSIONS, 55, "detractors"),
        ),
        nps_form=55,
        nps_category="promoters",
        window_months=2,
        per_token_concurrency=3,
        total_concurrency=5,
        api_url="http://127.0.0.1:1/v1",
        status_url="http://127.0.0.1:2/api/public/v1",
        max_requests=50,
        window=60,
        poll=PollPolicy(first_delay=0.05, cap=0.2),
    )
    spec = BackfillSpec.from_toml(path)
    assert spec == expected
    assert isinstance(spec.date_to, datetime)
    assert spec.date_to.utcoffset() == timedelta(hours=10)


def test_spec_defaults_and_native_toml_dates(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(
        "date_from = 2024-01-01\n"
        "date_to = 2024-07-01T00:00:00+11:00\n"
        'tokens = [{label = "only", env = "X"}]\n'
        "nps = {form = 55}\n"
    )
    spec = BackfillSpec.from_toml(path)
    assert spec.date_from == JAN
    assert isinstance(spec.date_from, datetime)
    assert spec.date_from.tzinfo is not None
    assert spec.date_to == datetime(2024, 6, 30, 13, tzinfo=UTC)
    assert spec.reports == ALL_REPORTS
    assert spec.window_months == 1
    assert (spec.per_token_concurrency, spec.total_concurrency) == (8, 64)
    assert (spec.max_requests, spec.window) == (100, 300.0)
    assert spec.output == tmp_path / "lexer-output"
    assert spec.poll == PollPolicy()
    assert spec.nps_category == "all"


def test_token_sources_read_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEXER_TEST_TOKEN_SOURCE", "  from-env \n")
    assert TokenSource("e", env="LEXER_TEST_TOKEN_SOURCE").read() == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert TokenSource("f", file=tmp_path / "t").read() == "from-file"
    monkeypatch.delenv("LEXER_TEST_TOKEN_SOURCE")
    with pytest.raises(SpecError, match="LEXER_TEST_TOKEN_SOURCE is unset"):
        TokenSource("e", env="LEXER_TEST_TOKEN_SOURCE").read()
    with pytest.raises(SpecError, match="cannot read"):
        TokenSource("f", file=tmp_path / "missing").read()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SpecError, match="is empty"):
        TokenSource("f", file=tmp_path / "empty").read()


SECRET = "sk-live-do-not-print-me-4242"


@pytest.mark.parametrize(
    "data",
    [
        {"tokens": [{"label": "a", "token": SECRET}]},
        {"tokens": [{"label": "a", "env": "X"}], "token": SECRET},
    ],
    ids=["in-a-token-entry", "top-level"],
)
def test_a_token_in_the_spec_is_rejected_without_echoing_it(
    tmp_path: Path, write_spec: Callable[..., Path], data: dict[str, Any]
) -> None:
    path = write_spec(
        tmp_path / "spec.toml", {"date_from": "2024-01-01", "date_to": "2024-02-01", **data}
    )
    with pytest.raises(SpecError) as info:
        BackfillSpec.from_toml(path)
    assert "never in the spec" in str(info.value)
    assert "environment variable" in str(info.value)
    assert SECRET not in str(info.value)


BASE: dict[str, Any] = {
    "date_from": "2024-01-01",
    "date_to": "2024-03-01",
    "reports": ["summary"],
    "tokens": [{"label": "a", "env": "X"}],
}
BAD_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"colour": "blue"}, "unknown keys in spec: colour"),
    ({"concurrency": {"per_tokens": 2}}, "unknown keys in [concurrency]: per_tokens"),
    ({"poll": {"first": 0.1}}, "unknown keys in [poll]: first"),
    ({"nps": {"from": 55}}, "unknown keys in [nps]: from"),
    ({"rate_limit": 5}, "[rate_limit] must be a table"),
    ({"tokens": [{"label": "a", "envv": "X"}]}, "unknown keys in tokens[0]: envv"),
    ({"tokens": []}, "at least one token"),
    ({"tokens": "X"}, "`tokens` must be a list"),
    ({"tokens": [{"env": "X"}]}, "tokens[0] needs a `label`"),
    ({"tokens": [{"label": "a"}]}, "exactly one of `env` or `file`"),
    ({"tokens": [{"label": "a", "env": "X", "file": "f"}]}, "exactly one of `env` or `file`"),
    ({"tokens": [{"label": "a", "env": "X"}, {"label": "a", "env": "Y"}]}, "unique"),
    ({"tokens": [{"label": "../up", "env": "X"}]}, "file-name-safe"),
    ({"date_from": "2024-13-01"}, "date_from: '2024-13-01' is not an ISO 8601"),
    ({"date_to": "next tuesday"}, "date_to: 'next tuesday' is not an ISO 8601"),
    ({"date_from": "2024-01-01T00:00:00"}, "date_from: '2024-01-01T00:00:00' has no UTC offset"),
    ({"date_from": "2024-03-01"}, "date_from must be before date_to"),
    ({"reports": ["sumary"]}, "unknown report 'sumary'"),
    ({"reports": "sumary"}, "unknown report 'sumary'"),
    ({"reports": ["nps_summary"]}, "NPS reports need `form`"),
    ({"reports": ["nps_volume"], "nps": {"form": 55, "category": "fans"}}, "nps_category"),
    ({"exports": ["nps_submissions"]}, "export nps_submissions: NPS reports need `form`"),
    ({"exports": ["cases"]}, "exports[0]: unknown kind 'cases'"),
    ({"exports": [5]}, "exports[0] must be a table"),
    ({"exports": [{"kind": "case_details", "frm": 1}]}, "unknown keys in exports[0]: frm"),
    ({"window_months": 13}, "window_months must be 1 to 12"),
    ({"concurrency": {"per_token": 0}}, "concurrency caps must be at least 1"),
    ({"rate_limit": {"max_requests": 0}}, "rate_limit needs max_requests >= 1"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_specs_are_rejected_with_a_clear_message(
    tmp_path: Path, write_spec: Callable[..., Path], change: dict[str, Any], message: str
) -> None:
    path = write_spec(tmp_path / "spec.toml", {**BASE, **change})
    with pytest.raises(SpecError) as info:
        BackfillSpec.from_toml(path)
    assert message in str(info.value)


def test_spec_without_tokens_or_dates(tmp_path: Path, write_spec: Callable[..., Path]) -> None:
    for key in ("tokens", "date_from"):
        data = {k: v for k, v in BASE.items() if k != key}
        with pytest.raises(SpecError, match=f"spec needs `{key}`"):
            BackfillSpec.from_toml(write_spec(tmp_path / "spec.toml", data))
    # Without date_to a spec runs up to each run's "now".
    data = {k: v for k, v in BASE.items() if k != "date_to"}
    assert BackfillSpec.from_toml(write_spec(tmp_path / "spec.toml", data)).date_to is None
    (tmp_path / "broken.toml").write_text("date_from = \n")
    with pytest.raises(SpecError, match="not valid TOML"):
        BackfillSpec.from_toml(tmp_path / "broken.toml")


def test_python_spec_is_checked_too(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="UTC offset"):
        BackfillSpec(
            tokens=(TokenSource("a", env="X"),),
            date_from=datetime(2024, 1, 1),
            date_to=MAR,
            output=tmp_path,
            reports=("summary",),
        )
    with pytest.raises(SpecError, match="NPS reports need `form`"):
        BackfillSpec(
            tokens=(TokenSource("a", env="X"),), date_from=JAN, date_to=MAR, output=tmp_path
        )


# -- the planner ---------------------------------------------------------------------------


def test_plan_units_windows_requests_and_least_time(tmp_path: Path) -> None:
    spec = BackfillSpec(
        tokens=(TokenSource("a", env="X"), TokenSource("b", env="Y")),
        date_from=datetime(2023, 11, 15, tzinfo=UTC),
        date_to=datetime(2025, 2, 3, tzinfo=UTC),
        output=tmp_path,
        reports=("summary", "user_volume", "states"),
        exports=(ExportSpec(ExportKind.CASE_DETAILS),),
        max_requests=10,
        window=60,
    )
    the_plan = plan(spec)
    # 2023-11-15 .. 2025-01-15 are 15 window starts; the last window is cut at 2025-02-03.
    assert len(the_plan.windows) == 15
    assert the_plan.windows[0] == (spec.date_from, datetime(2023, 12, 15, tzinfo=UTC))
    assert the_plan.windows[-1] == (datetime(2025, 1, 15, tzinfo=UTC), spec.date_to)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(the_plan.windows))
    assert len(the_plan.units) == 2 * 15 * 4
    assert len(set(the_plan.units)) == len(the_plan.units)
    assert len(the_plan.units_of("a")) == 60
    # 45 reports x 1 request + 15 exports x (start + 2 polls) = 90 requests;
    # 10 per 60 s less the reserve of 1 (a backfill is bulk work): ceil(90 / 9) - 1 = 9
    # full windows = 540 s; with no reserve, ceil(90 / 10) - 1 = 8 windows = 480 s.
    assert the_plan.requests_of("a") == 90
    assert the_plan.least_seconds("a") == 540.0
    assert plan(attrs.evolve(spec, reserve=0)).least_seconds("a") == 480.0
    unit = the_plan.units_of("b")[0]
    assert unit == Unit("b", "summary", False, *the_plan.windows[0])
    assert unit.path(tmp_path) == (
        tmp_path / "b/reports/summary/2023-11-15T00-00-00+00-00_2023-12-15T00-00-00+00-00.json"
    )
    export = next(u for u in the_plan.units_of("a") if u.is_export)
    assert export.path(tmp_path).relative_to(tmp_path).parts[:3] == ("a", "exports", "case_details")
    assert export.path(tmp_path).suffix == ".csv"

    quarterly = plan(attrs.evolve(spec, window_months=3))
    assert [w[0].month for w in quarterly.windows] == [11, 2, 5, 8, 11]
    assert quarterly.windows[-1][1] == spec.date_to
    assert len(quarterly.units) == 2 * 5 * 4


@pytest.mark.parametrize(
    ("requests", "n", "w", "floor"),
    [
        (0, 100, 300, 0),
        (1, 100, 300, 0),
        (100, 100, 300, 0),
        (101, 100, 300, 300),
        (250, 100, 5, 10),
        (360, 100, 5, 15),
        (15, 4, 10, 30),
    ],
)
def test_rate_limit_floor(requests: int, n: int, w: float, floor: float) -> None:
    assert rate_limit_floor(requests, n, w) == floor


# -- the runner ----------------------------------------------------------------------------


@pytest.mark.usefixtures("token_env")
async def test_backfill_writes_the_layout_json_and_csv(
    sandbox: Sandbox,
    tmp_path: Path,
    make_client: Callable[..., Any],
    registry: LimiterRegistry,
) -> None:
    spec = make_spec(sandbox, tmp_path / "out")
    events: list[BackfillEvent] = []
    summary = await run_backfill(spec, on_event=events.append, registry=registry)
    the_plan = plan(spec)
    assert summary.ok
    assert summary.done == {"a": 8, "b": 8}
    assert summary.files == 16
    files = tree(spec.output)
    assert sorted(files) == sorted(
        str(u.path(spec.output).relative_to(spec.output)) for u in the_plan.units
    )
    assert summary.bytes == sum(len(b) for b in files.values())
    assert not list(spec.output.rglob("*.part"))
    assert_no_token_anywhere(spec.output, TOKEN_A, TOKEN_B)
    for event in events:
        assert TOKEN_A not in repr(event)
        assert TOKEN_B not in repr(event)

    # Reports are the client's typed results, unstructured (a series: its points starting
    # in the window, not the one second of the next day its inclusive end also touches);
    # exports the server's CSV bytes.
    lo, hi = the_plan.windows[1]
    async with make_client(TOKEN_B) as client:
        volume = await client.report("nps_volume", lo, hi, form=55)
        await client.export(
            "nps_submissions", lo, hi, tmp_path / "direct.csv", form=55, poll=FAST_POLL
        )
    report_path = Unit("b", "nps_volume", False, lo, hi).path(spec.output)
    assert volume[-1].date == hi
    assert json.loads(report_path.read_text()) == converter.unstructure(volume[:-1])
    export_path = Unit("b", "nps_submissions", True, lo, hi).path(spec.output)
    assert export_path.read_bytes() == (tmp_path / "direct.csv").read_bytes()
    assert export_path.read_bytes().startswith(b"submission_id,")

    recorded = states(spec.output)
    assert {u.id for u in the_plan.units} == set(recorded)
    assert {state for state, _, _ in recorded.values()} == {DONE}

    # A rerun skips everything and asks the server for nothing.
    requests = dict(sandbox.stats.requests)
    again = await run_backfill(spec, registry=registry)
    assert again.ok
    assert again.skipped == {"a": 8, "b": 8}
    assert again.done == {"a": 0, "b": 0}
    assert sandbox.stats.requests == requests
    assert tree(spec.output) == files


@pytest.mark.usefixtures("token_env")
async def test_concurrency_caps_per_token_and_overall_are_honoured(
    sandbox_factory: Callable[..., Any], tmp_path: Path, registry: LimiterRegistry
) -> None:
    sb = await sandbox_factory(tokens=None, latency=0.03)
    labels = ("a", "b", "c")
    spec = make_spec(
        sb,
        tmp_path / "out",
        tokens=tuple(TokenSource(label, env=ENV_A) for label in labels),
        # Aggregates only: each unit is its own fetch (joined windows of a series report
        # are one fetch, one of the per-token cap's slots; see test_planner.py).
        reports=("summary", "user_volume", "case_summary", "classifications"),
        exports=(),
        per_token_concurrency=2,
        total_concurrency=4,
    )
    running: Counter[str] = Counter()
    most: Counter[str] = Counter()
    started: set[str] = set()
    peak = 0

    def watch(event: BackfillEvent) -> None:
        nonlocal peak
        if isinstance(event, UnitStarted):
            started.add(event.unit.id)
            running[event.unit.label] += 1
            most[event.unit.label] = max(most[event.unit.label], running[event.unit.label])
            peak = max(peak, sum(running.values()))
        elif isinstance(event, UnitFinished) and event.unit.id in started:
            running[event.unit.label] -= 1

    summary = await run_backfill(spec, on_event=watch, registry=registry)
    assert summary.ok
    assert sum(summary.done.values()) == 3 * 2 * 4
    assert len(started) == 24
    assert not +running
    # The per-token cap bounds each token's units in progress: reached, never exceeded.
    assert most == {"a": 2, "b": 2, "c": 2}
    assert peak == 6
    # The total cap bounds requests on the wire (3 tokens x 2 units would put 6 there).
    assert sb.stats.max_in_progress == 4


def one_token_of_aggregates(
    sb: Sandbox, tmp_path: Path, months: int, **overrides: Any
) -> BackfillSpec:
    """Token a, ``months`` from January 2024, four aggregates (one request a unit), 8
    workers."""
    return make_spec(
        sb,
        tmp_path / "out",
        tokens=(TokenSource("a", env=ENV_A),),
        date_to=add_months(JAN, months),
        reports=("summary", "user_volume", "case_summary", "classifications"),
        exports=(),
        per_token_concurrency=8,
        **overrides,
    )


@pytest.mark.usefixtures("token_env")
@pytest.mark.parametrize("total", [1, 2])
async def test_a_token_waiting_for_its_window_keeps_its_fair_share_of_workers_waiting(
    sandbox_factory: Callable[..., Any], tmp_path: Path, registry: LimiterRegistry, total: int
) -> None:
    """36 requests at 9 per window (10, one kept from bulk work), 8 workers, an overall
    cap of ``total`` (the one token's fair share): each time the budget runs out at
    most ``total`` requests wait for the window and the other workers end (each would
    hold its call's frames until then), coming back as requests go out. Consecutive
    rate-limit waits with no request sent between them are waiters queued at once. Real
    time, not looptime: the checkpoint's thread hops let virtual time jump past the
    windows."""
    sb = await sandbox_factory(tokens=None)
    spec = one_token_of_aggregates(  # 36 units
        sb, tmp_path, 9, max_requests=10, window=0.5, total_concurrency=total
    )
    queued, most_queued, waits = 0, 0, 0
    running, most_running_after_a_wait = 0, 0

    def watch(event: BackfillEvent) -> None:
        nonlocal queued, most_queued, waits, running, most_running_after_a_wait
        if isinstance(event, RateLimitWait):
            queued, waits = queued + 1, waits + 1
            most_queued = max(most_queued, queued)
        elif isinstance(event, RequestSent):
            queued = 0
        elif isinstance(event, UnitStarted):
            running += 1
            if waits:
                most_running_after_a_wait = max(most_running_after_a_wait, running)
        elif isinstance(event, UnitFinished):
            running -= 1

    summary = await run_backfill(spec, on_event=watch, registry=registry)
    assert summary.ok
    assert summary.requests == 36
    assert waits >= 1
    assert 1 <= most_queued <= total  # without the rule: up to 8
    assert most_running_after_a_wait > 1  # the workers came back after the wait


@pytest.mark.usefixtures("token_env")
async def test_workers_are_held_back_while_units_wait_for_the_disk(
    sandbox_factory: Callable[..., Any],
    tmp_path: Path,
    registry: LimiterRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A disk that does not keep up: the first batch's write blocks. Once more units wait
    for it than `total_concurrency` requests may be on the wire, no worker is added
    (each would only end up waiting too, holding a task and its staged unit): when every
    started unit waits for the disk, there are fewer than `per_token` of them."""
    sb = await sandbox_factory(tokens=None)
    spec = one_token_of_aggregates(sb, tmp_path, 6, total_concurrency=2)  # 24 units
    disk = threading.Event()
    writers: list[ReportWriter] = []
    commit = ReportWriter._commit
    commit_all = ReportWriter.commit_all

    def slow_commit(self: ReportWriter, batch: Any) -> None:
        assert disk.wait(60)
        commit(self, batch)

    async def watched_commit_all(self: ReportWriter, entries: Any) -> Any:
        writers.append(self)
        return await commit_all(self, entries)

    monkeypatch.setattr(ReportWriter, "_commit", slow_commit)
    monkeypatch.setattr(ReportWriter, "commit_all", watched_commit_all)
    running = 0

    def watch(event: BackfillEvent) -> None:
        nonlocal running
        running += isinstance(event, UnitStarted) - isinstance(event, UnitFinished)

    stuck: list[int] = []

    async def release_when_stuck() -> None:
        """Every started unit waits for the disk, none on the wire, for 20 polls."""
        calm = 0
        while calm < 20:
            await anyio.sleep(0.005)
            waiting = writers[0].backlog if writers else 0
            calm = calm + 1 if waiting and waiting == running and not sb.stats.in_progress else 0
        stuck.append(running)
        disk.set()

    async def run() -> BackfillSummary:
        try:
            return await run_backfill(spec, on_event=watch, registry=registry)
        finally:
            disk.set()

    async with anyio.create_task_group() as group:
        group.start_soon(release_when_stuck)
        summary = await run()
    assert summary.ok
    assert sum(summary.done.values()) == 24
    (waiting,) = stuck
    print(f"units waiting for the disk when stuck: {waiting}")
    assert waiting < 8  # without the rule: all 8 workers wait


@pytest.mark.usefixtures("token_env")
async def test_each_request_enters_the_overall_cap_ranked_by_its_place_in_the_rate_window(
    sandbox_factory: Callable[..., Any],
    tmp_path: Path,
    registry: LimiterRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker, 24 requests at 9 a window (10, one kept from bulk work): the ranks
    the overall cap sees are each request's place within its window, 0-8, 0-8, 0-5,
    so that every token's first requests of a window go before any token's later ones."""
    sb = await sandbox_factory(tokens=None)
    spec = attrs.evolve(
        one_token_of_aggregates(sb, tmp_path, 6, max_requests=10, window=0.05),
        per_token_concurrency=1,
    )
    ranks: list[int] = []
    acquire = RankedCapacity.acquire

    async def recorded(self: RankedCapacity, rank: int = 0, *, large: bool = False) -> None:
        ranks.append(rank)
        await acquire(self, rank, large=large)

    monkeypatch.setattr(RankedCapacity, "acquire", recorded)
    summary = await run_backfill(spec, registry=registry)
    assert summary.ok
    assert ranks == [p % 9 for p in range(24)]


@pytest.mark.usefixtures("token_env")
@pytest.mark.parametrize("join", [True, False])
async def test_joined_fetches_on_the_wire_at_once_are_at_most_the_large_share(
    sandbox_factory: Callable[..., Any], tmp_path: Path, registry: LimiterRegistry, join: bool
) -> None:
    """Two tokens, four series reports over 24 months: 16 joined fetches (12 months each)
    and nothing else, 8 workers a token, an overall cap with one large place. Joined, one
    request is on the wire at a time; window by window (the same 2 x 96 units), many."""
    sb = await sandbox_factory(latency=0.02)
    spec = make_spec(
        sb,
        tmp_path / "out",
        date_to=add_months(JAN, 24),
        reports=("states_volume", "response_volume", "case_volume", "nps_volume"),
        exports=(),
        per_token_concurrency=8,
        total_concurrency=LARGE_SHARE,
    )
    summary = await run_backfill(spec, registry=registry, join=join)
    assert summary.ok
    assert summary.files == 2 * 4 * 24
    if join:
        assert summary.requests == 2 * 4 * 2
        assert sb.stats.max_in_progress == 1
    else:
        assert summary.requests == 2 * 4 * 24
        assert sb.stats.max_in_progress > 1


@pytest.mark.usefixtures("token_env")
async def test_requests_leave_round_robin_across_tokens(
    sandbox_factory: Callable[..., Any], tmp_path: Path, registry: LimiterRegistry
) -> None:
    """With one request on the wire at a time and every token free to send all its units,
    the overall cap still admits the tokens in turn: each token's first request goes
    before any token's third. Token by token, the last token's first request (which
    its last window waits on) would wait for every other token's whole burst."""
    sb = await sandbox_factory(tokens=None)
    labels = ("a", "b", "c")
    spec = make_spec(
        sb,
        tmp_path / "out",
        tokens=tuple(TokenSource(label, env=f"LEXER_TEST_RR_{label}") for label in labels),
        reports=("summary", "user_volume"),
        exports=(),
        per_token_concurrency=4,
        total_concurrency=1,
    )
    keys = {}
    with pytest.MonkeyPatch.context() as env:
        for label in labels:
            token = f"round-robin-token-{label}"
            env.setenv(f"LEXER_TEST_RR_{label}", token)
            keys[Sandbox.key(token)] = label
        summary = await run_backfill(spec, registry=registry)
    assert summary.ok
    assert summary.requests == 12
    order = [
        label
        for _, label in sorted(
            (at, keys[key]) for key, times in sb.stats.arrivals.items() for at in times
        )
    ]
    assert len(order) == 12
    assert sorted(order[:3]) == ["a", "b", "c"]
    thirds = [i for i, label in enumerate(order) if order[: i + 1].count(label) == 3]
    firsts = [order.index(label) for label in labels]
    assert max(firsts) < min(thirds)
    # One connection pool for all tokens: with one request at a time, one connection.
    assert sb.stats.connections == 1


def test_gc_tuned_raises_thresholds_and_restores_them_when_the_last_run_leaves() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with gc_tuned():
            assert gc.get_threshold() == GC_THRESHOLDS
            with gc_tuned():  # an overlapping run
                assert gc.get_threshold() == GC_THRESHOLDS
            assert gc.get_threshold() == GC_THRESHOLDS  # the first is still running
        assert gc.get_threshold() == (700, 10, 10)
        # Thresholds already higher than ours are kept.
        gc.set_threshold(50_000, 5, 100)
        with gc_tuned():
            assert gc.get_threshold() == (50_000, GC_THRESHOLDS[1], 100)
        assert gc.get_threshold() == (50_000, 5, 100)
    finally:
        gc.set_threshold(*before)


@pytest.mark.usefixtures("token_env")
@pytest.mark.parametrize("tune_gc", [True, False])
async def test_run_backfill_tunes_gc_only_while_running(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry, tune_gc: bool
) -> None:
    before = gc.get_threshold()
    seen: set[tuple[int, int, int]] = set()
    spec = make_spec(sandbox, tmp_path / "out", exports=())
    summary = await run_backfill(
        spec,
        registry=registry,
        tune_gc=tune_gc,
        on_event=lambda _: seen.add(gc.get_threshold()),
    )
    assert summary.ok
    tuned = tuple(max(a, b) for a, b in zip(before, GC_THRESHOLDS, strict=True))
    assert seen == {tuned if tune_gc else before}
    assert gc.get_threshold() == before


@pytest.mark.usefixtures("token_env")
async def test_tokens_run_in_parallel_each_under_its_own_limit(
    sandbox_factory: Callable[..., Any], tmp_path: Path, registry: LimiterRegistry
) -> None:
    window = 0.4
    sb = await sandbox_factory(max_requests=5, window=window)
    spec = make_spec(
        sb,
        tmp_path / "out",
        reports=("summary", "user_volume", "case_summary", "states"),  # one request each
        exports=(),
        date_to=datetime(2024, 4, 1, tzinfo=UTC),
    )
    waits: Counter[str] = Counter()

    def watch(event: BackfillEvent) -> None:
        if isinstance(event, RateLimitWait):
            waits[event.label] += 1

    started = time.monotonic()
    summary = await run_backfill(spec, on_event=watch, registry=registry)
    elapsed = time.monotonic() - started
    assert summary.ok
    assert summary.rate_limited == 0
    assert sb.stats.rate_limited == 0
    assert summary.requests == 24
    key_a, key_b = Sandbox.key(TOKEN_A), Sandbox.key(TOKEN_B)
    for key in (key_a, key_b):
        assert sb.stats.requests[key] == 12
        assert sb.stats.max_in_window(key, window) <= 5
    # 12 requests at 5 per window: 3 bursts, so at least 2 windows for each token ...
    assert elapsed >= rate_limit_floor(12, 5, window) == 2 * window
    assert waits["a"] > 0
    assert waits["b"] > 0
    # ... but the tokens share no limiter: b's first burst comes before a's second.
    arrivals_a, arrivals_b = sorted(sb.stats.arrivals[key_a]), sorted(sb.stats.arrivals[key_b])
    assert arrivals_b[0] < arrivals_a[5]
    assert arrivals_a[0] < arrivals_b[5]


@pytest.mark.usefixtures("token_env")
async def test_one_unauthorized_token_fails_alone_and_retry_failed_completes_it(
    sandbox_factory: Callable[..., Any], tmp_path: Path, registry: LimiterRegistry
) -> None:
    sb = await sandbox_factory(tokens=frozenset({TOKEN_A}))
    spec = make_spec(sb, tmp_path / "out", per_token_concurrency=2)
    the_plan = plan(spec)
    summary = await run_backfill(spec, registry=registry)
    assert not summary.ok
    assert summary.done == {"a": 8, "b": 0}
    assert sorted(unit_id for unit_id, _ in summary.failed["b"]) == sorted(
        u.id for u in the_plan.units_of("b")
    )
    errors = [error for _, error in summary.failed["b"]]
    assert any("401" in e and "TokenMismatchError" in e for e in errors)
    # After the first 401 the token's other units are not even attempted.
    assert sb.stats.unauthorized <= spec.per_token_concurrency
    assert all("401" in e or "not attempted" in e for e in errors)
    recorded = states(spec.output)
    assert all(recorded[u.id][0] == FAILED and recorded[u.id][2] for u in the_plan.units_of("b"))
    assert all(recorded[u.id][0] == DONE for u in the_plan.units_of("a"))

    # A plain rerun reports the failures again and sends nothing.
    requests, unauthorized = dict(sb.stats.requests), sb.stats.unauthorized
    again = await run_backfill(spec, registry=registry)
    assert not again.ok
    assert len(again.failed["b"]) == 8
    assert again.skipped == {"a": 8, "b": 8}
    assert sb.stats.requests == requests
    assert sb.stats.unauthorized == unauthorized

    # Fix the cause; --retry-failed runs b's units only.
    sb.config.tokens = None
    fixed = await run_backfill(spec, retry_failed=True, registry=registry)
    assert fixed.ok
    assert fixed.done == {"a": 0, "b": 8}
    assert fixed.skipped == {"a": 8, "b": 0}
    assert sb.stats.requests[Sandbox.key(TOKEN_A)] == requests[Sandbox.key(TOKEN_A)]
    assert sorted(tree(spec.output)) == sorted(
        str(u.path(spec.output).relative_to(spec.output)) for u in the_plan.units
    )
    assert {s for s, _, _ in states(spec.output).values()} == {DONE}


@pytest.mark.usefixtures("token_env")
async def test_missing_token_env_fails_that_token_only(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: LimiterRegistry
) -> None:
    monkeypatch.delenv(ENV_B)
    spec = make_spec(sandbox, tmp_path / "out")
    summary = await run_backfill(spec, registry=registry)
    assert summary.done == {"a": 8, "b": 0}
    assert len(summary.failed["b"]) == 8
    assert all(f"environment variable {ENV_B} is unset" in e for _, e in summary.failed["b"])


async def cancel_when(
    spec: BackfillSpec, ready: Callable[[BackfillEvent], bool], registry: LimiterRegistry
) -> None:
    """Run ``spec`` until ``ready`` says so, then cancel it: a crash without clean-up of
    the checkpoint's in-flight records."""
    reached = asyncio.Event()

    def watch(event: BackfillEvent) -> None:
        if ready(event):
            reached.set()

    task = asyncio.create_task(run_backfill(spec, on_event=watch, registry=registry))
    waiter = asyncio.create_task(reached.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert task not in done, "the run ended before the crash point"
    assert waiter in done, "the crash point was not reached in 30 s"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.usefixtures("token_env")
async def test_resume_polls_pending_jobs_instead_of_starting_them_again(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    spec = make_spec(sandbox, tmp_path / "out")
    exports_units = [u for u in plan(spec).units if u.is_export]
    sandbox.faults.never_complete = True
    pending: list[str] = []

    def all_started(event: BackfillEvent) -> bool:
        if isinstance(event, ExportState) and event.status == "pending":
            pending.append(event.report_token)
        return len(pending) == len(exports_units)

    await cancel_when(spec, all_started, registry)
    started = sandbox.stats.exports_started
    assert started == len(exports_units) == 8
    recorded = states(spec.output)
    assert {recorded[u.id][0] for u in exports_units} == {PENDING}
    assert {recorded[u.id][1] for u in exports_units} == set(pending)
    polls = {token: sandbox.stats.status_polls.get(token, 0) for token in pending}

    sandbox.faults.never_complete = False
    summary = await run_backfill(spec, registry=registry)
    assert summary.ok
    assert sandbox.stats.exports_started == started
    assert all(sandbox.stats.status_polls[token] > polls[token] for token in pending)
    assert all(u.path(spec.output).is_file() for u in plan(spec).units)
    assert {s for s, _, _ in states(spec.output).values()} == {DONE}
    assert not list(spec.output.rglob("*.part"))


@pytest.mark.usefixtures("token_env")
async def test_a_failed_export_job_is_started_afresh_by_retry_failed(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    spec = make_spec(
        sandbox,
        tmp_path / "out",
        tokens=(TokenSource("a", env=ENV_A),),
        reports=(),
        exports=(ExportSpec(ExportKind.CASE_DETAILS),),
        date_to=datetime(2024, 2, 1, tzinfo=UTC),
    )
    sandbox.faults.fail_jobs = 1
    summary = await run_backfill(spec, registry=registry)
    [(unit_id, error)] = summary.failed["a"]
    assert "ExportFailedError" in error
    assert "'failed'" in error
    assert states(spec.output)[unit_id][0] == FAILED
    assert sandbox.stats.exports_started == 1

    again = await run_backfill(spec, registry=registry)
    assert not again.ok
    assert sandbox.stats.exports_started == 1

    fixed = await run_backfill(spec, retry_failed=True, registry=registry)
    assert fixed.ok
    assert fixed.done == {"a": 1}
    assert sandbox.stats.exports_started == 2
    assert states(spec.output)[unit_id][0] == DONE


@pytest.mark.usefixtures("token_env")
async def test_a_job_the_server_forgot_is_started_afresh(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    spec = make_spec(
        sandbox,
        tmp_path / "out",
        tokens=(TokenSource("a", env=ENV_A),),
        reports=(),
        exports=(ExportSpec(ExportKind.CASE_DETAILS),),
        date_to=datetime(2024, 2, 1, tzinfo=UTC),
    )
    [unit] = plan(spec).units
    with Checkpoint(spec.output / CHECKPOINT_NAME) as checkpoint:
        checkpoint.record_job(unit.id, "0" * 32)  # e.g. a sandbox restarted since
    summary = await run_backfill(spec, registry=registry)
    assert summary.ok
    assert sandbox.stats.status_polls["0" * 32] == 1
    assert sandbox.stats.exports_started == 1
    assert unit.path(spec.output).read_bytes().startswith(b"case_id,")


@pytest.mark.usefixtures("token_env")
async def test_retry_failed_also_runs_units_a_crash_left_unfinished(
    sandbox_factory: Callable[..., Any], tmp_path: Path, registry: LimiterRegistry
) -> None:
    sb = await sandbox_factory(tokens=frozenset({TOKEN_A}), latency=0.01)
    spec = make_spec(sb, tmp_path / "out", per_token_concurrency=1, exports=())
    finished: Counter[str] = Counter()

    def crash_point(event: BackfillEvent) -> bool:
        if isinstance(event, UnitFinished):
            finished[event.unit.label] += 1
        return finished["a"] >= 1 and finished["b"] == 4

    await cancel_when(spec, crash_point, registry)
    recorded = states(spec.output)
    assert sum(1 for s, _, _ in recorded.values() if s == DONE) < 4  # a was cut short
    assert sum(1 for s, _, _ in recorded.values() if s == FAILED) == 4  # b: all 401

    sb.config.tokens = None
    summary = await run_backfill(spec, retry_failed=True, registry=registry)
    assert summary.ok
    assert sum(summary.done.values()) + sum(summary.skipped.values()) == 8
    assert summary.done["b"] == 4
    assert all(u.path(spec.output).is_file() for u in plan(spec).units)
    assert {s for s, _, _ in states(spec.output).values()} == {DONE}
