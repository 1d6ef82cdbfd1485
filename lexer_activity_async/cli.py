"""The ``lexer-activity`` command line: report, export, backfill, sandbox, demo.

Tokens are read from an environment variable or a file, never from the command line.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from . import exceptions as exc
from ._version import __version__
from .backfill import (
    ALL_REPORTS,
    BackfillEvent,
    BackfillSpec,
    BackfillSummary,
    ExportSpec,
    TokenSource,
    UnitFinished,
    UnitStarted,
    plan,
    run_backfill,
)
from .client import LexerClient
from .events import DownloadProgress, RateLimitWait
from .exports import PollPolicy
from .models import converter
from .reports import ExportKind, add_months
from .sandbox import Sandbox, SandboxConfig, config_for_port

__all__ = ["main"]

T = TypeVar("T")
err = Console(stderr=True)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; library errors become a one-line message and exit status 1."""
    try:
        return asyncio.run(coro)
    except exc.ValidationError as error:
        raise click.UsageError(str(error)) from None
    except exc.LexerError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False)
        sys.exit(1)


def _when(ctx: click.Context, param: click.Parameter, value: str) -> datetime:
    """Click callback: ISO 8601 with an offset, or a bare date (UTC midnight)."""
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or datetime") from None
    if moment.tzinfo is None:
        raise click.BadParameter(
            f"{value!r} has no UTC offset; add one (e.g. +00:00) or give a bare date (UTC)"
        )
    return moment


def _date_range(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--from`` and ``--to``, parsed into aware datetimes."""
    func = click.option("--to", "date_to", required=True, callback=_when,
                        help="End (ISO 8601 with offset, or a date).")(func)
    return click.option("--from", "date_from", required=True, callback=_when,
                        help="Start (ISO 8601 with offset, or a date).")(func)


def _read_token(token_env: str, token_file: Path | None) -> str:
    label = "cli"
    source = (
        TokenSource(label, file=token_file) if token_file else TokenSource(label, env=token_env)
    )
    try:
        return source.read()
    except exc.ValidationError as error:
        raise click.UsageError(str(error).replace("token 'cli': ", "")) from None


def _with_client(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the token and URL options, and passes ``connect``: a `LexerClient` factory
    holding the token (read from the environment or a file, never an argument)."""

    @functools.wraps(func)
    def command(
        *args: Any,
        token_env: str,
        token_file: Path | None,
        api_url: str | None,
        status_url: str | None,
        redis_url: str | None,
        **kwargs: Any,
    ) -> Any:
        connect = functools.partial(
            LexerClient,
            _read_token(token_env, token_file),
            api_url=api_url,
            status_url=status_url,
            redis_url=redis_url,
        )
        return func(*args, connect=connect, **kwargs)

    options = [
        click.option("--token-env", default="LEXER_API_TOKEN", show_default=True,
                     help="Environment variable holding the API token."),
        click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False),
                     help="File holding the API token (instead of --token-env)."),
        click.option("--api-url", envvar="LEXER_API_URL", help="API base URL."),
        click.option("--status-url", envvar="LEXER_STATUS_URL", help="Export status base URL."),
        click.option("--redis-url", envvar="LEXER_REDIS_URL",
                     help="Share the token's rate limit through this Redis."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lexer-activity")
def main() -> None:
    """Pull reports and exports from Lexer's Activity API, or run its local sandbox."""


@main.command()
@click.argument("report_type")
@_date_range
@click.option("--form", type=int, help="NPS form id (NPS reports).")
@click.option("--nps-category", help="all, promoters, passives or detractors (NPS reports).")
@click.option("--user", "users", type=int, multiple=True, help="Filter by user id (repeatable).")
@click.option("--group", "groups", type=int, multiple=True, help="Filter by group id (repeatable).")
@_with_client
def report(
    report_type: str,
    date_from: datetime,
    date_to: datetime,
    form: int | None,
    nps_category: str | None,
    users: tuple[int, ...],
    groups: tuple[int, ...],
    connect: Callable[..., LexerClient],
) -> None:
    """Fetch one report and print it as JSON."""

    async def fetch() -> Any:
        async with connect() as client:
            return await client.report(
                report_type, date_from, date_to,
                form=form, nps_category=nps_category,
                users=list(users) or None, groups=list(groups) or None,
            )

    click.echo(json.dumps(converter.unstructure(_run(fetch())), indent=2))


@main.command()
@click.argument("kind", type=click.Choice([k.value for k in ExportKind]))
@_date_range
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--form", type=int, help="NPS form id (nps_submissions).")
@click.option("--nps-category", help="all, promoters, passives or detractors.")
@click.option("--window-months", type=click.IntRange(1, 12), default=1, show_default=True,
              help="Window size when the range is over 12 months.")
@click.option("--split", is_flag=True, help="One file per window instead of one merged file.")
@_with_client
def export(
    kind: str,
    date_from: datetime,
    date_to: datetime,
    output: Path,
    form: int | None,
    nps_category: str | None,
    window_months: int,
    split: bool,
    connect: Callable[..., LexerClient],
) -> None:
    """Run an export job and stream its CSV to a file."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=err, transient=True,
    ) as progress:
        task = progress.add_task(kind, total=None, info="starting")

        def show(event: Any) -> None:
            if isinstance(event, DownloadProgress):
                progress.update(task, total=event.total, completed=event.received,
                                info=_size(event.received))
            elif isinstance(event, RateLimitWait):
                progress.update(task, info=f"rate limit: waiting {event.seconds:.1f}s")
            elif hasattr(event, "status"):
                progress.update(task, info=str(event.status))

        async def go() -> Any:
            async with connect(on_event=show) as client:
                return await client.export(
                    kind, date_from, date_to, output,
                    form=form, nps_category=nps_category,
                    window_months=window_months, merge=not split,
                )

        result = _run(go())
    for path in result.paths:
        click.echo(str(path))
    err.print(f"{len(result.paths)} file(s), {_size(result.bytes)}, {result.polls} status polls")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class _ProgressView:
    """Draws per-token and overall progress bars from backfill events (or JSON lines)."""

    def __init__(self, spec: BackfillSpec, as_json: bool) -> None:
        self.as_json = as_json
        self.started = time.monotonic()
        the_plan = plan(spec)
        self.totals = {s.label: len(the_plan.units_of(s.label)) for s in spec.tokens}
        self.bytes = dict.fromkeys(self.totals, 0)
        self.waited = dict.fromkeys(self.totals, 0.0)
        self.waiting_until: dict[str, float] = {}
        self.progress = Progress(
            TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=err, disable=as_json,
        )
        self.overall = self.progress.add_task("all tokens", total=sum(self.totals.values()),
                                              info="")
        self.tasks: dict[str, TaskID] = {
            label: self.progress.add_task(label, total=total, info="")
            for label, total in self.totals.items()
        }

    def _info(self, label: str) -> str:
        parts = [_size(self.bytes[label])]
        until = self.waiting_until.get(label)
        if until is not None and until > time.monotonic():
            parts.append(f"[yellow]rate limit: {until - time.monotonic():.0f}s[/yellow]")
        parts.append(f"waited {self.waited[label]:.0f}s")
        return "  ".join(parts)

    def __call__(self, event: BackfillEvent) -> None:
        if self.as_json:
            self._json(event)
            return
        if isinstance(event, UnitFinished):
            label = event.unit.label
            self.bytes[label] += event.size
            self.progress.advance(self.tasks[label])
            self.progress.advance(self.overall)
            self.progress.update(self.tasks[label], info=self._info(label))
        elif isinstance(event, RateLimitWait):
            # Concurrent waits overlap: count the union of waiting spans, not their sum.
            now = time.monotonic()
            until = now + event.seconds
            previous = self.waiting_until.get(event.label, now)
            if until > previous:
                self.waited[event.label] += until - max(now, previous)
                self.waiting_until[event.label] = until
            self.progress.update(self.tasks[event.label], info=self._info(event.label))

    def _json(self, event: BackfillEvent) -> None:
        record: dict[str, Any] = {"t": round(time.monotonic() - self.started, 3)}
        if isinstance(event, (UnitStarted, UnitFinished)):
            record.update(event=type(event).__name__, unit=event.unit.id, label=event.unit.label)
            if isinstance(event, UnitFinished):
                record.update(state=event.state, bytes=event.size, error=event.error)
        elif isinstance(event, DownloadProgress):
            return  # too chatty for a log; unit completions carry the sizes
        else:
            record.update(event=type(event).__name__, **converter.unstructure(event))
        click.echo(json.dumps(record, default=str))


def _summary_table(summary: BackfillSummary, spec: BackfillSpec) -> Table:
    table = Table(title="Backfill summary")
    for column in ("token", "done", "skipped", "failed", "first error"):
        table.add_column(column)
    for source in spec.tokens:
        failures = summary.failed[source.label]
        table.add_row(
            source.label, str(summary.done[source.label]), str(summary.skipped[source.label]),
            str(len(failures)), failures[0][1][:80] if failures else "",
        )
    return table


def _print_summary(summary: BackfillSummary, spec: BackfillSpec, as_json: bool,
                   extra: dict[str, Any] | None = None) -> None:
    totals = {
        "units_done": sum(summary.done.values()),
        "units_skipped": sum(summary.skipped.values()),
        "units_failed": sum(len(f) for f in summary.failed.values()),
        "requests": summary.requests, "rate_limited": summary.rate_limited,
        "retries": summary.retries, "bytes": summary.bytes, "files": summary.files,
        **(extra or {}),
    }
    if as_json:
        click.echo(json.dumps({"event": "summary", **totals,
                               "failed": {k: v for k, v in summary.failed.items() if v}}))
        return
    console = Console()
    console.print(_summary_table(summary, spec))
    console.print("  ".join(f"{k}={_size(v) if k == 'bytes' else v}" for k, v in totals.items()))
    if not summary.ok:
        console.print("[red]some units failed[/red]; fix the cause and rerun with --retry-failed")


def _print_plan(spec: BackfillSpec) -> None:
    the_plan = plan(spec)
    table = Table(title=f"Plan: {len(the_plan.units)} units in {len(the_plan.windows)} windows")
    for column in ("token", "units", "requests (est.)", "least time (rate limit)"):
        table.add_column(column)
    for source in spec.tokens:
        seconds = the_plan.least_seconds(source.label)
        table.add_row(source.label, str(len(the_plan.units_of(source.label))),
                      str(the_plan.requests_of(source.label)), str(timedelta(seconds=seconds)))
    Console().print(table)


@main.command()
@click.argument("spec_path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--dry-run", is_flag=True, help="Print the plan (units, requests, least time).")
@click.option("--retry-failed", is_flag=True,
              help="Rerun the units that failed before (done units are always skipped).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of progress bars.")
@click.option("--redis-url", help="Share each token's rate limit through Redis.")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              help="Output directory (overrides the spec's).")
def backfill(spec_path: Path, dry_run: bool, retry_failed: bool, as_json: bool,
             redis_url: str | None, output: Path | None) -> None:
    """Backfill every report and export of a spec (TOML), resumably."""
    overrides: dict[str, Any] = {}
    if redis_url:
        overrides["redis_url"] = redis_url
    if output:
        overrides["output"] = output
    try:
        spec = BackfillSpec.from_toml(spec_path, **overrides)
    except exc.ValidationError as error:
        raise click.UsageError(f"{spec_path}: {error}") from None
    if dry_run:
        _print_plan(spec)
        return
    view = _ProgressView(spec, as_json)
    with view.progress:
        summary = _run(run_backfill(spec, retry_failed=retry_failed, on_event=view))
    _print_summary(summary, spec, as_json)
    sys.exit(0 if summary.ok else 1)


@main.command()
@click.option("--port", type=int, default=8080, show_default=True,
              help="API port; the status host gets PORT+1 and the file host PORT+2.")
@click.option("--max-requests", type=int, default=100, show_default=True)
@click.option("--window", type=float, default=300.0, show_default=True, help="Seconds.")
@click.option("--export-pending", type=float, default=2.0, show_default=True,
              help="Seconds an export job stays pending.")
@click.option("--export-rows", type=int, default=1000, show_default=True)
@click.option("--tokens-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Accept only the tokens in this file (one a line); default: any token.")
def sandbox(port: int, max_requests: int, window: float, export_pending: float,
            export_rows: int, tokens_file: Path | None) -> None:
    """Serve the local API simulator until Ctrl-C."""
    from .sandbox import run

    tokens = None
    if tokens_file is not None:
        tokens = frozenset(
            line.strip() for line in tokens_file.read_text().splitlines() if line.strip()
        )
    config = config_for_port(
        port, SandboxConfig(max_requests=max_requests, window=window, tokens=tokens,
                            export_pending_seconds=export_pending, export_rows=export_rows)
    )
    run(config)


DEMO_OUTPUT = Path("lexer-demo-output")
DEMO_MARKER = ".lexer-demo"
"""The file that marks a directory as a demo's output, which a later demo may delete."""


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              default=DEMO_OUTPUT, show_default=True)
@click.option("--tokens", "n_tokens", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--months", type=click.IntRange(1, 120), default=18, show_default=True)
@click.option("--window", type=float, default=15.0, show_default=True,
              help="The sandbox's rate window in seconds (the real API: 300).")
@click.option("--resume", is_flag=True, help="Keep an earlier demo's output and resume it.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of progress bars.")
def demo(output: Path, n_tokens: int, months: int, window: float, resume: bool,
         as_json: bool) -> None:
    """Backfill every report and export for demo tokens from an embedded sandbox."""
    if output.exists() and not resume and any(output.iterdir()):
        # Only a directory an earlier demo marked may be deleted: a real backfill's output
        # has a checkpoint too.
        if not (output / DEMO_MARKER).is_file():
            raise click.UsageError(f"{output} exists and is not a demo output; choose another -o")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / DEMO_MARKER).write_text("written by `lexer-activity demo`, which may delete it\n")
    labels = [f"team-{chr(ord('a') + i)}" for i in range(n_tokens)]
    tokens = {label: secrets.token_urlsafe(24) for label in labels}
    for label, token in tokens.items():
        os.environ[f"LEXER_DEMO_TOKEN_{label.upper().replace('-', '_')}"] = token
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    date_to = today.replace(day=1)
    date_from = add_months(date_to, -months)

    async def go() -> tuple[BackfillSummary, BackfillSpec, dict[str, Any]]:
        config = SandboxConfig(max_requests=100, window=window,
                               tokens=frozenset(tokens.values()), export_pending_seconds=0.5,
                               export_rows=300)
        async with Sandbox(config) as sb:
            spec = BackfillSpec(
                tokens=tuple(
                    TokenSource(label, env=f"LEXER_DEMO_TOKEN_{label.upper().replace('-', '_')}")
                    for label in labels
                ),
                date_from=date_from, date_to=date_to, output=output,
                reports=ALL_REPORTS, nps_form=_DEMO_FORM,
                exports=(ExportSpec(ExportKind.CASE_DETAILS),
                         ExportSpec(ExportKind.NPS_SUBMISSIONS, _DEMO_FORM, "all"),
                         ExportSpec(ExportKind.MENTION_SLA_EXPORT)),
                api_url=sb.api_url, status_url=sb.status_url,
                max_requests=100, window=window,
                poll=PollPolicy(first_delay=0.5, cap=2.0),
            )
            view = _ProgressView(spec, as_json)
            with view.progress:
                summary = await run_backfill(spec, on_event=view)
            return summary, spec, {"server_429s": sb.stats.rate_limited,
                                   "file_host_leaks": sb.stats.leaks}

    started = time.monotonic()
    summary, spec, extra = _run(go())
    extra["seconds"] = round(time.monotonic() - started, 1)
    _print_summary(summary, spec, as_json, extra)
    if not as_json:
        Console().print(f"output: {output.resolve()}")
    sys.exit(0 if summary.ok else 1)


_DEMO_FORM = 55
