"""Developer sessions: tests, lint, typecheck, bench, demo."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (the same command as the README and .ci/run)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "lexer_activity_async", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", "--strict", "lexer_activity_async")
    session.run("mypy", "--strict", "tests/typing_check.py")  # the report kinds' result types


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark in benchmarks/, each printing its table (medians, ratios)."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/run_all.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The README's first command: a demo backfill against the embedded sandbox."""
    session.install("-e", ".")
    session.run("lexer-activity", "demo", *session.posargs)
