"""Durable writes: a ``.part`` file, fsynced, renamed into place, its folder fsynced.

Export files (streamed, `write_atomically`) and backfill report files (group commit:
`commit_part` per file, then `sync_folder` once per folder) are made durable by these
same steps, so a crash leaves either the old state or the whole new file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

import anyio

from .destinations import output_error

__all__ = ["part_path", "commit_part", "sync_folder", "write_atomically", "WRITE_BATCH"]

WRITE_BATCH = 1 << 20
"""Bytes gathered before one write in a worker thread."""


def part_path(dest: Path) -> Path:
    """Where ``dest`` is written before it is complete: ``<name>.part`` beside it."""
    return dest.with_name(dest.name + ".part")


def commit_part(part: Path, dest: Path, handle: BinaryIO | None = None) -> None:
    """Make ``part`` durable and rename it onto ``dest`` (blocking: run it in a thread).

    ``handle``, when given, is ``part``'s open handle: it is flushed, fsynced and closed;
    otherwise the file is reopened to fsync it. The folder is not synced here, so a batch
    of renames in one folder costs one `sync_folder`."""
    if handle is None:
        with open(part, "rb+") as reopened:
            os.fsync(reopened.fileno())
    else:
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
    os.replace(part, dest)


def sync_folder(folder: Path) -> None:
    """fsync ``folder`` so the renames in it survive a crash (blocking). Windows cannot
    open a folder, and makes renames durable without it; elsewhere a failure raises."""
    if sys.platform == "win32":  # pragma: no cover - not run on Windows in CI
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def write_atomically(dest: Path, chunks: AsyncIterator[bytes]) -> int:
    """Write ``chunks`` to ``dest``'s part file, then `commit_part` and `sync_folder`;
    the bytes written. On any failure or cancellation the part file is removed and
    ``dest`` is untouched; an OS refusal is an `OutputError` naming ``dest``.

    Writes go to a worker thread, a batch of about `WRITE_BATCH` bytes at a time: a
    write blocks while the kernel flushes dirty pages to a slow disk, and on the event
    loop that would stall every other task. A cancelled write finishes before the file
    is closed and removed."""
    part = part_path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        handle = open(part, "wb")  # noqa: SIM115, ASYNC230 - closed in commit_part or below
    except OSError as error:
        raise output_error(dest, error) from None
    written = batched = 0
    batch: list[bytes] = []
    try:
        async for chunk in chunks:
            batch.append(chunk)
            batched += len(chunk)
            if batched >= WRITE_BATCH:
                await _on_disk(dest, functools.partial(handle.writelines, batch))
                written += batched
                batch, batched = [], 0
        if batch:
            await _on_disk(dest, functools.partial(handle.writelines, batch))
            written += batched
        await _on_disk(dest, functools.partial(_finish, part, dest, handle))
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk fails the final flush too
            handle.close()
        part.unlink(missing_ok=True)
        raise
    return written


def _finish(part: Path, dest: Path, handle: BinaryIO) -> None:
    commit_part(part, dest, handle)
    sync_folder(dest.parent)


async def _on_disk(dest: Path, work: Callable[[], object]) -> None:
    """``work()`` in a worker thread; an OS error (full disk, ...) is an `OutputError`."""
    try:
        await anyio.to_thread.run_sync(work)
    except OSError as error:
        raise output_error(dest, error) from None
