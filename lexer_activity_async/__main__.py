"""``python -m lexer_activity_async``: the same as the ``lexer-activity`` command."""

from .cli import main

main(prog_name="lexer-activity")
