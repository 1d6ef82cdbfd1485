"""What the package needs from its environment: the aiohttp switch the client relies on,
and runtime imports that stay within the declared runtime dependencies."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import aiohttp
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from lexer_activity_async import ConfigurationError, LexerClient

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lexer_activity_async"


async def test_an_aiohttp_without_the_resend_switch_is_refused_at_open() -> None:
    """On an aiohttp release without the private switch for its silent resend, the
    client refuses to open rather than run without the guarantee."""
    async with aiohttp.ClientSession() as session:
        del session._retry_connection  # what an aiohttp release before 3.11 looks like
        client = LexerClient("tok-never-sent-0123456789", session=session)
        with pytest.raises(ConfigurationError, match=r"aiohttp>=3\.11") as raised:
            await client.open()
        assert "tok-never-sent" not in str(raised.value)
        await client.aclose()


async def test_sessions_the_client_opens_have_the_resend_switched_off() -> None:
    async with LexerClient("tok-never-sent-0123456789") as client:
        await client.open()
        assert client.session._retry_connection is False


def _imported_top_level_modules() -> set[str]:
    """Top-level names of every absolute import in the package's source."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"lexer_activity_async", "__future__"}


def _declared(extras: set[str]) -> set[str]:
    """Normalised names of pyproject's runtime requirements, plus those of ``extras``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    declared = set()
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert name is not None
        declared.add(re.sub(r"[-_.]+", "-", name.group(0)).lower())
    return declared


_OWNERS = {"opentelemetry": ["opentelemetry-api"]}
"""Namespace packages several distributions fill, and the one the package's imports need
(`test_only_the_opentelemetry_api_is_imported` checks it)."""


def test_only_the_opentelemetry_api_is_imported() -> None:
    """The ``otel`` extra is the API alone: the package imports none of the SDK's modules."""
    modules = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
    otel = {m for m in modules if m.split(".")[0] == "opentelemetry"}
    assert otel, "the scan sees the otel module's imports"
    assert otel <= {"opentelemetry", "opentelemetry.trace", "opentelemetry.metrics"}, otel


def test_the_runtime_imports_only_declared_runtime_dependencies() -> None:
    """Every third-party module the package imports comes from a runtime requirement (or
    the optional ``redis``, ``dlt``, ``otel``, ``tables``, ``uvloop`` and ``postgres``
    extras), so a plain install never lacks one; and no runtime requirement is there only
    for the tests."""
    distributions = packages_distributions()
    imported = _imported_top_level_modules()
    assert "aiohttp" in imported  # the scan does see third-party imports
    # tomllib (stdlib from 3.11) or its back-port tomli, which is declared for Python 3.10.
    provided = {
        re.sub(r"[-_.]+", "-", dist).lower()
        for module in imported - {"tomli", "tomllib"}
        for dist in _OWNERS.get(module, distributions.get(module, [module]))
    }
    runtime = _declared(set())
    optional = _declared({"redis", "dlt", "otel", "tables", "uvloop", "postgres"})
    assert provided <= runtime | optional, provided - runtime
    assert "aiolimiter" not in runtime  # only the tests import it
    unused = runtime - provided - {"tomli", "exceptiongroup"}  # back-ports for Python 3.10
    assert not unused, unused
