"""Help text that wraps between words only: click's wrapper also breaks after a hyphen,
which splits names such as ``lexer-activity`` or ``--token-env`` across lines."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import click

__all__ = ["HelpCommand", "HelpContext", "HelpFormatter"]

_HYPHEN = "\ue000"
"""A private-use character standing in for ``-`` while text is wrapped (same width)."""


class HelpFormatter(click.HelpFormatter):
    """`click.HelpFormatter` that never breaks a line at a hyphen."""

    def write_dl(self, rows: Iterable[tuple[str, str]], *args: Any, **kwargs: Any) -> None:
        super().write_dl(
            [(term, text.replace("-", _HYPHEN)) for term, text in rows], *args, **kwargs
        )

    def write_text(self, text: str) -> None:
        super().write_text(text.replace("-", _HYPHEN))

    def getvalue(self) -> str:
        return super().getvalue().replace(_HYPHEN, "-")


class HelpContext(click.Context):
    formatter_class = HelpFormatter


class HelpCommand(click.Command):
    context_class = HelpContext
