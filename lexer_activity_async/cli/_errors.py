"""How the command line fails: one line on stderr and click's exit statuses.

2 for bad usage (arguments, a destination that cannot be written, a port out of range),
1 for a run that failed (server errors, a full disk, a port in use), 130 after Ctrl-C.
No traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import sqlite3
import traceback
from typing import Any

import click

from .. import exceptions as exc
from ..checkpoint import CheckpointError

__all__ = ["BAD_USAGE", "FAILED", "INTERRUPTED", "BadUsage", "Fail", "Main", "describe", "fail"]

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
    if isinstance(error, sqlite3.Error):
        return f"checkpoint database error: {error}"
    return " ".join(str(error).split()) or type(error).__name__


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug"))


class Main(click.Group):
    """The root command: turns whatever a user can cause into one line and a status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            if _debug(ctx):
                traceback.print_exc()
            click.echo("interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except (exc.ValidationError, exc.ConfigurationError) as error:
            if _debug(ctx):
                raise
            raise fail(describe(error), BAD_USAGE) from None
        except (exc.LexerError, OSError, sqlite3.Error) as error:
            if _debug(ctx):
                raise
            raise fail(describe(error), FAILED) from None
