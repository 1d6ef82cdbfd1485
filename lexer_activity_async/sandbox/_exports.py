"""Export jobs and their CSV files: deterministic generation into a temp dir, job states,
and the unguessable download URLs the file host serves.

A file is generated once per distinct request (token key, kind, range, params, size
settings), in a worker thread so the event loop keeps serving, and written to disk: the
file host then streams it in chunks and seeks for Range requests without holding it in
memory (benchmarks ask for 1 GiB).
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
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import attrs

from ._data import CLASSIFICATIONS, USERS, rng_for

__all__ = ["COLUMNS", "ExportFile", "ExportJob", "ExportStore", "parse_range", "write_export"]

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

TEXTS = (
    "Thanks, all sorted",
    'Customer said "this is the worst" twice',
    "Line one\nline two",
    "Café crème — très bien",
    "日本語のコメントです",
    "Great service 🎉👍",
    "",
    "plain note",
    'Refund, "urgent"\r\nsecond line, with émoji 😀',
)
"""Free-text values chosen to exercise CSV parsing: commas, doubled quotes, newlines and
non-ASCII UTF-8."""

CUSTOMERS = ("@jsmith", "Renée O'Brien", "李小龍", "Smith, John", '"Big" Bob', "anonymous")
CHANNELS = ("twitter", "facebook", "instagram", "email", "webchat")
POOL = 2048
"""Distinct row bodies generated per file; larger files cycle through them with fresh ids."""


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _encode(fields: list[object]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(fields)
    return buffer.getvalue().encode("utf-8")


def _fields(
    kind: str, rng: Any, start: datetime, end: datetime, params: Mapping[str, Any]
) -> list[object]:
    """One row's fields after the id column, the free-text field last."""
    span = max(1.0, (end - start).total_seconds())
    at = start + timedelta(seconds=rng.uniform(0.0, span))
    agent = rng.choice(USERS)
    agent_name = f"{agent['first_name']} {agent['last_name']}"
    text = rng.choice(TEXTS)
    if kind == "case_details":
        first = rng.uniform(30.0, 90_000.0)
        resolution = first + rng.uniform(0.0, 200_000.0)
        return [
            _stamp(at),
            _stamp(at + timedelta(seconds=resolution)),
            round(first, 3),
            round(resolution, 3),
            agent_name,
            rng.randint(1, 6),
            rng.choice(CLASSIFICATIONS)[1],
            rng.choice(CHANNELS),
            rng.choice(CUSTOMERS),
            text,
        ]
    if kind == "nps_submissions":
        category = str(params.get("nps_category", "all"))
        scores = {"promoters": (9, 10), "passives": (7, 8), "detractors": (0, 6)}
        low, high = scores.get(category, (0, 10))
        score = rng.randint(low, high)
        name = "promoter" if score >= 9 else "passive" if score >= 7 else "detractor"
        return [_stamp(at), params.get("form", ""), score, name, rng.choice(CUSTOMERS), text]
    wait = rng.uniform(5.0, 100_000.0)
    return [
        _stamp(at),
        _stamp(at + timedelta(seconds=wait)),
        agent_name,
        round(wait, 3),
        round(rng.uniform(1.0, wait), 3),
        rng.choice(("closed", "responded", "assigned")),
        rng.choice(CLASSIFICATIONS)[1],
        rng.choice(CHANNELS),
        text,
    ]


def write_export(
    path: Path,
    kind: str,
    seed: tuple[object, ...],
    start: datetime,
    end: datetime,
    params: Mapping[str, Any],
    rows: int,
    size: int | None,
) -> int:
    """Write the CSV for one export and return its size in bytes (blocking; run in a thread).

    With ``size`` the file is exactly that many bytes: whole rows, then one last row whose
    free-text field is padded with ``x``. A ``size`` smaller than header plus one padded
    row yields the header truncated/padded to ``size`` (not valid CSV; only for tiny sizes).
    """
    rng = rng_for("export", kind, *seed)
    header = _encode(list(COLUMNS[kind]))
    pool = [
        _encode(_fields(kind, rng, start, end, params))
        for _ in range(min(POOL, max(rows, 1)) if size is None else POOL)
    ]
    base_id = 10_000_000 + rng.randint(0, 9_999_999)
    with path.open("wb") as out:
        out.write(header)
        if size is None:
            for first in range(0, rows, 10_000):
                out.write(
                    b"".join(
                        b"%d,%b" % (base_id + i, pool[i % len(pool)])
                        for i in range(first, min(rows, first + 10_000))
                    )
                )
            return out.tell()
        pad_tail = _encode([*_fields(kind, rng, start, end, params)[:-1], ""])[:-2]
        longest = max(len(tail) for tail in pool) + 12
        reserve = 2 * longest + len(pad_tail)
        remaining = size - len(header)
        if remaining < len(pad_tail) + 12:
            out.seek(0)
            out.truncate()
            out.write((header + b"x" * size)[:size])
            return size
        i = 0
        while remaining > reserve + longest:
            batch = min(10_000, (remaining - reserve) // longest)
            chunk = b"".join(b"%d,%b" % (base_id + j, pool[j % POOL]) for j in range(i, i + batch))
            out.write(chunk)
            remaining -= len(chunk)
            i += batch
        last = b"%d,%b" % (base_id + i, pad_tail)
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

    def __init__(self, rows: int, size: int | None) -> None:
        self.rows = rows
        self.size = size
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
        self, owner: str, kind: str, start: datetime, end: datetime, params: Mapping[str, Any]
    ) -> asyncio.Task[ExportFile]:
        seed: tuple[object, ...] = (
            owner,
            start.isoformat(),
            end.isoformat(),
            json.dumps(params, sort_keys=True, default=str),
        )
        content = hashlib.sha256(
            json.dumps([kind, *seed, self.rows, self.size], default=str).encode()
        ).hexdigest()
        task = self._files.get(content)
        if task is None:
            directory = self._dir
            if directory is None:
                raise RuntimeError("the sandbox is not started")
            name = f"{kind}-{start:%Y%m%d}-{end:%Y%m%d}.csv"
            path = directory / f"{content[:32]}.csv"

            async def generate() -> ExportFile:
                size = await asyncio.to_thread(
                    write_export, path, kind, seed, start, end, params, self.rows, self.size
                )
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
    ) -> ExportJob:
        """Register a new job (pending) and begin generating its file."""
        job = ExportJob(
            secrets.token_hex(16),
            owner,
            kind,
            now,
            self._file_for(owner, kind, start, end, params),
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
