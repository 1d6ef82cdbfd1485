"""The report writer: each report's JSON staged as a part file, then made durable in
batches (fsync, rename, folder fsync) and checkpointed in one transaction (group commit)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from pathlib import Path

import anyio
import attrs

from .. import durable
from .. import exceptions as exc
from ..checkpoint import Checkpoint

__all__ = ["ReportWriter", "Staged", "output_error"]


@attrs.define
class _Pending:
    unit_id: str
    part: Path
    path: Path
    size: int
    final: bool = True
    committed: bool = False
    error: Exception | None = None


Staged = _Pending
"""A report file staged by `ReportWriter.stage`, for `ReportWriter.commit`."""


def output_error(path: Path, error: OSError | ValueError) -> exc.OutputError:
    """An OS refusal to write ``path`` (full disk, read-only folder, bad name) as the
    unit's `OutputError`."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return exc.OutputError(path, reason)


def _remove(part: Path) -> None:
    """Remove a part file, if any; a folder that refuses even that keeps it."""
    with suppress(OSError, ValueError):
        part.unlink(missing_ok=True)


class ReportWriter:
    """Writes report files with group commit.

    Each unit's JSON goes to ``<file>.part`` on the event loop (a page-cache write).
    Then one worker-thread call per batch fsyncs the parts, renames them into place,
    fsyncs their folders and marks the units done in one checkpoint transaction. A thread
    hop per unit cost about 1 ms of CPU, more than the request itself. A unit is done only
    once its file is durable. A file that cannot be written fails its unit alone (an
    `OutputError`, its part file removed); a checkpoint that cannot be written fails the
    whole batch with `CheckpointError`. Only a crash can leave a ``.part`` file, which the
    rerun of that unit overwrites.
    """

    def __init__(self, checkpoint: Checkpoint, now: Callable[[], datetime] | None = None) -> None:
        self._checkpoint = checkpoint
        self._now = now
        self._pending: list[_Pending] = []
        self._lock = anyio.Lock()
        self._folders: set[Path] = set()

    def stage(self, unit_id: str, path: Path, payload: object, *, final: bool = True) -> _Pending:
        """Write ``payload`` as JSON to ``<file>.part``; `commit` then puts it in place,
        recorded final or provisional. Nothing of the payload is kept: units waiting for
        their batch hold no data."""
        # Compact: json's C encoder is skipped whenever indent is set (4-5x slower here).
        data = (json.dumps(payload, separators=(",", ":")) + "\n").encode("utf-8")
        part = path.with_name(path.name + ".part")
        try:
            if path.parent not in self._folders:  # one mkdir per folder, not per unit
                path.parent.mkdir(parents=True, exist_ok=True)
                self._folders.add(path.parent)
            with open(part, "wb") as handle:
                handle.write(data)
        except (OSError, ValueError) as error:
            _remove(part)
            raise output_error(path, error) from None
        return _Pending(unit_id, part, path, len(data), final)

    async def commit(self, entry: _Pending) -> int:
        """Wait until the batch holding ``entry`` is durable and checkpointed; its size.
        Cancelled before that, the entry leaves its batch and its part file is removed."""
        self._pending.append(entry)
        try:
            async with self._lock:  # batches run one at a time; later arrivals form the next
                if not entry.committed and entry.error is None:
                    batch, self._pending = self._pending, []
                    try:
                        await anyio.to_thread.run_sync(self._commit, batch)
                    except Exception as error:  # the checkpoint could not be written
                        for other in batch:
                            if not other.committed and other.error is None:
                                other.error = error
                                _remove(other.part)
        except BaseException:
            if not entry.committed:
                if entry in self._pending:
                    self._pending.remove(entry)
                _remove(entry.part)
            raise
        if entry.error is not None:
            raise entry.error
        return entry.size

    def _commit(self, batch: list[_Pending]) -> None:
        folders: dict[Path, list[_Pending]] = {}
        for entry in batch:
            try:
                durable.commit_part(entry.part, entry.path)
                folders.setdefault(entry.path.parent, []).append(entry)
            except OSError as error:
                entry.error = output_error(entry.path, error)
                _remove(entry.part)
        for folder, entries in folders.items():
            try:
                durable.sync_folder(folder)
            except OSError as error:  # the renames may not be durable: not done
                for entry in entries:
                    entry.error = output_error(entry.path, error)
        written = [e for e in batch if e.error is None]
        self._checkpoint.mark_done_many(
            [(e.unit_id, e.size) for e in written],
            final=[e.final for e in written],
            fetched_at=self._now().timestamp() if self._now is not None else None,
        )
        for entry in batch:
            entry.committed = True
