"""Output paths are checked before anything is sent, and disk errors are `OutputError`s.

``client.export(..., dest)`` with a destination that cannot be written raises
`OutputError` naming it before the job starts (the sandbox sees no request); a disk that
fills up mid-download raises `OutputError` and leaves neither the file nor its ``.part``.
"""

from __future__ import annotations

import builtins
import errno
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from lexer_activity_async import LexerClient, OutputError
from lexer_activity_async import durable as durable_module
from lexer_activity_async.destinations import check_directory, check_file_destination
from lexer_activity_async.sandbox import Sandbox

UTC = timezone.utc
JAN, FEB = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)


def test_checks_name_the_path_and_the_reason_and_create_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError) as caught:
        check_file_destination(blocker / "deep" / "x.csv")
    assert caught.value.path == str(blocker / "deep" / "x.csv")
    assert caught.value.reason == f"not a directory ({blocker})"
    with pytest.raises(OutputError, match="is a directory; give a file name"):
        check_file_destination(tmp_path / "folder")
    with pytest.raises(OutputError, match="not a directory"):
        check_directory(blocker)
    with pytest.raises(OutputError, match="exists and is not a regular file"):
        check_file_destination("/dev/null")
    # Missing folders under a writable one pass, and are not created by the check.
    assert check_file_destination(tmp_path / "new" / "sub" / "x.csv") == (
        tmp_path / "new" / "sub" / "x.csv"
    )
    assert check_directory(tmp_path / "new2") == tmp_path / "new2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "folder"]


async def test_export_checks_its_destination_before_starting_the_job(
    sandbox: Sandbox, make_client: Callable[..., LexerClient], tmp_path: Path
) -> None:
    (tmp_path / "blocker").write_text("x")
    async with make_client() as client:
        for dest in (tmp_path / "blocker" / "cases.csv", tmp_path):
            with pytest.raises(OutputError) as caught:
                await client.export("case_details", JAN, FEB, dest)
            assert caught.value.path == str(dest)
    assert sandbox.stats.requests == {}
    assert sandbox.stats.exports_started == 0


class _FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, handle: Any, room: int) -> None:
        self._handle, self._room = handle, room

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if len(chunk) > self._room:
                self._handle.write(chunk[: self._room])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._handle.write(chunk)
            self._room -= len(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


async def test_a_full_disk_is_an_output_error_and_leaves_nothing(
    sandbox: Sandbox,
    make_client: Callable[..., LexerClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def filling_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - returned open
        return _FullDisk(handle, 100) if "w" in mode else handle

    monkeypatch.setattr(durable_module, "open", filling_open, raising=False)
    dest = tmp_path / "out" / "cases.csv"
    async with make_client() as client:
        with pytest.raises(OutputError) as caught:
            await client.export("case_details", JAN, FEB, dest)
    assert (caught.value.path, caught.value.reason) == (str(dest), "No space left on device")
    assert caught.value.__cause__ is None
    assert sandbox.stats.exports_started == 1
    assert list(dest.parent.iterdir()) == []
