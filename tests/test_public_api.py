"""The public API is explicit: the package's `__all__` is exactly the README's list, every
name in it imports, and every module is either public (listed in the README, with its own
`__all__`) or private (a name component starting with ``_``).

A new name or module therefore needs a conscious decision: document it in the README's
"Public API" section, or give it a leading underscore."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import lexer_activity_async

README = Path(__file__).resolve().parent.parent / "README.md"
PACKAGE = lexer_activity_async.__name__
MODULE_PREFIX = "`" + PACKAGE + "."


def _public_api_bullets() -> list[str]:
    """The bullet items of the README's "Public API" section, continuation lines joined."""
    text = README.read_text("utf-8")
    match = re.search(r"^## Public API\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, 'README.md has no "## Public API" section'
    bullets: list[str] = []
    for line in match.group(1).splitlines():
        if line.startswith("- "):
            bullets.append(line[2:])
        elif line.startswith("  ") and bullets:
            bullets[-1] += " " + line.strip()
    return bullets


def documented_names() -> list[str]:
    """The names the README lists for ``from lexer_activity_async import ...``."""
    names: list[str] = []
    for bullet in _public_api_bullets():
        if not bullet.startswith(MODULE_PREFIX):
            names += [n for n in re.findall(r"`([^`]+)`", bullet) if n.isidentifier()]
    return names


def documented_modules() -> list[str]:
    """The public modules the README lists, each bullet's first code span."""
    return [
        re.findall(r"`([^`]+)`", bullet)[0]
        for bullet in _public_api_bullets()
        if bullet.startswith(MODULE_PREFIX)
    ]


def all_modules() -> list[str]:
    """Every module and package under the package, found on disk (none is imported but
    subpackages, so ``__main__`` does not run)."""

    def fail(name: str) -> None:
        raise AssertionError(f"cannot import {name}")

    found = pkgutil.walk_packages(lexer_activity_async.__path__, PACKAGE + ".", onerror=fail)
    return sorted(info.name for info in found)


def is_private(module: str) -> bool:
    return any(part.startswith("_") for part in module.split("."))


def public_modules() -> list[str]:
    return [name for name in all_modules() if not is_private(name)]


def test_the_readme_lists_names_and_modules() -> None:
    """Guards the parsing below: an empty list would make the other tests vacuous."""
    assert "LexerClient" in documented_names()
    assert f"{PACKAGE}.client" in documented_modules()
    assert len(documented_names()) == len(set(documented_names())), "a name listed twice"


def test_all_is_exactly_the_documented_public_api() -> None:
    exported = lexer_activity_async.__all__
    assert len(exported) == len(set(exported)), "a name exported twice"
    assert set(exported) == set(documented_names())


def test_every_name_in_all_is_importable() -> None:
    namespace: dict[str, object] = {}
    exec(f"from {PACKAGE} import *", namespace)  # AttributeError for a stale name
    del namespace["__builtins__"]
    assert set(namespace) == set(lexer_activity_async.__all__)
    for name in lexer_activity_async.__all__:
        assert getattr(lexer_activity_async, name) is namespace[name]


def test_the_package_namespace_holds_all_and_submodules_only() -> None:
    """As httpx checks: a public name bound in the package but missing from `__all__`
    is an accident (a helper imported into ``__init__``), not API."""
    for module in public_modules():
        importlib.import_module(module)  # binds each submodule on its parent
    submodules = {
        name for name, value in vars(lexer_activity_async).items() if isinstance(value, ModuleType)
    }
    public = {name for name in vars(lexer_activity_async) if not name.startswith("_")}
    dunders = {name for name in lexer_activity_async.__all__ if name.startswith("_")}
    assert public - submodules == set(lexer_activity_async.__all__) - dunders
    assert dunders == {"__version__"}


def test_public_modules_are_exactly_the_documented_ones() -> None:
    """A module is public only when the README lists it; any other needs an underscore."""
    assert public_modules() == sorted(documented_modules())


def test_a_module_under_an_underscored_name_is_private() -> None:
    private = [name for name in all_modules() if is_private(name)]
    assert {f"{PACKAGE}.__main__", f"{PACKAGE}._version", f"{PACKAGE}.cli._progress"} <= set(
        private
    )
    assert f"{PACKAGE}.sandbox" in public_modules()


@pytest.mark.parametrize("module", public_modules())
def test_each_public_module_declares_an_importable_all(module: str) -> None:
    imported = importlib.import_module(module)
    exported = getattr(imported, "__all__", None)
    assert isinstance(exported, list), f"{module} declares no __all__ list"
    assert exported, f"{module}.__all__ is empty"
    assert len(exported) == len(set(exported)), f"{module}.__all__ names one twice"
    for name in exported:
        assert hasattr(imported, name), f"{module}.__all__ names missing {name!r}"
        assert not name.startswith("_") or name == "__version__", f"{module}: {name}"
