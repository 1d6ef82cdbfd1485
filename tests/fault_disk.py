"""Run the CLI with a disk that fills up: ``python tests/fault_disk.py LIMIT ARGS...``.

Files the export pipeline opens for writing accept ``LIMIT`` bytes, then every write
fails with ENOSPC as a full disk's would (the bytes before the limit really are written,
so a half-written ``.part`` file exists until the pipeline removes it).
"""

from __future__ import annotations

import builtins
import errno
import os
import sys
from typing import Any

from lexer_activity_async import durable
from lexer_activity_async.cli import main


class _FillingFile:
    def __init__(self, handle: Any, room: int) -> None:
        self._handle = handle
        self._room = room

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if len(chunk) > self._room:
                self._handle.write(chunk[: self._room])
                self._room = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._handle.write(chunk)
            self._room -= len(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def install(limit: int) -> None:
    def filling_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 - returned open
        return _FillingFile(handle, limit) if "w" in mode else handle

    durable.open = filling_open  # type: ignore[attr-defined]


if __name__ == "__main__":
    install(int(sys.argv[1]))
    main(sys.argv[2:], prog_name="lexer-activity")
