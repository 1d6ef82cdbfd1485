"""The progress views, rendered at fixed virtual times: the clock is injected, nothing sleeps.

What must hold: a countdown moves while no event arrives, ``waited`` counts only time
that has passed (overlapping waits once), the ETA follows the plan's remaining requests
and the rate-limit floor, plain lines never exceed 80 columns, JSON stays JSON lines.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from lexer_activity_async import LexerClient
from lexer_activity_async.backfill import BackfillSpec, TokenSource, Unit, UnitFinished
from lexer_activity_async.cli._progress import (
    COUNTDOWN_INTERVAL,
    PLAIN_INTERVAL,
    PLAIN_WIDTH,
    WAIT_WORTH_SAYING,
    BackfillView,
    WaitView,
    duration,
    fit_lines,
)
from lexer_activity_async.events import (
    DownloadProgress,
    ExportState,
    RateLimited,
    RateLimitWait,
    RequestSent,
)
from lexer_activity_async.sandbox import Sandbox

UTC = timezone.utc
T0 = 1000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def wait(label: str, seconds: float) -> RateLimitWait:
    return RateLimitWait(label, seconds, datetime(2030, 1, 1, tzinfo=UTC))


def spec(
    tmp_path: Path, *labels: str, months: int = 3, max_requests: int = 1, window: float = 300.0
) -> BackfillSpec:
    return BackfillSpec(
        tokens=tuple(TokenSource(label, env="LEXER_TEST_UNUSED") for label in labels),
        date_from=datetime(2024, 1, 1, tzinfo=UTC),
        date_to=datetime(2024, 1 + months, 1, tzinfo=UTC),
        output=tmp_path,
        reports=("summary",),
        max_requests=max_requests,
        window=window,
    )


def view(
    tmp_path: Path, *labels: str, mode: str = "plain", **options: Any
) -> tuple[BackfillView, Clock, list[str]]:
    lines: list[str]
    clock, lines = Clock(), []
    the_view = BackfillView(
        spec(tmp_path, *labels, **options),
        mode,
        Console(file=io.StringIO()),
        clock=clock,
        echo=lines.append,
    )
    return the_view, clock, lines


def finished(label: str, month: int, size: int = 2048, state: str = "done") -> UnitFinished:
    unit = Unit(
        label,
        "summary",
        False,
        datetime(2024, month, 1, tzinfo=UTC),
        datetime(2024, month + 1, 1, tzinfo=UTC),
    )
    return UnitFinished(unit, state, size)


def test_the_countdown_moves_without_events_and_waited_counts_only_time_passed(
    tmp_path: Path,
) -> None:
    progress, clock, _ = view(tmp_path, "a")
    progress(RequestSent("a"))
    progress(wait("a", 13.0))
    assert "rate limit 13s" in progress.info("a")
    assert "waited 0s" in progress.info("a")  # nothing waited yet: the wait is ahead
    clock.now = T0 + 5
    assert "rate limit 8s" in progress.info("a")
    assert "waited 5s" in progress.info("a")
    clock.now = T0 + 20  # the wait ended at +13: waited stops there
    assert "rate limit" not in progress.info("a")
    assert "waited 13s" in progress.info("a")


def test_overlapping_waits_count_once_and_later_ones_add(tmp_path: Path) -> None:
    progress, clock, _ = view(tmp_path, "a", "b")
    progress(wait("a", 10.0))
    clock.now = T0 + 4
    progress(wait("a", 10.0))  # queued behind the first: the span runs to +14, not 20 s
    clock.now = T0 + 30
    assert "waited 14s" in progress.info("a")
    progress(wait("a", 6.0))  # a new wait after a pause adds its own span
    clock.now = T0 + 33
    assert "waited 17s" in progress.info("a")
    assert "rate limit 3s" in progress.info("a")
    assert "waited 0s" in progress.info("b")
    # Overall: the time during which some token waited (a's spans here).
    assert "waited 17s" in progress.info(BackfillView.OVERALL)


def test_eta_follows_the_remaining_requests_and_the_rate_limit_floor(tmp_path: Path) -> None:
    # 3 monthly summaries at 1 request per 300 s: now, +300 s, +600 s.
    progress, clock, _ = view(tmp_path, "a", "b", months=3, max_requests=1, window=300.0)
    assert "eta 10m00s" in progress.info("a")
    progress(RequestSent("a"))
    progress(finished("a", 1))
    assert "eta 10m00s" in progress.info("a")  # the slot just used frees at +300 s
    clock.now = T0 + 100
    assert "eta 8m20s" in progress.info("a")
    clock.now = T0 + 300
    progress(RequestSent("a"))
    progress(finished("a", 2))
    assert "eta 5m00s" in progress.info("a")
    progress(RateLimited("a", None))
    progress(wait("a", 900.0))  # held by a 429: the hold comes first
    assert "eta 15m00s" in progress.info("a")
    assert "eta 10m00s" in progress.info("b")
    assert "eta 15m00s" in progress.info(BackfillView.OVERALL)  # the slowest token
    progress(finished("a", 3))
    assert "eta 0s" in progress.info("a")


def test_eta_with_several_slots_per_window(tmp_path: Path) -> None:
    # 9 requests at 4 per 300 s, 2 of them sent at +0 and +50, now +60: the 4 slots
    # free at +60, +60 (unused), +300, +350. The 7 left go in rounds of 4; the 7th takes
    # the third slot in round 2: +300 + 300 = +600, 540 s from now.
    progress, clock, _ = view(tmp_path, "a", months=9, max_requests=4, window=300.0)
    progress(RequestSent("a"))
    clock.now = T0 + 50
    progress(RequestSent("a"))
    clock.now = T0 + 60
    assert "eta 9m00s" in progress.info("a")


def test_units_requests_bytes_and_failures_per_token_and_overall(tmp_path: Path) -> None:
    progress, _, _ = view(tmp_path, "a", "b", months=2)
    for label in ("a", "a", "b"):
        progress(RequestSent(label))
    progress(finished("a", 1, size=3072))
    progress(finished("a", 2, size=0, state="failed"))
    progress(finished("b", 1, size=1024))
    lines = progress.lines()
    assert lines[0].startswith("a ")
    assert "2/2 2 req 3.0 KiB" in lines[0]
    assert "1 failed" in lines[0]
    assert "1/2 1 req 1.0 KiB" in lines[1]
    assert lines[2].startswith("all tokens 3/4 3 req 4.0 KiB")


def test_plain_lines_never_exceed_80_columns_and_never_split_a_word(tmp_path: Path) -> None:
    long_label = "marketing-team-europe-with-a-very-long-label"
    progress, clock, echoed = view(
        tmp_path, long_label, "b", months=11, max_requests=1, window=3000.0
    )
    for _ in range(12345):
        progress(RequestSent("b"))
    progress(wait(long_label, 7200.0))
    progress(wait("b", 7200.0))
    clock.now = T0 + 3
    lines = progress.lines()
    assert all(len(line) <= PLAIN_WIDTH for line in [*lines, *echoed])
    assert lines[0].startswith("marketing-team-~ 0/11")  # the label is shortened, not wrapped
    words = " ".join(progress._parts("b", clock.now)).split(" ")
    joined = " ".join(lines).split(" ")
    assert all(word in joined for word in words)


def test_plain_mode_reports_when_a_wait_starts_and_every_interval(tmp_path: Path) -> None:
    progress, clock, echoed = view(tmp_path, "a", months=2)
    progress(RequestSent("a"))  # the first event reports at once
    assert echoed == [
        "a          0/2 1 req 0 B waited 0s eta 5m00s",
        "all tokens 0/2 1 req 0 B waited 0s eta 5m00s",
    ]
    echoed.clear()
    clock.now = T0 + 1
    progress(wait("a", 299.0))
    assert echoed == ["a: rate limit, waiting 4m59s"]  # a wait is said when it starts
    clock.now = T0 + 2
    progress(wait("a", 298.0))  # the same wait, queued: not repeated
    assert echoed == ["a: rate limit, waiting 4m59s"]
    clock.now = T0 + PLAIN_INTERVAL
    progress(RequestSent("a"))
    assert echoed[1:] == [
        "a          0/2 2 req 0 B rate limit 4m50s waited 9s eta 5m00s",
        "all tokens 0/2 2 req 0 B rate limit 4m50s waited 9s eta 5m00s",
    ]


def test_live_mode_redraws_the_countdown_from_the_clock(tmp_path: Path) -> None:
    clock = Clock()
    progress = BackfillView(spec(tmp_path, "a"), "live", Console(file=io.StringIO()), clock=clock)
    progress(RateLimited("a", None))
    progress(wait("a", 300.0))

    def drawn() -> str:
        console = Console(file=io.StringIO(), width=120, force_terminal=True, record=True)
        console.print(progress.progress.get_renderable())
        return console.export_text()

    assert "rate limit 5m00s (429)" in drawn()
    clock.now = T0 + 42  # no event in between
    assert "rate limit 4m18s (429)" in drawn()
    assert "waited 42s" in drawn()


def test_json_mode_is_json_lines_without_per_request_chatter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    progress, clock, _ = view(tmp_path, "a", mode="json")
    progress(RequestSent("a"))
    progress(DownloadProgress("a", "case_details", 10, None))
    clock.now = T0 + 1.5
    progress(wait("a", 3.0))
    progress(finished("a", 1))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["event"] for r in records] == ["RateLimitWait", "UnitFinished"]
    assert records[0]["t"] == 1.5
    assert records[0]["seconds"] == 3.0


def test_report_and_export_count_down_on_a_429_or_a_full_window() -> None:
    echoed: list[str]
    clock, echoed = Clock(), []
    status = WaitView(
        "summary", Console(file=io.StringIO()), live=False, clock=clock, echo=echoed.append
    )
    assert status.status() == "starting"
    status(RequestSent("cli"))
    status(RateLimited("cli", None))
    status(wait("cli", 300.0))
    assert status.status() == "rate limit (HTTP 429): 5m00s left"
    clock.now = T0 + 299.5
    assert status.status() == "rate limit (HTTP 429): 1s left"
    clock.now = T0 + 301
    assert status.status() == "starting"
    status(RequestSent("cli"))
    status(wait("cli", 60.0))
    assert status.status() == "rate limit (window full): 1m00s left"
    status(ExportState("cli", "case_details", "tok", "pending"))
    status(ExportState("cli", "case_details", "tok", "pending"))
    clock.now = T0 + 400
    status(DownloadProgress("cli", "case_details", 2048, 4096))
    assert status.status() == "2.0 KiB of 4.0 KiB"
    assert echoed == [
        "summary: rate limit (HTTP 429): 5m00s left",
        "summary: rate limit (window full): 1m00s left",
        "summary: export pending",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.2, "1s"),
        (59, "59s"),
        (60, "1m00s"),
        (299.5, "5m00s"),
        (3600, "1h00m"),
        (7380, "2h03m"),
        (-3, "0s"),
    ],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_fit_lines_breaks_between_items_only() -> None:
    items = [f"item{i}=value{i}" for i in range(20)]
    lines = fit_lines(items, width=40)
    assert all(len(line) <= 40 for line in lines)
    assert "  ".join(lines).split("  ") == items
    assert fit_lines(["x" * 90, "y"]) == ["x" * 90, "y"]  # too long alone: kept whole


async def test_the_client_tells_each_request_that_takes_a_slot(
    sandbox: Sandbox, make_client: Callable[..., LexerClient]
) -> None:
    events: list[object] = []
    async with make_client(on_event=events.append) as client:
        await client.users()
        await client.summary(datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC))
    sent = [e for e in events if isinstance(e, RequestSent)]
    assert sent == [RequestSent(client.label)] * 2
    assert sum(sandbox.stats.requests.values()) == 2


def test_tables_fit_80_columns_without_breaking_words_or_hiding_figures() -> None:
    from lexer_activity_async.cli import _table

    error = "HTTP 401: Unauthorized - api token not matching (report type 'summary')"
    table = _table(
        "Backfill summary",
        ("token", "done", "skipped", "failed", "first error"),
        free=("first error",),
    )
    table.add_row("a-very-long-token-label-for-the-marketing-team", "3", "0", "2", error)
    console = Console(file=io.StringIO(), width=PLAIN_WIDTH)
    console.print(table)
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert all(len(line) <= PLAIN_WIDTH for line in lines)
    cells = [c.strip() for c in lines[4].strip("│").split("│")]
    assert cells[:4] == ["a-very-long-token-label…", "3", "0", "2"]
    wrapped = " ".join(
        line.strip("│").split("│")[4].strip() for line in lines[4:] if line.startswith("│")
    )
    assert wrapped == error  # wrapped between words only


def test_eta_within_one_window_is_under_a_second_not_zero(tmp_path: Path) -> None:
    progress, _, _ = view(tmp_path, "a", months=3, max_requests=100)
    assert "eta <1s" in progress.info("a")  # the floor is 0, but work is pending
    for month in (1, 2, 3):
        progress(finished("a", month))
    assert "eta 0s" in progress.info("a")


def test_plain_mode_names_only_waits_long_enough_to_matter(tmp_path: Path) -> None:
    progress, clock, echoed = view(tmp_path, "a", "b", months=2)
    progress(RequestSent("a"))
    echoed.clear()
    progress(wait("a", 0.4))  # a short queue behind the window: noise
    progress(wait("b", WAIT_WORTH_SAYING - 0.5))
    assert echoed == []
    clock.now = T0 + 1
    progress(wait("a", WAIT_WORTH_SAYING))
    assert echoed == ["a: rate limit, waiting 5s"]
    echoed.clear()
    clock.now = T0 + 7
    progress(RateLimited("b", 1.0))  # after a 429 even a short hold is said
    progress(wait("b", 1.0))
    assert echoed == ["b: rate limit, waiting 1s"]


def test_a_piped_report_held_by_a_429_counts_down_every_interval() -> None:
    echoed: list[str]
    clock, echoed = Clock(), []
    status = WaitView(
        "report", Console(file=io.StringIO()), live=False, clock=clock, echo=echoed.append
    )
    status.tick()  # not waiting: nothing to say
    status(RateLimited("cli", None))
    status(wait("cli", 300.0))
    assert echoed == ["report: rate limit (HTTP 429): 5m00s left"]
    clock.now = T0 + COUNTDOWN_INTERVAL - 1
    status.tick()
    assert len(echoed) == 1
    clock.now = T0 + COUNTDOWN_INTERVAL
    status.tick()
    clock.now = T0 + COUNTDOWN_INTERVAL + 5
    status.tick()  # said 5 s ago: not again yet
    clock.now = T0 + 2 * COUNTDOWN_INTERVAL
    status.tick()
    assert echoed[1:] == [
        "report: rate limit (HTTP 429): 4m30s left",
        "report: rate limit (HTTP 429): 4m00s left",
    ]
    clock.now = T0 + 301  # the hold is over: silent again
    status.tick()
    assert len(echoed) == 3
    assert all(len(line) <= PLAIN_WIDTH for line in echoed)


def test_the_plain_countdown_thread_stops_with_the_view() -> None:
    status = WaitView("report", Console(file=io.StringIO()), live=False, echo=lambda _: None)
    with status:
        ticker = status._ticker
        assert ticker is not None
        assert ticker.is_alive()
    assert not ticker.is_alive()
    live = WaitView("report", Console(file=io.StringIO()), live=True)
    with live:
        assert live._ticker is None  # a terminal redraws itself
