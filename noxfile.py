"""Developer sessions: tests on every supported Python and on the lowest declared
dependencies, lint, typecheck, bench, demo."""

from __future__ import annotations

import os
from pathlib import Path

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
"""Every Python the package supports (``requires-python``) and CI tests."""

nox.options.sessions = ["tests", "tests-lowest", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "uv|virtualenv"

# pyenv's shims answer only for the selected version: put each installed interpreter's
# own directory first so that ``python3.X`` finds it.
_pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
_found = [
    str(max(_pyenv.glob(f"{version}.*"), key=lambda p: int(p.name.split(".")[2]))) + "/bin"
    for version in PYTHONS
    if any(_pyenv.glob(f"{version}.*/bin/python{version}"))
]
os.environ["PATH"] = os.pathsep.join([*_found, os.environ.get("PATH", "")])
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")  # use these interpreters, fetch none


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite (the README's test command) on each supported Python, with the
    newest releases of every dependency."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(name="tests-lowest", python=PYTHONS[0], venv_backend="uv")
def tests_lowest(session: nox.Session) -> None:
    """The test suite on the oldest Python with the lowest version of every dependency
    that ``pyproject.toml`` declares (runtime and test), so each floor is a tested one."""
    session.install("--resolution", "lowest-direct", "-e", ".[test]")
    session.run("uv", "pip", "list", external=True)  # the versions under test, in the log
    session.run("python", "-m", "pytest", "-q", *session.posargs)


LINTED = ("lexer_activity_async", "tests", "benchmarks", "noxfile.py")


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff's lint rules and its formatter (check only: nothing is rewritten)."""
    session.install("ruff")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, tests/ and benchmarks/ (`files` in pyproject.toml)."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", "--strict")
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
