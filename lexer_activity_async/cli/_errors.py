"""How the command line fails: one line on stderr and click's exit statuses.

2 for bad usage (arguments, a destination that cannot be written, a port out of range),
1 for a run that failed (server errors, a full disk, a port in use), 130 after Ctrl-C.
No traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import traceback
from typing import Any

import click

from .. import exceptions as exc
from ..checkpoint import CheckpointError
from ._help import HelpCommand, HelpContext

__all__ = [
    "BAD_USAGE",
    "FAILED",
    "INTERRUPTED",
    "BadUsage",
    "Fail",
    "Main",
    "describe",
    "fail",
    "fail_for",
]

BAD_USAGE, FAILED, INTERRUPTED = 2, 1, 130


class Fail(click.ClickException):
    """An error shown as one ``Error: ...`` line (exit status 1)."""


class BadUsage(Fail):
    """`Fail` for bad usage that needs no usage text, e.g. an unwritable path (status 2)."""

    exit_code = BAD_USAGE


def fail(message: str, code: int = FAILED) -> Fail:
    """A `Fail` (status 1) or `BadUsage` (status 2) for ``message``."""
    return BadUsage(message) if code == BAD_USAGE else Fail(message)


def describe(error: BaseException) -> str:
    """One line for a user: what failed, where, and the OS's or server's reason."""
    if isinstance(error, CheckpointError):
        return f"checkpoint {error.path}: {error.reason}"
    if isinstance(error, exc.OutputError):
        return f"cannot write {error.path}: {error.reason}"
    if isinstance(error, OSError):
        where = f" {error.filename}" if error.filename else ""
        return f"cannot use{where}: {error.strerror or type(error).__name__}"
    if isinstance(error, exc.NotFoundError) and error.origin is not None:
        host, option = (
            ("the API", "--api-url (it ends in /v1)")
            if error.origin == "api"
            else ("the status host", "--status-url")
        )
        return f"HTTP 404 from {host} {error.url}: {error.message} - check {option}"
    if isinstance(error, sqlite3.Error):
        return f"checkpoint database error: {error}"
    return " ".join(str(error).split()) or type(error).__name__


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug"))


def fail_for(error: BaseException, code: int) -> Fail:
    """The one-line `Fail` for ``error`` with status ``code``; with ``--debug`` the
    traceback is printed first, and the status stays the same."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and _debug(ctx):
        traceback.print_exception(type(error), error, error.__traceback__)
    return fail(describe(error), code)


def _broken_pipe(error: BaseException) -> bool:
    """``error`` is a closed stdout pipe, alone or as every leaf of an exception group
    (a progress event written from inside a task group)."""
    inner = getattr(error, "exceptions", None)
    if isinstance(inner, tuple) and inner:
        return all(_broken_pipe(e) for e in inner)
    return isinstance(error, BrokenPipeError)


def _quiet_after_broken_pipe() -> None:
    """The reader of stdout went away (``... | head``): send whatever is still buffered
    to devnull, so that flushing at exit does not fail again (the Python docs' advice)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # pragma: no cover - stdout without a descriptor
        pass
    finally:
        os.close(devnull)


class Main(click.Group):
    """The root command: turns whatever a user can cause into one line and a status."""

    context_class = HelpContext
    command_class = HelpCommand

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            finally:
                sys.stdout.flush()  # a closed pipe shows here, not at exit
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            if _debug(ctx):
                traceback.print_exc()
            click.echo("interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except (exc.ValidationError, exc.ConfigurationError) as error:
            raise fail_for(error, BAD_USAGE) from None
        except exc.LimiterBackendError as error:
            if not isinstance(error.__cause__, ImportError):
                raise fail_for(error, FAILED) from None
            # A missing extra is a setup problem (status 2); say how from a clone too.
            clone = " (from a clone of the repository: pip install -e '.[redis]')"
            if _debug(ctx):
                traceback.print_exception(type(error), error, error.__traceback__)
            raise fail(describe(error) + clone, BAD_USAGE) from None
        except (exc.LexerError, OSError, sqlite3.Error) as error:
            if not _broken_pipe(error):
                raise fail_for(error, FAILED) from None
            # Like `ls | head`: a reader that stopped reading is no error of ours.
            _quiet_after_broken_pipe()
            ctx.exit(0)
        except Exception as error:
            if not _broken_pipe(error):
                raise
            _quiet_after_broken_pipe()
            ctx.exit(0)
