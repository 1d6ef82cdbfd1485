"""The ``lexer-activity`` command line: users, groups, forms, report, export, backfill, status,
show, sandbox, demo.

Tokens are read from an environment variable or a file, never from the command line.
Anything a user can cause ends in one ``Error:`` line (see `_errors`); ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import attrs
import click
from rich.console import Console
from rich.table import Table

from .. import eventloop
from .. import exceptions as exc
from .._version import __version__
from ..backfill import (
    ALL_REPORTS,
    BackfillSpec,
    BackfillSummary,
    ExportSpec,
    Plan,
    TokenSource,
    TokenStatus,
    export_window_costs,
    plan,
    run_backfill,
)
from ..backfill.runner import open_checkpoint
from ..backfill.status import RunStatus, run_status
from ..backfill.worker import DEFAULT_LEASE, check_worker_spec, run_worker
from ..backfill.writer import report_kinds
from ..checkpoint_pg import redact
from ..client import LexerClient
from ..destinations import check_directory, check_file_destination
from ..exports import MAX_CONNECTIONS, DownloadPolicy, PollPolicy
from ..limits import DEFAULT_MAX_REQUESTS, DEFAULT_WINDOW
from ..limits_sqlite import default_store_path
from ..logs import JsonFormatter
from ..models import converter
from ..network import network
from ..overview import Overview, overview
from ..reports import ExportKind, ReportType, add_months
from ..sandbox import Sandbox, SandboxConfig, config_for_port
from ..sinks import FORMATS, make_sink
from ._errors import BAD_USAGE, FAILED, Main, fail, fail_for
from ._progress import BackfillView, WaitView, fit_lines, size

__all__ = ["main"]

T = TypeVar("T")
err = Console(stderr=True)

REPORT_TYPES = [k.value for k in ReportType]
EXPORT_KINDS = [k.value for k in ExportKind]
RESERVED_FILTERS = {"type", "date_from", "date_to", "form", "nps_category", "users", "groups"}


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; bad input found by the library is a usage error (exit 2)."""
    try:
        eventloop.loop_name()  # a bad LEXER_ACTIVITY_LOOP fails before anything starts
    except exc.ConfigurationError:
        coro.close()
        raise
    try:
        return eventloop.run(_interruptible(coro))
    except exc.ValidationError as error:
        raise click.UsageError(str(error)) from None


async def _interruptible(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` so that Ctrl-C cancels it (every task group unwinds, no file is left
    half-written) and then raises `KeyboardInterrupt`. Python 3.11's `asyncio.run` does
    this itself; 3.10's raises the interrupt inside whatever callback is running, and
    asyncio prints that as an unhandled exception with its traceback."""
    main = asyncio.current_task()
    untouched = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if main is None or not untouched or threading.current_thread() is not threading.main_thread():
        return await coro  # 3.11+ (asyncio.run owns SIGINT), or SIGINT ignored: leave it
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        main.cancel()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await coro
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)


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


def _ids(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[int] | None:
    """Click callback: ``1,2`` (repeatable) into ids; None when not given."""
    ids: list[int] = []
    for value in values:
        for item in value.split(","):
            try:
                ids.append(int(item.strip()))
            except ValueError:
                raise click.BadParameter(
                    f"{item.strip()!r} is not an integer id (give ids like 1,2)"
                ) from None
    return ids or None


def _filters(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> dict[str, object] | None:
    """Click callback: ``key=value`` pairs; a value that parses as JSON is taken as JSON
    (``5``, ``true``, ``[1,2]``), anything else as a string."""
    parsed: dict[str, object] = {}
    for value in values:
        key, sep, raw = value.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not key=value")
        if key in RESERVED_FILTERS:
            hint = f"--{key.replace('_', '-')}" if key not in {"type"} else "the argument"
            raise click.BadParameter(f"{key!r} is set by {hint}, not --filter")
        try:
            parsed[key] = json.loads(raw, parse_constant=_not_json)
        except ValueError:
            parsed[key] = raw
    return parsed or None


def _not_json(constant: str) -> object:
    """``NaN`` and ``Infinity`` are not JSON (RFC 8259): such a value is a string."""
    raise ValueError(f"{constant} is not JSON")


def _check_range(date_from: datetime, date_to: datetime) -> None:
    """``--from`` after ``--to``: a usage error naming the options, before anything is sent."""
    if date_from >= date_to:
        raise click.UsageError(
            f"--from {date_from.isoformat()} must be before --to {date_to.isoformat()}"
        )


def _port(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """Click callback: the sandbox takes PORT, PORT + 1 and PORT + 2."""
    if value != 0 and not 1 <= value <= 65533:
        raise click.BadParameter(
            f"{value} is out of range: the sandbox takes three ports (PORT to PORT+2), "
            "so PORT must be 1-65533 (0 picks free ones)"
        )
    return value


def _date_range(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--from`` and ``--to``, parsed into aware datetimes."""
    func = click.option(
        "--to",
        "date_to",
        required=True,
        callback=_when,
        help="End (ISO 8601 with offset, or a date).",
    )(func)
    return click.option(
        "--from",
        "date_from",
        required=True,
        callback=_when,
        help="Start (ISO 8601 with offset, or a date).",
    )(func)


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--users``, ``--groups`` and ``--filter``."""
    options = [
        click.option(
            "--users",
            "--user",
            "users",
            multiple=True,
            callback=_ids,
            metavar="IDS",
            help="Only these user ids, e.g. 1,2 (repeatable).",
        ),
        click.option(
            "--groups",
            "--group",
            "groups",
            multiple=True,
            callback=_ids,
            metavar="IDS",
            help="Only these group ids, e.g. 3 (repeatable).",
        ),
        click.option(
            "--filter",
            "extra_filters",
            multiple=True,
            callback=_filters,
            metavar="KEY=VALUE",
            help="Any other filter; VALUE is JSON if it parses, else a string (repeatable).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _rate_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--max-requests`` and ``--window``: the token's rate limit."""
    func = click.option(
        "--window",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_WINDOW,
        show_default=True,
        help="Rate-limit window in seconds.",
    )(func)
    return click.option(
        "--max-requests",
        type=click.IntRange(min=1),
        default=DEFAULT_MAX_REQUESTS,
        show_default=True,
        help="Requests allowed per window for the token.",
    )(func)


def _read_token(token_env: str, token_file: Path | None) -> str:
    """The token from ``--token-file`` or ``--token-env``; both given is a usage error."""
    ctx = click.get_current_context()
    if token_file is not None and ctx.get_parameter_source("token_env") not in (
        None,
        click.core.ParameterSource.DEFAULT,
    ):
        raise click.UsageError("give either --token-file or --token-env, not both")
    label = "cli"
    source = (
        TokenSource(label, file=token_file) if token_file else TokenSource(label, env=token_env)
    )
    try:
        return source.read()
    except exc.ValidationError as error:
        raise click.UsageError(str(error).replace("token 'cli': ", "")) from None


IN_PROCESS = "memory"
_LIMIT_STORE_HELP = (
    "SQLite file keeping each token's rate limit across runs and processes on this host "
    "(default: $LEXER_LIMIT_STORE, else lexer-activity/limits.sqlite3 under "
    "$XDG_CACHE_HOME or ~/.cache); "
    "`memory` keeps it in this process only."
)


def _limit_store_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--limit-store", metavar="PATH|memory", help=_LIMIT_STORE_HELP)(func)


def _where_limits_live(limit_store: str | None, redis_url: str | None) -> dict[str, Any]:
    """`LexerClient` options for ``--limit-store`` / ``--redis-url``: Redis if given,
    else the store file (the default one unless told), else in-process for ``memory``."""
    if redis_url:
        if limit_store is not None:
            raise click.UsageError("give either --limit-store or --redis-url, not both")
        return {"redis_url": redis_url}
    if limit_store == IN_PROCESS:
        return {}
    return {"limit_store": Path(limit_store).expanduser() if limit_store else default_store_path()}


_PROXY_HELP = (
    "HTTP forward proxy for API, status and export-file requests"
    " (default: $HTTPS_PROXY / $HTTP_PROXY, minus $NO_PROXY)."
)
_CA_BUNDLE_HELP = "PEM file of CAs to trust instead of the system's (default: $SSL_CERT_FILE)."


def _network_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--proxy`` and ``--ca-bundle`` for the backfill commands (spec keys ``proxy``,
    ``ca_bundle``)."""
    func = click.option(
        "--ca-bundle", type=click.Path(path_type=Path, dir_okay=False), help=_CA_BUNDLE_HELP
    )(func)
    return click.option("--proxy", metavar="URL", help=_PROXY_HELP)(func)


def _network_overrides(proxy: str | None, ca_bundle: Path | None) -> dict[str, Any]:
    """Spec overrides for ``--proxy``/``--ca-bundle``, each checked first: a bad one is a
    usage error naming the flag (and never showing a proxy password)."""
    checks: list[tuple[str, str, Callable[[], object]]] = []
    if proxy is not None:
        checks.append(("--proxy", "proxy", lambda: network(proxy=proxy, trust_env=False)))
    if ca_bundle is not None:
        checks.append(
            ("--ca-bundle", "ca_bundle", lambda: network(ca_bundle=ca_bundle, trust_env=False))
        )
    for flag, key, check in checks:
        try:
            check()
        except exc.ConfigurationError as error:
            text = str(error)
            text = flag + text[len(key) :] if text.startswith(key + " ") else f"{flag}: {text}"
            raise click.UsageError(text) from None
    overrides: dict[str, Any] = {"proxy": proxy, "ca_bundle": ca_bundle}
    return {key: value for key, value in overrides.items() if value is not None}


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
        limit_store: str | None,
        proxy: str | None,
        ca_bundle: Path | None,
        **kwargs: Any,
    ) -> Any:
        connect = functools.partial(
            LexerClient,
            _read_token(token_env, token_file),
            api_url=api_url,
            status_url=status_url,
            proxy=proxy,
            ca_bundle=ca_bundle,
            **_where_limits_live(limit_store, redis_url),
        )
        return func(*args, connect=connect, **kwargs)

    options = [
        click.option(
            "--token-env",
            default="LEXER_API_TOKEN",
            show_default=True,
            help="Environment variable holding the API token.",
        ),
        click.option(
            "--token-file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="File holding the API token (instead of --token-env).",
        ),
        click.option("--api-url", envvar="LEXER_API_URL", help="API base URL."),
        click.option("--status-url", envvar="LEXER_STATUS_URL", help="Export status base URL."),
        click.option(
            "--redis-url",
            envvar="LEXER_REDIS_URL",
            help="Share the token's rate limit through this Redis.",
        ),
        click.option("--limit-store", metavar="PATH|memory", help=_LIMIT_STORE_HELP),
        click.option("--proxy", metavar="URL", help=_PROXY_HELP),
        click.option(
            "--ca-bundle", type=click.Path(path_type=Path, dir_okay=False), help=_CA_BUNDLE_HELP
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _need_form(kind: str, form: int | None) -> None:
    """A missing ``--form``: say what it is and where to find one, before anything is sent."""
    if form is None:
        raise click.UsageError(
            f"{kind} needs --form ID, the id of an NPS form; "
            "list the account's forms with `lexer-activity forms`"
        )


@contextlib.contextmanager
def _form_hint(form: int | None) -> Iterator[None]:
    """A 404 from the API for a request with ``--form``: most often the form is not one
    of the account's NPS forms, so say where to look."""
    try:
        yield
    except exc.NotFoundError as error:
        if form is None or error.origin != "api":
            raise
        fail_for(error, FAILED)  # the traceback, with --debug
        raise fail(
            f"{error}: is --form {form} one of the account's NPS forms? list them with "
            f"`lexer-activity forms` (or check --api-url {error.url})",
            FAILED,
        ) from None


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lexer-activity")
@click.option("--debug", is_flag=True, help="Show the Python traceback when a command fails.")
@click.option(
    "--json",
    "json_logs",
    is_flag=True,
    help="Write log records (info and up) to stderr as JSON lines, with token_label, "
    "request_id and report_type.",
)
def main(debug: bool, json_logs: bool) -> None:
    """Pull reports and exports from Lexer's Activity API, or run its local sandbox."""
    if json_logs:
        _json_logs(click.get_current_context())


def _json_logs(ctx: click.Context) -> None:
    """``--json``: the package's log records as JSON lines on stderr for this command
    (undone when it ends, so an in-process caller's logging is left as it was)."""
    logger = logging.getLogger("lexer_activity_async")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)

    ctx.call_on_close(undo)


def _table(title: str | None, columns: Sequence[str], free: Sequence[str] = ()) -> Table:
    """A table that fits the console without breaking a word: the first column (a label)
    is cut at 24 columns, columns in ``free`` (long text, errors) wrap between words in
    what is left (a longer word is folded, never cut), the rest (figures) keep their
    header's width."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        if column in free:
            table.add_column(column, overflow="fold")
        elif i == 0:
            table.add_column(column, overflow="ellipsis", no_wrap=True, max_width=24)
        else:
            table.add_column(column, no_wrap=True, min_width=len(column))
    return table


# -- lists ------------------------------------------------------------------------------------

_LIST_COLUMNS = {
    "users": ("id", "email", "first_name", "last_name", "timezone"),
    "groups": ("id", "name", "comment"),
    "forms": ("id", "name", "title", "nps", "archived"),
}


def _list_command(name: str, doc: str) -> None:
    @main.command(name=name, help=doc)
    @click.option("--table", "as_table", is_flag=True, help="A table instead of JSON.")
    @_with_client
    def command(as_table: bool, connect: Callable[..., LexerClient]) -> None:
        async def fetch() -> list[Any]:
            async with connect() as client:
                items: list[Any] = await getattr(client, name)()
                return items

        records = converter.unstructure(_run(fetch()))
        if not as_table:
            click.echo(json.dumps(records, indent=2, default=str))
            return
        table = _table(None, _LIST_COLUMNS[name], free=_LIST_COLUMNS[name][1:])
        for record in records:
            table.add_row(
                *("" if record.get(c) is None else str(record.get(c)) for c in _LIST_COLUMNS[name])
            )
        Console().print(table)


_list_command("users", "List the account's users (GET /v1/users) as JSON.")
_list_command("groups", "List the account's groups (GET /v1/groups) as JSON.")
_list_command(
    "forms",
    "List the account's forms (GET /v1/forms) as JSON.\n\n"
    "NPS reports and exports take one of their ids as --form.",
)


# -- report and export --------------------------------------------------------------------------


@main.command(
    help="Fetch one report and print it as JSON.\n\nREPORT_TYPE is one of: "
    + ", ".join(REPORT_TYPES)
    + ". Exports ("
    + ", ".join(EXPORT_KINDS)
    + ") are files: use `lexer-activity export`."
)
@click.argument("report_type", metavar="REPORT_TYPE")
@_date_range
@click.option("--form", type=int, help="NPS form id (NPS reports; see `lexer-activity forms`).")
@click.option("--nps-category", help="all, promoters, passives or detractors (NPS reports).")
@_filter_options
@_rate_options
@_with_client
def report(
    report_type: str,
    date_from: datetime,
    date_to: datetime,
    form: int | None,
    nps_category: str | None,
    users: list[int] | None,
    groups: list[int] | None,
    extra_filters: dict[str, object] | None,
    max_requests: int,
    window: float,
    connect: Callable[..., LexerClient],
) -> None:
    if report_type in EXPORT_KINDS:
        raise click.UsageError(
            f"{report_type} is an export (a CSV file), not a report; use "
            f"`lexer-activity export {report_type} --from ... --to ... -o FILE`"
        )
    _check_range(date_from, date_to)
    if report_type in (ReportType.NPS_SUMMARY.value, ReportType.NPS_VOLUME.value):
        _need_form(report_type, form)
    view = WaitView(report_type, err, live=err.is_terminal)

    async def fetch() -> Any:
        async with connect(on_event=view, max_requests=max_requests, window=window) as client:
            return await client.report(
                report_type,
                date_from,
                date_to,
                form=form,
                nps_category=nps_category,
                users=users,
                groups=groups,
                extra_filters=extra_filters,
            )

    with view, _form_hint(form):
        result = _run(fetch())
    click.echo(json.dumps(converter.unstructure(result), indent=2))


@main.command()
@click.argument("kind", type=click.Choice(EXPORT_KINDS))
@_date_range
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="The CSV file to write (its folder is created if needed).",
)
@click.option("--form", type=int, help="NPS form id (nps_submissions; see `lexer-activity forms`).")
@click.option("--nps-category", help="all, promoters, passives or detractors.")
@click.option(
    "--window-months",
    type=click.IntRange(1, 12),
    default=1,
    show_default=True,
    help="Window size when the range is over 12 months.",
)
@click.option("--split", is_flag=True, help="One file per window instead of one merged file.")
@click.option(
    "--connections",
    type=click.IntRange(1, MAX_CONNECTIONS),
    default=1,
    show_default=True,
    help="Fetch the file as this many parallel byte ranges (when its host allows it).",
)
@_filter_options
@_rate_options
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
    connections: int,
    users: list[int] | None,
    groups: list[int] | None,
    extra_filters: dict[str, object] | None,
    max_requests: int,
    window: float,
    connect: Callable[..., LexerClient],
) -> None:
    """Run an export job and stream its CSV to a file."""
    if str(output) == "-":
        # The CSV is written to a temporary file and renamed whole, never half-written.
        raise click.BadParameter(
            "'-' (stdout) is not supported: give a file name", param_hint="'-o' / '--output'"
        )
    _check_range(date_from, date_to)
    if ExportKind(kind).needs_form:
        _need_form(kind, form)
    _writable(check_file_destination, output)  # before the job: no rate budget spent
    view = WaitView(kind, err, live=err.is_terminal)

    async def go() -> Any:
        async with connect(on_event=view, max_requests=max_requests, window=window) as client:
            return await client.export(
                kind,
                date_from,
                date_to,
                output,
                form=form,
                nps_category=nps_category,
                window_months=window_months,
                merge=not split,
                users=users,
                groups=groups,
                extra_filters=extra_filters,
                policy=DownloadPolicy(connections=connections),
            )

    with view, _form_hint(form):
        result = _run(go())
    for path in result.paths:
        click.echo(str(path))
    click.echo(
        f"{len(result.paths)} file(s), {size(result.bytes)}, {result.polls} status polls", err=True
    )


# -- backfill and demo --------------------------------------------------------------------------


def _format_option(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--format",
        "output_format",
        type=click.Choice(FORMATS),
        help=f"How reports are written: json, raw (the API's bodies), parquet or duckdb "
        f"(these two need the [tables] extra). Default: {default}.",
    )


def _check_sink(spec: BackfillSpec) -> None:
    """The output format's checks (its extra, schema versions, a database held by
    another process), before progress starts: one line, not a progress block first.
    The run checks again when it opens the sink."""
    sink = make_sink(spec.format, spec.output)
    try:
        sink.open(report_kinds(spec))
    finally:
        sink.close()


def _check_shared_state(spec: BackfillSpec) -> None:
    """Reach the PostgreSQL checkpoint and Redis the run will use before progress starts
    (one line for a bad URL, a wrong password, a refused spec or a missing extra, not a
    progress block first). The run opens them again; no API request is sent here."""
    if spec.checkpoint_url is not None:
        open_checkpoint(spec).close()
    if spec.redis_url is not None:
        from ..limits_redis import check_redis

        _run(check_redis(spec.redis_url))


def _writable(check: Callable[[Path], object], path: Path) -> None:
    """Run a destination ``check`` before anything starts: an `OutputError` is bad usage
    (status 2), shown as one line (or raised, with ``--debug``)."""
    try:
        check(path)
    except exc.OutputError as error:
        raise fail_for(_true_reason(error), BAD_USAGE) from None


def _true_reason(error: exc.OutputError) -> exc.OutputError:
    """A folder that exists yet refuses new files (``/proc``, ``/sys``) makes the OS say
    "No such file or directory", which reads as if the folder were missing."""
    missing = os.strerror(errno.ENOENT)
    reason = error.reason
    if not reason.startswith(f"{missing} (") or not reason.endswith(")"):
        return error
    folder = Path(reason[len(missing) + 2 : -1])
    if not folder.is_dir():
        return error
    return exc.OutputError(
        error.path, f"{folder} exists but refuses new files (the OS says: {missing})"
    )


def _view(spec: BackfillSpec, as_json: bool) -> BackfillView:
    mode = "json" if as_json else "live" if err.is_terminal else "plain"
    return BackfillView(spec, mode, err)


def _summary_table(summary: BackfillSummary, spec: BackfillSpec) -> Table:
    table = _table(
        "Backfill summary",
        ("token", "done", "skipped", "failed", "first error"),
        free=("first error",),
    )
    for source in spec.tokens:
        failures = summary.failed[source.label]
        table.add_row(
            source.label,
            str(summary.done[source.label]),
            str(summary.skipped[source.label]),
            str(len(failures)),
            failures[0][1] if failures else "",  # wrapped, never cut
        )
    return table


def _print_summary(
    summary: BackfillSummary, spec: BackfillSpec, as_json: bool, extra: dict[str, Any] | None = None
) -> None:
    totals = {
        "units_done": sum(summary.done.values()),
        "units_skipped": sum(summary.skipped.values()),
        "units_provisional": sum(summary.provisional.values()),
        "units_failed": sum(len(f) for f in summary.failed.values()),
        "requests": summary.requests,
        "rate_limited": summary.rate_limited,
        "retries": summary.retries,
        "bytes": summary.bytes,
        "files": summary.files,
        **(extra or {}),
    }
    if as_json:
        click.echo(
            json.dumps(
                {
                    "event": "summary",
                    **totals,
                    "failed": {k: v for k, v in summary.failed.items() if v},
                }
            )
        )
        return
    Console().print(_summary_table(summary, spec))
    items = [f"{k}={size(v) if k == 'bytes' else v}" for k, v in totals.items()]
    for line in fit_lines(items):
        click.echo(line)
    if not summary.ok:
        click.echo("some units failed; fix the cause and rerun with --retry-failed")


def _load_spec(spec_path: Path, overrides: dict[str, Any]) -> BackfillSpec:
    try:
        return BackfillSpec.from_toml(spec_path, **overrides)
    except exc.ValidationError as error:
        message = str(error)
        if str(spec_path) not in message:  # say the path once
            message = f"{spec_path}: {message}"
        raise click.UsageError(message) from None


def _plan_of(spec: BackfillSpec, spec_path: Path) -> Plan:
    """The spec's plan at the clock's now; a range that cannot be planned is bad usage."""
    try:
        return plan(spec)
    except exc.ValidationError as error:
        raise click.UsageError(f"{spec_path}: {error}") from None


def _refresh(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[datetime, datetime] | None:
    """Click callback: ``FROM..TO``, each as ``--from``/``--to`` take them."""
    if value is None:
        return None
    lo, sep, hi = value.partition("..")
    if not sep or not lo or not hi:
        raise click.BadParameter(f"{value!r} is not FROM..TO (e.g. 2024-01-01..2024-03-01)")
    start, end = _when(ctx, param, lo.strip()), _when(ctx, param, hi.strip())
    if start >= end:
        raise click.BadParameter(f"{value!r}: FROM must be before TO")
    return start, end


def _unreadable_tokens(spec: BackfillSpec) -> list[str]:
    """Read every token source (nothing is sent); what is wrong with each that fails."""
    problems = []
    for source in spec.tokens:
        try:
            source.read()
        except exc.ValidationError as error:
            problems.append(str(error))
    return problems


def _print_plan(spec: BackfillSpec, the_plan: Plan) -> None:
    table = _table(
        f"Plan: {the_plan.units_per_token * len(spec.tokens)} units in "
        f"{len(the_plan.windows)} windows\nrequests (est.) and least time (rate limit): "
        "series windows joined; unjoined: every window alone",
        ("token", "units", "requests", "least time", "unjoined", "least time"),
    )
    for source in spec.tokens:
        label = source.label
        table.add_row(
            label,
            str(the_plan.units_per_token),
            str(the_plan.requests_of(label)),
            str(timedelta(seconds=the_plan.least_seconds(label))),
            str(the_plan.requests_of(label, join=False)),
            str(timedelta(seconds=the_plan.least_seconds(label, join=False))),
        )
    Console().print(table)
    if spec.exports:
        Console().print(_connections_line(spec), markup=False, highlight=False)
    costs = export_window_costs(the_plan)
    if costs:
        chosen = spec.export_window_months or spec.window_months
        exports = _table(
            "What each export_window_months costs a token",
            ("export_window_months", "export windows", "requests", "least time"),
        )
        for cost in costs:
            exports.add_row(
                f"{cost.months}{' (this spec)' if cost.months == chosen else ''}",
                str(cost.windows),
                str(cost.requests),
                str(timedelta(seconds=cost.least_seconds)),
            )
        Console().print(exports)


def _connections_line(spec: BackfillSpec) -> str:
    n = spec.export_connections
    if n == 1:
        return "Export downloads: 1 connection per file ([exports] connections = 1)"
    return (
        f"Export downloads: {n} connections per file, as {n} parallel byte ranges where the "
        "file host serves them (else one stream)"
    )


def _plan_record(spec: BackfillSpec, the_plan: Plan, problems: Sequence[str]) -> dict[str, Any]:
    """The plan of ``--dry-run --json``: the figures of `_print_plan`, and the token
    sources that cannot be read."""
    return {
        "event": "plan",
        "units": the_plan.units_per_token * len(spec.tokens),
        "windows": len(the_plan.windows),
        "export_windows": len(the_plan.export_windows),
        "export_connections": spec.export_connections,
        "tokens": [
            {
                "label": source.label,
                "units": the_plan.units_per_token,
                "requests": the_plan.requests_of(source.label),
                "least_seconds": the_plan.least_seconds(source.label),
                "requests_window_by_window": the_plan.requests_of(source.label, join=False),
                "least_seconds_window_by_window": the_plan.least_seconds(source.label, join=False),
            }
            for source in spec.tokens
        ],
        "export_window_costs": [
            {
                "export_window_months": cost.months,
                "export_windows": cost.windows,
                "requests": cost.requests,
                "least_seconds": cost.least_seconds,
            }
            for cost in export_window_costs(the_plan)
        ],
        "unreadable_tokens": list(problems),
    }


@main.command()
@click.argument("spec_path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (units, requests, least time) and check that every token source "
    "can be read; nothing is sent.",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Rerun the units that failed before (a plain rerun skips them).",
)
@click.option(
    "--refresh",
    metavar="FROM..TO",
    callback=_refresh,
    help="Also refetch the done units whose window overlaps FROM..TO (dates as for --from).",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of progress bars.")
@click.option("--redis-url", help="Share each token's rate limit through Redis.")
@_limit_store_option
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output directory (overrides the spec's).",
)
@_format_option("the spec's, else json")
@click.option(
    "--connections",
    type=click.IntRange(1, MAX_CONNECTIONS),
    default=None,
    help="Download each export file as this many parallel byte ranges where its host "
    "serves them (overrides the spec's [exports] connections).",
)
@_network_options
# -- workers (issue 18) --
@click.option(
    "--checkpoint-url",
    metavar="URL",
    help="Keep the checkpoint in PostgreSQL (postgresql://...) instead of the output folder.",
)
@click.option(
    "--worker",
    is_flag=True,
    help="Run as one of several workers sharing the run through the PostgreSQL checkpoint "
    "(needs --checkpoint-url and --redis-url, or both in the spec).",
)
@click.option(
    "--lease",
    metavar="SECONDS",
    type=click.FloatRange(min=0, min_open=True, max=86_400, max_open=True),
    default=DEFAULT_LEASE,
    show_default=True,
    help="With --worker: seconds a claim lasts unrenewed (a dead worker's units wait this).",
)
@click.option(
    "--new-run",
    is_flag=True,
    help="With --worker: once the database's last run has finished, plan a new one "
    "(provisional windows, lookback, --refresh); without it the worker just exits.",
)
def backfill(
    spec_path: Path,
    dry_run: bool,
    retry_failed: bool,
    refresh: tuple[datetime, datetime] | None,
    as_json: bool,
    redis_url: str | None,
    limit_store: str | None,
    output: Path | None,
    output_format: str | None,
    connections: int | None,
    proxy: str | None,
    ca_bundle: Path | None,
    checkpoint_url: str | None = None,
    worker: bool = False,
    lease: float = DEFAULT_LEASE,
    new_run: bool = False,
) -> None:
    """Backfill every report and export of a spec (TOML), resumably.

    A rerun fetches only what is not done: units never fetched or left unfinished,
    provisional windows (too recent to have settled), the spec's lookback, files gone
    missing, and with --refresh the windows asked for.
    """
    overrides: dict[str, Any] = _network_overrides(proxy, ca_bundle)
    if redis_url:
        overrides["redis_url"] = redis_url
    if limit_store:
        _where_limits_live(limit_store, redis_url)  # both given: a usage error
        overrides["limit_store"] = IN_PROCESS if limit_store == IN_PROCESS else Path(limit_store)
    if output:
        overrides["output"] = output
    if output_format:
        overrides["format"] = output_format
    if checkpoint_url:
        overrides["checkpoint_url"] = checkpoint_url
    if connections is not None:
        overrides["export_connections"] = connections
    spec = _load_spec(spec_path, overrides)
    if worker:
        check_worker_spec(spec)  # before anything is planned, opened or sent
    elif lease != DEFAULT_LEASE or new_run:
        raise click.UsageError("--lease and --new-run go with --worker")
    if spec.limit_store is None and spec.redis_url is None:
        spec = attrs.evolve(spec, limit_store=default_store_path())
    the_plan = _plan_of(spec, spec_path)
    for notice in the_plan.notices:
        if as_json:
            click.echo(json.dumps({"event": "notice", "message": notice}))
        else:
            err.print(f"Note: {notice}", markup=False, highlight=False)
    if as_json:
        # The JSON lines carry every 429 already; no plain log lines on stderr.
        logging.getLogger("lexer_activity_async").addHandler(logging.NullHandler())
    if dry_run:
        problems = _unreadable_tokens(spec)
        if as_json:
            click.echo(json.dumps(_plan_record(spec, the_plan, problems)))
        else:
            _print_plan(spec, the_plan)
        for problem in problems:
            err.print(f"Error: {problem}", markup=False, highlight=False)
        sys.exit(1 if problems else 0)
    _writable(check_directory, spec.output)
    _check_sink(spec)
    _check_shared_state(spec)
    with _view(spec, as_json) as view:
        summary = _run(
            run_worker(
                spec,
                lease=lease,
                new_run=new_run,
                retry_failed=retry_failed,
                refresh=refresh,
                on_event=view,
            )
            if worker
            else run_backfill(spec, retry_failed=retry_failed, refresh=refresh, on_event=view)
        )
    _print_summary(summary, spec, as_json)
    sys.exit(0 if summary.ok else 1)


def _status_table(spec: BackfillSpec, status: RunStatus) -> Table:
    shared = status.workers_alive is not None
    where = f"run {status.run_id or '-'} in {redact(spec.checkpoint_url or '')}"
    table = _table(
        f"Backfill status: {where if shared else spec.output}",
        (
            "token",
            "final",
            "provisional",
            "failed",
            *(("leased",) if shared else ()),
            "pending",
            "next provisional refresh",
        ),
        free=("next provisional refresh",),
    )
    for row in status.tokens:
        refresh = "-"
        if row.next_final is not None:
            first = row.next_final.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            refresh = f"next run (the first becomes final at a run after {first})"
        counts = (row.final, row.provisional, row.failed, *((row.leased,) if shared else ()))
        table.add_row(row.label, *(str(n) for n in (*counts, row.pending)), refresh)
    return table


def _status_record(row: TokenStatus) -> dict[str, Any]:
    record: dict[str, Any] = converter.unstructure(row)
    record["next_final"] = row.next_final.isoformat() if row.next_final else None
    if row.leased is None:
        del record["leased"]
    return record


@main.command(short_help="Final, provisional, failed and pending units of a spec.")
@click.argument("spec_path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per token.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output directory (overrides the spec's).",
)
@click.option(
    "--checkpoint-url",
    metavar="URL",
    help="Read the PostgreSQL checkpoint of workers (overrides the spec's checkpoint_url).",
)
def status(
    spec_path: Path, as_json: bool, output: Path | None, checkpoint_url: str | None = None
) -> None:
    """Per token of a backfill spec: final, provisional, failed and pending units, and
    the next provisional refresh. Reads the checkpoint and files; sends nothing.

    With a PostgreSQL checkpoint (workers), from any host: also the units leased to
    live workers, a last JSON line with the totals, and how many workers are alive.
    """
    overrides: dict[str, Any] = {"output": output} if output else {}
    if checkpoint_url:
        overrides["checkpoint_url"] = checkpoint_url
    spec = _load_spec(spec_path, overrides)
    _plan_of(spec, spec_path)  # a range that cannot be planned: one line, status 2
    result = run_status(spec)
    if result.workers_alive is not None:
        keys = ("final", "provisional", "failed", "leased", "pending")
        overall = {key: sum(getattr(row, key) or 0 for row in result.tokens) for key in keys}
    if as_json:
        for row in result.tokens:
            click.echo(json.dumps(_status_record(row)))
        if result.workers_alive is not None:
            record = {"overall": overall, "workers_alive": result.workers_alive}
            click.echo(json.dumps({**record, "run": result.run_id}))
        return
    Console().print(_status_table(spec, result))
    if result.workers_alive is not None:
        totals = " ".join(f"{key}={value}" for key, value in overall.items())
        click.echo(f"overall: {totals}; workers alive: {result.workers_alive}")


def _window_text(lo: datetime, hi: datetime) -> str:
    """``2024-01`` for a calendar month (UTC), else ``FROM..TO``."""
    lo, hi = lo.astimezone(timezone.utc), hi.astimezone(timezone.utc)
    midnight = datetime.min.time()
    if lo.time() == midnight and lo.day == 1 and hi == add_months(lo, 1):
        return lo.strftime("%Y-%m")
    form = "%Y-%m-%d" if lo.time() == hi.time() == midnight else "%Y-%m-%d %H:%M"
    return f"{lo.strftime(form)}..{hi.strftime(form)}"


def _overview_table(view: Overview) -> Table:
    table = _table(
        f"{view.kind.value}: rows and totals",
        ("token", "window", "rows", *view.columns),
    )
    for w in view.windows:
        table.add_row(
            w.label, _window_text(w.window_start, w.window_end), str(w.rows), *map(str, w.totals)
        )
    return table


def _print_overview(view: Overview) -> None:
    Console().print(_overview_table(view))
    click.echo(f"read from {view.output} ({view.format})")
    others = sorted(k.value for k in view.kinds if k is not view.kind)
    if others:
        for line in fit_lines(["also:", *others, "(show --kind KIND)"]):
            click.echo(line)


def _overview_of(output: Path, kind: str | None, output_format: str | None) -> Overview:
    try:
        return overview(output, ReportType(kind) if kind else None, output_format)
    except exc.OutputError as error:
        raise fail(f"{error.path}: {error.reason}", BAD_USAGE) from None


@main.command(short_help="What a backfill wrote: rows and totals per token and window.")
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--kind",
    type=click.Choice(REPORT_TYPES),
    help="The report kind to show (default: summary, else the first one found).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(FORMATS),
    help="The format to read (default: the one OUTPUT holds).",
)
def show(output: Path, kind: str | None, output_format: str | None) -> None:
    """A compact table of what a backfill wrote to OUTPUT (any format): per token label
    and window, the rows of one report kind and the totals of its main counts. Reads the
    files only; sends nothing."""
    _print_overview(_overview_of(output, kind, output_format))


@main.command()
@click.option(
    "--port",
    type=int,
    default=8080,
    show_default=True,
    callback=_port,
    help="API port; the status host gets PORT+1 and the file host PORT+2 "
    "(0: three free ports, printed at start).",
)
@click.option(
    "--max-requests",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Requests each token may send per window before a 429 (the real API: 100).",
)
@click.option(
    "--window",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="The rate-limit window in seconds (the real API: 300).",
)
@click.option(
    "--export-pending",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds an export job stays pending.",
)
@click.option(
    "--export-rows",
    type=click.IntRange(min=0),
    default=None,
    help="Rows per export file: exactly this many, the simulated rows repeated (for "
    "tests and benchmarks); default: one row per case, message or NPS submission.",
)
@click.option(
    "--tokens-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Accept only the tokens in this file (one a line); default: any token.",
)
def sandbox(
    port: int,
    max_requests: int,
    window: float,
    export_pending: float,
    export_rows: int | None,
    tokens_file: Path | None,
) -> None:
    """Serve the local API simulator until Ctrl-C."""
    from ..sandbox import serve_forever

    tokens = None
    if tokens_file is not None:
        tokens = frozenset(
            line.strip() for line in tokens_file.read_text().splitlines() if line.strip()
        )
    config = config_for_port(
        port,
        SandboxConfig(
            max_requests=max_requests,
            window=window,
            tokens=tokens,
            export_pending_seconds=export_pending,
            export_rows=export_rows,
        ),
    )
    eventloop.run(serve_forever(config))


DEMO_OUTPUT = Path("lexer-demo-output")


def _demo_token(label: str) -> str:
    """The demo's token for ``label``: fixed, so every demo sees one world."""
    return "demo-" + hashlib.sha256(f"lexer-activity demo {label}".encode()).hexdigest()[:32]


DEMO_MARKER = ".lexer-demo"
"""The file that marks a directory as a demo's output, which a later demo may delete."""


@main.command(short_help="Try it: a backfill from an embedded sandbox, demo tokens.")
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=DEMO_OUTPUT, show_default=True
)
@click.option("--tokens", "n_tokens", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--months", type=click.IntRange(1, 120), default=18, show_default=True)
@click.option(
    "--window",
    type=click.FloatRange(min=0, min_open=True),
    default=15.0,
    show_default=True,
    help="The sandbox's rate window in seconds (the real API: 300).",
)
@click.option("--resume", is_flag=True, help="Keep an earlier demo's output and resume it.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of progress bars.")
@_limit_store_option
@_format_option("json")
@_network_options
def demo(
    output: Path,
    n_tokens: int,
    months: int,
    window: float,
    resume: bool,
    as_json: bool,
    limit_store: str | None,
    output_format: str | None,
    proxy: str | None,
    ca_bundle: Path | None,
) -> None:
    """Backfill every report and export for demo tokens from an embedded sandbox."""
    # Every option is checked before the earlier output is touched.
    limits = _where_limits_live(limit_store, None).get("limit_store", IN_PROCESS)
    network_options = _network_overrides(proxy, ca_bundle)
    _writable(check_directory, output)
    if output.exists() and not resume and any(output.iterdir()):
        # Only a directory an earlier demo marked may be deleted: a real backfill's output
        # has a checkpoint too.
        if not (output / DEMO_MARKER).is_file():
            raise click.UsageError(f"{output} exists and is not a demo output; choose another -o")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / DEMO_MARKER).write_text("written by `lexer-activity demo`, which may delete it\n")
    labels = [f"team-{chr(ord('a') + i)}" for i in range(n_tokens)]
    # The same token for a label every run: the sandbox's world is keyed by token, so a
    # rerun or --resume sees the same team's data (these tokens exist only in the demo).
    tokens = {label: _demo_token(label) for label in labels}
    for label, token in tokens.items():
        os.environ[f"LEXER_DEMO_TOKEN_{label.upper().replace('-', '_')}"] = token
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    date_to = today.replace(day=1)
    date_from = add_months(date_to, -months)

    async def go() -> tuple[BackfillSummary, BackfillSpec, dict[str, Any]]:
        config = SandboxConfig(
            max_requests=100,
            window=window,
            tokens=frozenset(tokens.values()),
            export_pending_seconds=0.5,
        )
        async with Sandbox(config) as sb:
            spec = BackfillSpec(
                tokens=tuple(
                    TokenSource(label, env=f"LEXER_DEMO_TOKEN_{label.upper().replace('-', '_')}")
                    for label in labels
                ),
                date_from=date_from,
                date_to=date_to,
                output=output,
                reports=ALL_REPORTS,
                nps_form=_DEMO_FORM,
                exports=(
                    ExportSpec(ExportKind.CASE_DETAILS),
                    ExportSpec(ExportKind.NPS_SUBMISSIONS, _DEMO_FORM, "all"),
                    ExportSpec(ExportKind.MENTION_SLA_EXPORT),
                ),
                api_url=sb.api_url,
                status_url=sb.status_url,
                max_requests=100,
                window=window,
                poll=PollPolicy(first_delay=0.5, cap=2.0),
                limit_store=limits,
                format=output_format or "json",
                **network_options,
            )
            with _view(spec, as_json) as view:
                summary = await run_backfill(spec, on_event=view)
            return (
                summary,
                spec,
                {"server_429s": sb.stats.rate_limited, "file_host_leaks": sb.stats.leaks},
            )

    started = time.monotonic()
    summary, spec, extra = _run(go())
    extra["seconds"] = round(time.monotonic() - started, 1)
    _print_summary(summary, spec, as_json, extra)
    if not as_json:
        click.echo(_DEMO_WORLD)
        click.echo(f"output: {output.resolve()}")
        if any(summary.done.values()) or any(summary.skipped.values()):
            _print_overview(_overview_of(output, None, spec.format))
    sys.exit(0 if summary.ok else 1)


_DEMO_WORLD = (
    "What you downloaded: each demo token is one simulated customer-care team (four agents "
    "in three groups) answering about 24 messages a weekday, with cases closed a day after "
    "their last reply and NPS surveys 55, 56 and 123. Every report and export is computed "
    "from the same events, so they agree: a month is the sum of its days, case_details has "
    "one row per case in case_summary, mention_sla_export one per message in summary."
)


_DEMO_FORM = 55
