"""The command's event loop: uvloop when installed (and not on Windows), asyncio's on
request or without it; a bad choice is a `ConfigurationError` before anything runs."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from typing import Any

import pytest
from click.testing import CliRunner

from lexer_activity_async import ConfigurationError, eventloop
from lexer_activity_async.cli import main

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None and sys.platform != "win32"


async def loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_is_used_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.LOOP_ENV, "asyncio")
    assert eventloop.loop_name() == "asyncio"
    assert not eventloop.run(loop_type()).startswith("uvloop")


def test_uvloop_is_used_by_default_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.LOOP_ENV, raising=False)
    if not HAVE_UVLOOP:
        assert eventloop.loop_name() == "asyncio"
        return
    assert eventloop.loop_name() == "uvloop"
    assert eventloop.run(loop_type()).startswith("uvloop")


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    monkeypatch.setenv(eventloop.LOOP_ENV, "auto")
    assert eventloop.loop_name() == "asyncio"
    assert not eventloop.run(loop_type()).startswith("uvloop")
    monkeypatch.setenv(eventloop.LOOP_ENV, "uvloop")
    with pytest.raises(ConfigurationError, match=r"lexer-activity-async\[uvloop\]"):
        eventloop.loop_name()


def test_windows_never_gets_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delenv(eventloop.LOOP_ENV, raising=False)
    assert eventloop.loop_name() == "asyncio"


@pytest.mark.parametrize("value", ["trio", "uv", "1"])
def test_an_unknown_choice_is_refused_before_running(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(eventloop.LOOP_ENV, value)
    ran: list[bool] = []

    async def work() -> None:
        ran.append(True)

    with pytest.raises(ConfigurationError, match=eventloop.LOOP_ENV):
        eventloop.run(work())
    assert ran == []


def test_the_cli_reports_a_bad_choice_without_a_traceback(monkeypatch: Any) -> None:
    monkeypatch.setenv(eventloop.LOOP_ENV, "trio")
    result = CliRunner().invoke(main, ["users"], env={"LEXER_API_TOKEN": "tok-0123456789abcdef"})
    assert result.exit_code != 0
    assert eventloop.LOOP_ENV in result.output
    assert "Traceback" not in result.output
