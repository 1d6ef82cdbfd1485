"""What the command line shows while it works: progress per token and overall, and a
countdown while the rate limit holds requests back.

Every view reads time from an injected clock and computes what it shows when it is drawn,
so a countdown moves while no event arrives, and time counts as waited only as it passes.
On a terminal the views are live rich displays; otherwise they print plain lines of at
most `PLAIN_WIDTH` columns (a long label is shortened, never wrapped).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

from ..backfill import BackfillEvent, BackfillSpec, UnitFinished, UnitStarted, plan
from ..backfill import rate_limit_floor as _floor
from ..events import DownloadProgress, ExportState, RateLimited, RateLimitWait, RequestSent
from ..models import converter

__all__ = [
    "PLAIN_WIDTH",
    "BackfillView",
    "Clock",
    "TokenProgress",
    "WaitView",
    "duration",
    "fit_lines",
    "size",
]

Clock = Callable[[], float]
PLAIN_WIDTH = 80
"""Columns a plain (not a terminal) progress line never exceeds."""
PLAIN_INTERVAL = 10.0
"""Seconds between plain progress reports (a wait's start is reported at once)."""
WAIT_WORTH_SAYING = 5.0
"""A backfill's plain output names a rate-limit wait of at least this many seconds (or
one after a 429); shorter ones are noise, and the periodic lines show them anyway."""
COUNTDOWN_INTERVAL = 30.0
"""Seconds between plain countdown lines while ``report`` or ``export`` is held."""


def size(n: float) -> str:
    """Bytes for people: ``512 B``, ``3.2 KiB``, ``1.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def duration(seconds: float) -> str:
    """``42s``, ``4m05s``, ``2h03m``: whole seconds, rounded up while counting down."""
    whole = int(max(0.0, seconds) + 0.999)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def fit_lines(items: Iterable[str], width: int = PLAIN_WIDTH, sep: str = "  ") -> list[str]:
    """Join ``items`` into lines of at most ``width`` columns, breaking only between
    items (an item longer than ``width`` stands alone on its line)."""
    lines: list[str] = []
    line = ""
    for item in items:
        if line and len(line) + len(sep) + len(item) > width:
            lines.append(line)
            line = item
        else:
            line = f"{line}{sep}{item}" if line else item
    if line:
        lines.append(line)
    return lines


def _short(label: str, width: int) -> str:
    return label if len(label) <= width else label[: width - 1] + "~"


@attrs.define
class TokenProgress:
    """One token's (or all tokens') counters, and its rate-limit waits as time spans.

    Overlapping waits (several requests queued at once) count once: the span is extended
    to the latest deadline rather than summed.
    """

    units: int
    planned_requests: int
    done: int = 0
    failed: int = 0
    requests: int = 0
    bytes: int = 0
    held_by_429: bool = False
    history: int = 1
    """How many send times to keep: the rate limit's N."""
    _sent: deque[float] = attrs.field(init=False)
    _waited: float = 0.0
    _wait_start: float | None = None
    _wait_until: float = 0.0

    @_sent.default
    def _history(self) -> deque[float]:
        return deque(maxlen=max(1, self.history))

    def sent(self, now: float) -> None:
        """A request of the token went out at ``now``."""
        self.requests += 1
        self._sent.append(now)

    def wait(self, now: float, seconds: float) -> None:
        """A request expects to wait ``seconds`` from ``now``."""
        until = now + max(0.0, seconds)
        if self._wait_start is not None and now < self._wait_until:
            self._wait_until = max(self._wait_until, until)
            return
        self._close()
        self._wait_start, self._wait_until = now, until

    def _close(self) -> None:
        if self._wait_start is not None:
            self._waited += self._wait_until - self._wait_start
            self._wait_start = None

    def waited(self, now: float) -> float:
        """Seconds spent waiting up to ``now`` (never time still to come)."""
        if self._wait_start is None:
            return self._waited
        return self._waited + max(0.0, min(now, self._wait_until) - self._wait_start)

    def wait_left(self, now: float) -> float:
        """Seconds until the current wait ends (0 when not waiting)."""
        if self._wait_start is None:
            return 0.0
        return max(0.0, self._wait_until - now)

    def eta(self, now: float, max_requests: int, window: float) -> float:
        """Least seconds left for the plan's remaining requests under N per W.

        Each of the N slots frees a window after its last request went out (now, for a
        slot unused lately); the j-th remaining request takes slot ``j mod N`` in round
        ``j // N``. A held token (a 429) first waits out its hold, then the floor
        ``(ceil(R / N) - 1) * W`` applies."""
        if self.done >= self.units:
            return 0.0
        remaining = max(1, self.planned_requests - self.requests)
        n = max(1, max_requests)
        recent = sorted(self._sent)[-n:]
        free = sorted([t + window for t in recent] + [now] * (n - len(recent)))
        last = max(now, free[(remaining - 1) % n]) + (remaining - 1) // n * window
        return max(last - now, self.wait_left(now) + _floor(remaining, n, window))


class _Info(ProgressColumn):
    """A column computed when drawn, so countdowns run between events."""

    def __init__(self, render: Callable[[str], str]) -> None:
        super().__init__()
        self._render = render

    def render(self, task: Task) -> Text:
        return Text.from_markup(self._render(str(task.fields.get("key", ""))))


class BackfillView:
    """Progress of a backfill, from its events: per token and overall, units done/total,
    requests spent, bytes, time waited so far, the live rate-limit countdown and an ETA
    from the plan's remaining requests and the rate-limit floor.

    ``mode`` is ``"live"`` (a rich display on ``console``), ``"plain"`` (lines of at most
    80 columns every `PLAIN_INTERVAL` seconds and when a wait starts) or ``"json"``
    (one JSON object a line on stdout).
    """

    OVERALL = "all tokens"

    def __init__(
        self,
        spec: BackfillSpec,
        mode: str,
        console: Console,
        clock: Clock = time.monotonic,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.mode = mode
        self.clock = clock
        self.started = clock()
        self.max_requests, self.window = spec.bulk_max_requests, spec.window
        self.echo = echo or (lambda line: click.echo(line, err=True))
        the_plan = plan(spec)
        self.tokens = {
            s.label: TokenProgress(
                len(the_plan.units_of(s.label)),
                the_plan.requests_of(s.label),
                history=spec.max_requests,
            )
            for s in spec.tokens
        }
        self.overall = TokenProgress(
            sum(t.units for t in self.tokens.values()),
            sum(t.planned_requests for t in self.tokens.values()),
        )
        self._last_plain: float | None = None
        self._label_width = min(16, max([len(self.OVERALL), *map(len, self.tokens)]))
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            _Info(self._info_markup),
            console=console,
            disable=mode != "live",
            get_time=clock,
            refresh_per_second=4,
        )
        self._tasks = {
            label: self.progress.add_task(
                f"{_short(label, self._label_width):<{self._label_width}}",
                total=progress.units,
                key=label,
            )
            for label, progress in [(self.OVERALL, self.overall), *self.tokens.items()]
        }

    def __enter__(self) -> BackfillView:
        if self.mode == "live":  # a disabled rich Live still prints a newline (rich < 15)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.mode == "live":
            self.progress.__exit__(None, None, None)
        if self.mode == "plain":
            self._plain(self.clock())

    def _of(self, label: str) -> TokenProgress:
        return self.overall if label == self.OVERALL else self.tokens[label]

    def info(self, label: str, now: float | None = None) -> str:
        """The figures of ``label`` (a token or `OVERALL`) at ``now``, as plain text."""
        return " ".join(self._parts(label, self.clock() if now is None else now))

    def _parts(self, label: str, now: float) -> list[str]:
        p = self._of(label)
        parts = [f"{p.requests} req", size(p.bytes)]
        left = p.wait_left(now)
        if left > 0:
            parts.append(f"rate limit {duration(left)}" + (" (429)" if p.held_by_429 else ""))
        parts.append(f"waited {duration(p.waited(now)) if p.waited(now) else '0s'}")
        if label == self.OVERALL:
            eta = max(
                (t.eta(now, self.max_requests, self.window) for t in self.tokens.values()),
                default=0.0,
            )
        else:
            eta = p.eta(now, self.max_requests, self.window)
        pending = p.done < p.units
        parts.append(f"eta {duration(eta)}" if eta >= 1 or not pending else "eta <1s")
        if p.failed:
            parts.append(f"{p.failed} failed")
        return parts

    def _info_markup(self, label: str) -> str:
        text = self.info(label)
        return text.replace("rate limit", "[yellow]rate limit[/yellow]", 1)

    def lines(self, now: float | None = None) -> list[str]:
        """Plain lines, one per token then the overall one, each at most 80 columns."""
        at = self.clock() if now is None else now
        width = self._label_width
        out = []
        for label in [*self.tokens, self.OVERALL]:
            p = self._of(label)
            head = f"{_short(label, width):<{width}} {p.done}/{p.units}"
            out.extend(fit_lines([head, *self._parts(label, at)], sep=" "))
        return out

    def _plain(self, now: float) -> None:
        self._last_plain = now
        for line in self.lines(now):
            self.echo(line)

    def __call__(self, event: BackfillEvent) -> None:
        if self.mode == "json":
            self._json(event)
            return
        now = self.clock()
        label = getattr(event, "label", None)
        if isinstance(event, UnitFinished):
            label = event.unit.label
            for p in (self.tokens[label], self.overall):
                p.done += 1
                p.bytes += event.size
                p.failed += event.state == "failed"
            self.progress.advance(self._tasks[label])
            self.progress.advance(self._tasks[self.OVERALL])
        elif isinstance(event, RequestSent) and label in self.tokens:
            self.tokens[label].sent(now)
            self.overall.requests += 1
        elif isinstance(event, RateLimitWait) and label in self.tokens:
            token = self.tokens[label]
            starts = token.wait_left(now) == 0
            token.wait(now, event.seconds)
            self.overall.wait(now, event.seconds)
            if (
                self.mode == "plain"
                and starts
                and (event.seconds >= WAIT_WORTH_SAYING or token.held_by_429)
            ):
                self.echo(
                    _short(f"{label}: rate limit, waiting {duration(event.seconds)}", PLAIN_WIDTH)
                )
        elif isinstance(event, RateLimited) and label in self.tokens:
            self.tokens[label].held_by_429 = True
        if isinstance(event, RequestSent) and label in self.tokens:
            self.tokens[label].held_by_429 = False
        if self.mode == "plain" and (
            self._last_plain is None or now - self._last_plain >= PLAIN_INTERVAL
        ):
            self._plain(now)

    def _json(self, event: BackfillEvent) -> None:
        record: dict[str, Any] = {"t": round(self.clock() - self.started, 3)}
        if isinstance(event, (UnitStarted, UnitFinished)):
            record.update(event=type(event).__name__, unit=event.unit.id, label=event.unit.label)
            if isinstance(event, UnitFinished):
                record.update(state=event.state, bytes=event.size, error=event.error)
        elif isinstance(event, (DownloadProgress, RequestSent)):
            return  # too chatty for a log; unit completions carry the sizes
        else:
            record.update(event=type(event).__name__, **converter.unstructure(event))
        click.echo(json.dumps(record, default=str))


class WaitView:
    """What ``report`` and ``export`` show on stderr: a countdown while the rate limit
    holds the request (a full window or a 429), export states and download progress.

    Live mode redraws a one-line rich display; plain mode prints a line when a wait
    starts, every `COUNTDOWN_INTERVAL` seconds while it lasts (so a piped run held by a
    429 is not silent for minutes) and when an export changes state.
    """

    def __init__(
        self,
        what: str,
        console: Console,
        live: bool,
        clock: Clock = time.monotonic,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.what = what
        self.clock = clock
        self.live = live
        self.echo = echo or (lambda line: click.echo(line, err=True))
        self.wait = TokenProgress(units=1, planned_requests=1)
        self.state = "starting"
        self.received = 0
        self.total: int | None = None
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            _Info(lambda _: self.status()),
            console=console,
            disable=not live,
            transient=True,
            get_time=clock,
            refresh_per_second=4,
        )
        self._task = self.progress.add_task(_short(what, 24), total=None, visible=False)
        self._said: float | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> WaitView:
        if self.live:  # a disabled rich Live still prints a newline (rich < 15)
            self.progress.__enter__()
        else:
            self._ticker = threading.Thread(target=self._tick_until_stopped, daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.live:
            self.progress.__exit__(None, None, None)

    def _tick_until_stopped(self) -> None:
        while not self._stop.wait(1.0):
            self.tick()

    def tick(self, now: float | None = None) -> None:
        """Plain mode: say the countdown again if a wait has lasted `COUNTDOWN_INTERVAL`
        since it was last said."""
        at = self.clock() if now is None else now
        if self.live or self._said is None or self.wait.wait_left(at) <= 0:
            return
        if at - self._said >= COUNTDOWN_INTERVAL:
            self._say(at)

    def _say(self, now: float) -> None:
        self._said = now
        self.echo(_short(f"{self.what}: {self.status(now)}", PLAIN_WIDTH))

    def status(self, now: float | None = None) -> str:
        """The status at ``now``: the countdown while waiting, else the export's state."""
        at = self.clock() if now is None else now
        left = self.wait.wait_left(at)
        if left > 0:
            why = "HTTP 429" if self.wait.held_by_429 else "window full"
            return f"rate limit ({why}): {duration(left)} left"
        if self.received:
            return size(self.received) + (f" of {size(self.total)}" if self.total else "")
        return self.state

    def __call__(self, event: object) -> None:
        now = self.clock()
        if isinstance(event, RateLimited):
            self.wait.held_by_429 = True
        elif isinstance(event, RateLimitWait):
            starts = self.wait.wait_left(now) == 0
            self.wait.wait(now, event.seconds)
            self.progress.update(self._task, visible=True)
            if not self.live and starts:
                self._say(now)
        elif isinstance(event, RequestSent):
            self.wait.held_by_429 = False
        elif isinstance(event, ExportState):
            if event.status != self.state and not self.live:
                self.echo(_short(f"{self.what}: export {event.status}", PLAIN_WIDTH))
            self.state = event.status
            self.progress.update(self._task, visible=True)
        elif isinstance(event, DownloadProgress):
            self.received, self.total = event.received, event.total
            self.progress.update(
                self._task, total=event.total, completed=event.received, visible=True
            )
