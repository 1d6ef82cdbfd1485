"""Sinks writing one file per unit (``json``, ``raw``, and the base of ``parquet``).

Each unit's bytes go to a part file on the event loop (a page-cache write); a batch is
then fsynced, renamed into place and its folders fsynced in a worker thread, so a crash
leaves either a unit's old file or its whole new one, never part of one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import orjson

from .. import durable
from .. import exceptions as exc
from ..kinds import ReportResult
from ..models import converter
from ..reports import ReportType
from . import Slot, Staged

__all__ = ["FileSink", "JsonSink", "RawSink", "output_error"]


def output_error(path: Path, error: OSError | ValueError) -> exc.OutputError:
    """An OS refusal to write ``path`` (full disk, read-only folder, bad name), or a
    result that cannot be encoded, as the unit's `OutputError`."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return exc.OutputError(path, reason)


def _remove(part: Path | None) -> None:
    """Remove a part file, if any; a folder that refuses even that keeps it."""
    if part is not None:
        with suppress(OSError, ValueError):
            part.unlink(missing_ok=True)


class FileSink:
    """One file per unit at `path`; subclasses say where and what bytes (`encode`)."""

    format = "files"
    needs_body = False

    def __init__(self, output: Path) -> None:
        self.output = output
        self._folders: set[Path] = set()

    def path(self, slot: Slot) -> Path:
        raise NotImplementedError

    def part_of(self, path: Path) -> Path:
        """Where ``path`` is written before it is complete."""
        return durable.part_path(path)

    def encode(self, slot: Slot, result: ReportResult, body: bytes | None) -> bytes:
        raise NotImplementedError

    def open(self, kinds: Sequence[ReportType]) -> None:
        """Nothing to check: files need no extra and hold no versioned schema."""

    def close(self) -> None:
        pass

    def has(self, slot: Slot, size: int | None) -> bool:
        try:
            return self.path(slot).stat().st_size == size
        except OSError:
            return False

    def stage(self, slot: Slot, result: ReportResult, body: bytes | None) -> Staged:
        path = self.path(slot)
        part = self.part_of(path)
        try:
            data = self.encode(slot, result, body)
            if path.parent not in self._folders:  # one mkdir per folder, not per unit
                path.parent.mkdir(parents=True, exist_ok=True)
                self._folders.add(path.parent)
            with open(part, "wb") as handle:
                handle.write(data)
        except (OSError, ValueError) as error:
            _remove(part)
            raise output_error(path, error) from None
        return Staged(slot, len(data), path, part)

    def write(self, batch: Sequence[Staged]) -> list[Exception | None]:
        errors: list[Exception | None] = [None] * len(batch)
        folders: dict[Path, list[int]] = {}
        for i, entry in enumerate(batch):
            assert entry.part is not None
            try:
                durable.commit_part(entry.part, entry.path)
                folders.setdefault(entry.path.parent, []).append(i)
            except OSError as error:
                errors[i] = output_error(entry.path, error)
                _remove(entry.part)
        for folder, indexes in folders.items():
            try:
                durable.sync_folder(folder)
            except OSError as error:  # the renames may not be durable: not written
                for i in indexes:
                    errors[i] = output_error(batch[i].path, error)
        return errors

    def discard(self, staged: Staged) -> None:
        _remove(staged.part)


class JsonSink(FileSink):
    """``<output>/<label>/reports/<type>/<window>.json``: the typed result as JSON."""

    format = "json"

    def path(self, slot: Slot) -> Path:
        return self.output / slot.label / "reports" / slot.name / f"{slot.stamp}.json"

    def encode(self, slot: Slot, result: ReportResult, body: bytes | None) -> bytes:
        return _encode(converter.unstructure(result))


def _encode(payload: object) -> bytes:
    """Compact UTF-8 JSON and a newline: orjson (5x json's C encoder here), or the
    standard library for what orjson refuses (integers over 64 bits)."""
    try:
        return orjson.dumps(payload, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return (json.dumps(payload, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


class RawSink(FileSink):
    """``<output>/<label>/raw/<type>/<window>.json``: the response body byte for byte."""

    format = "raw"
    needs_body = True

    def path(self, slot: Slot) -> Path:
        return self.output / slot.label / "raw" / slot.name / f"{slot.stamp}.json"

    def encode(self, slot: Slot, result: ReportResult, body: bytes | None) -> bytes:
        if body is None:
            raise ValueError("the raw format needs the response body")
        return body
