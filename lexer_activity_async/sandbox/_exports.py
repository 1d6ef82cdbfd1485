"""Export jobs and their CSV files, written from the token's world (`_world`), job states,
and the unguessable download URLs the file host serves.

Rows (the reference does not publish the columns; these are ours, see `COLUMNS`):
- ``case_details``: one row per case closed in the range (as many as case_summary's
  ``total_cases``): case_id, created_at, closed_at, first_reply_time and resolution_time
  (seconds), agent (the first to reply), agent_interactions (replies), classification
  (names joined by ``"; "``), channel, customer, notes;
- ``mention_sla_export``: one row per message arriving in the range (as many as summary's
  ``total_volume``): mention_id, received_at, responded_at (empty if not yet), agent
  (empty if unassigned), customer_wait_time and agent_response_time (seconds, empty if not
  answered), state (reached by "now"), classification, channel, notes;
- ``nps_submissions``: one row per answered invitation of the form sent in the range, of
  the requested category (as many as nps_summary's ``total_received``): submission_id,
  submitted_at, form_id, score, category (promoter/passive/detractor), customer, comment.
Times are ISO 8601 UTC; free text has commas, quotes, newlines and non-ASCII text.

A file is generated once per distinct request (token key, kind, range, params, "now", size
settings), in a worker thread so the event loop keeps serving, and written to disk: the
file host then streams it in chunks and seeks for Range requests without holding it in
memory (benchmarks ask for 1 GiB, by padding: see `write_export`).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import attrs

from . import _world as w
from ._data import CLASSIFICATIONS, USERS, filters_from, nps_category

__all__ = [
    "COLUMNS",
    "ExportFile",
    "ExportJob",
    "ExportStore",
    "parse_range",
    "world_rows",
    "write_export",
]

COLUMNS: dict[str, tuple[str, ...]] = {
    "case_details": (
        "case_id",
        "created_at",
        "closed_at",
        "first_reply_time",
        "resolution_time",
        "agent",
        "agent_interactions",
        "classification",
        "channel",
        "customer",
        "notes",
    ),
    "nps_submissions": (
        "submission_id",
        "submitted_at",
        "form_id",
        "score",
        "category",
        "customer",
        "comment",
    ),
    "mention_sla_export": (
        "mention_id",
        "received_at",
        "responded_at",
        "agent",
        "customer_wait_time",
        "agent_response_time",
        "state",
        "classification",
        "channel",
        "notes",
    ),
}
"""Header of each export kind; the first column is the row id, the last free text."""

_NAMES = {user["id"]: f"{user['first_name']} {user['last_name']}" for user in USERS}
_CLASS_NAMES = dict(CLASSIFICATIONS)
_SINGULAR = {"promoters": "promoter", "passives": "passive", "detractors": "detractor"}


def _stamp(moment: float) -> str:
    return datetime.fromtimestamp(int(moment), timezone.utc).isoformat()


def _encode(fields: list[object]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(fields)
    return buffer.getvalue().encode("utf-8")


def world_rows(
    kind: str,
    key: str,
    volume: int,
    start: datetime,
    end: datetime,
    params: Mapping[str, Any],
    now: datetime,
) -> list[tuple[int, list[object]]]:
    """(row id, the other fields) of every row of export ``kind``, from the world."""
    first, last, at = w.epoch(start), w.epoch(end), w.epoch(now)
    filters = filters_from(params)
    out: list[tuple[int, list[object]]] = []
    if kind == "case_details":
        stop = min(last, at)
        for c in w.cases(key, volume, first, stop, at, filters):
            if c.closed_at > stop:
                continue
            out.append(
                (
                    c.id,
                    [
                        _stamp(c.created_at),
                        _stamp(c.closed_at),
                        round(c.first_reply_at - c.created_at, 3),
                        round(c.last_reply_at - c.created_at, 3),
                        _NAMES[c.agents[0]],
                        len(c.agents),
                        "; ".join(_CLASS_NAMES[cid] for cid in c.classes),
                        c.channel,
                        c.customer,
                        c.note,
                    ],
                )
            )
        out.sort(key=lambda row: row[0])
    elif kind == "nps_submissions":
        wanted = str(params.get("nps_category", "all"))
        for s in w.surveys(key, volume, int(params["form"]), first, last, at, filters):
            if not 0 < s.submitted_at <= at:
                continue
            category = nps_category(s.score)
            if wanted in ("all", category):
                out.append(
                    (
                        s.id,
                        [
                            _stamp(s.submitted_at),
                            s.form,
                            s.score,
                            _SINGULAR[category],
                            s.customer,
                            s.comment,
                        ],
                    )
                )
    else:
        for m in w.messages(key, volume, first, last, at, filters):
            answered = 0 < m.responded_at <= at
            agent = m.agent if 0 < m.assigned_at <= at else 0
            out.append(
                (
                    m.id,
                    [
                        _stamp(m.at),
                        _stamp(m.responded_at) if answered else "",
                        _NAMES[agent] if agent else "",
                        round(m.responded_at - m.at, 3) if answered else "",
                        round(m.responded_at - m.assigned_at, 3) if answered else "",
                        m.state(at),
                        "; ".join(_CLASS_NAMES[cid] for cid in m.classes),
                        m.channel,
                        m.note,
                    ],
                )
            )
    return out


def write_export(
    path: Path,
    kind: str,
    found: list[tuple[int, list[object]]],
    rows: int | None,
    size: int | None,
) -> int:
    """Write the CSV of rows ``found`` and return its size in bytes (blocking; run in a thread).

    Padding, for tests and benchmarks only: with ``rows`` the file has exactly that many rows,
    ``found`` repeated in order (each repeat's ids moved up by a multiple of 10**13) or cut
    short; with ``size`` it is exactly that many bytes: whole repeated rows, then one last
    row whose free-text field is filled with ``x``. A ``size`` smaller than header plus one
    padded row yields the header truncated/padded to ``size`` (not valid CSV; tiny sizes
    only). With no rows in range, padding repeats a row of empty fields.
    """
    header = _encode(list(COLUMNS[kind]))
    if not found and (rows is not None or size is not None):
        found = [(1, [""] * (len(COLUMNS[kind]) - 1))]
    ids = [ident for ident, _ in found]
    pool = [_encode(fields) for _, fields in found]
    count = len(pool)

    def row(i: int) -> bytes:
        return b"%d,%b" % (ids[i % count] + i // count * 10**13, pool[i % count])

    with path.open("wb") as out:
        out.write(header)
        if size is None:
            total = count if rows is None else rows
            for first in range(0, total, 10_000):
                out.write(b"".join(row(i) for i in range(first, min(total, first + 10_000))))
            return out.tell()
        pad_tail = _encode([*found[0][1][:-1], ""])[:-2]
        longest = max(len(tail) for tail in pool) + 16
        reserve = 2 * longest + len(pad_tail)
        remaining = size - len(header)
        if remaining < len(pad_tail) + 16:
            out.seek(0)
            out.truncate()
            out.write((header + b"x" * size)[:size])
            return size
        i = 0
        while remaining > reserve + longest:
            batch = min(10_000, (remaining - reserve) // longest)
            chunk = b"".join(row(j) for j in range(i, i + batch))
            out.write(chunk)
            remaining -= len(chunk)
            i += batch
        last = b"%d,%b" % (ids[i % count] + i // count * 10**13, pad_tail)
        out.write(last + b"x" * (remaining - len(last) - 2) + b"\r\n")
        return out.tell()


def parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """A single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range as a half-open
    ``(start, stop)``; ``"unsatisfiable"`` for a range past the end (416); None when the
    header is malformed or asks for several ranges (ignored: full 200, as RFC 9110 allows)."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or (not match[1] and not match[2]):
        return None
    if not match[1]:
        suffix = int(match[2])
        return (max(0, size - suffix), size) if suffix else "unsatisfiable"
    first = int(match[1])
    last = int(match[2]) if match[2] else size - 1
    if match[2] and last < first:
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1) + 1


@attrs.frozen
class ExportFile:
    """A generated CSV on disk."""

    path: Path
    size: int
    name: str
    etag: str


@attrs.define
class ExportJob:
    """One started export: its report token, owner (token key) and file being generated."""

    report_token: str
    owner: str
    kind: str
    started_at: float
    file: asyncio.Task[ExportFile]
    doomed: bool = False
    outcome: str | None = None
    url_id: str | None = None


class ExportStore:
    """Jobs by report token, files by content key, and download URL ids (live or expired)."""

    def __init__(self, rows: int | None, size: int | None, volume: int) -> None:
        self.rows = rows
        self.size = size
        self.volume = volume
        self.jobs: dict[str, ExportJob] = {}
        self._files: dict[str, asyncio.Task[ExportFile]] = {}
        self._urls: dict[str, ExportFile] = {}
        self._expired: set[str] = set()
        self._dir: Path | None = None

    def open(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="lexer-sandbox-"))

    async def close(self) -> None:
        """Stop generation and delete every file."""
        for task in self._files.values():
            task.cancel()
        if self._files:
            await asyncio.gather(*self._files.values(), return_exceptions=True)
        self._files.clear()
        if self._dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._dir, True)
            self._dir = None

    def _file_for(
        self,
        owner: str,
        kind: str,
        start: datetime,
        end: datetime,
        params: Mapping[str, Any],
        now: datetime,
    ) -> asyncio.Task[ExportFile]:
        seed: tuple[object, ...] = (
            owner,
            start.isoformat(),
            end.isoformat(),
            json.dumps(params, sort_keys=True, default=str),
            w.epoch(now),
        )
        content = hashlib.sha256(
            json.dumps([kind, *seed, self.rows, self.size, self.volume], default=str).encode()
        ).hexdigest()
        task = self._files.get(content)
        if task is None:
            directory = self._dir
            if directory is None:
                raise RuntimeError("the sandbox is not started")
            name = f"{kind}-{start:%Y%m%d}-{end:%Y%m%d}.csv"
            path = directory / f"{content[:32]}.csv"

            def write() -> int:
                found = world_rows(kind, owner, self.volume, start, end, params, now)
                return write_export(path, kind, found, self.rows, self.size)

            async def generate() -> ExportFile:
                size = await asyncio.to_thread(write)
                return ExportFile(path, size, name, f'"{content[:32]}"')

            task = self._files[content] = asyncio.ensure_future(generate())
        return task

    def start(
        self,
        owner: str,
        kind: str,
        start: datetime,
        end: datetime,
        params: Mapping[str, Any],
        now: float,
        doomed: bool,
        present: datetime,
    ) -> ExportJob:
        """Register a new job (pending) and begin generating its file from the world as it
        stands at ``present``."""
        job = ExportJob(
            secrets.token_hex(16),
            owner,
            kind,
            now,
            self._file_for(owner, kind, start, end, params, present),
            doomed,
        )
        self.jobs[job.report_token] = job
        return job

    def status(
        self,
        job: ExportJob,
        now: float,
        pending_seconds: float,
        never_complete: bool,
        files_url: str,
    ) -> dict[str, Any]:
        """The job's status answer. It completes once ``pending_seconds`` have passed and its
        file is ready (failed if doomed or generation failed); a complete job's URL is
        re-minted when the previous one expired."""
        elapsed = now - job.started_at >= pending_seconds
        if job.outcome is None and not never_complete and job.file.done() and elapsed:
            failed = job.doomed or job.file.cancelled() or job.file.exception() is not None
            job.outcome = "failed" if failed else "complete"
        url = None
        if job.outcome == "complete":
            if job.url_id is None or job.url_id in self._expired:
                job.url_id = secrets.token_urlsafe(24)
                self._urls[job.url_id] = job.file.result()
            url = f"{files_url}/files/{job.url_id}/{self._urls[job.url_id].name}"
        return {"status": job.outcome or "pending", "url": url, "token": job.report_token}

    def lookup(self, url_id: str, name: str) -> ExportFile | None:
        found = self._urls.get(url_id)
        return found if found is not None and found.name == name else None

    def expired(self, url_id: str) -> bool:
        return url_id in self._expired

    def expire(self, url_id: str) -> None:
        self._expired.add(url_id)
