"""The export pipeline over real loopback HTTP against the sandbox: starting, polling,
downloading without credentials, resuming, refreshing expired URLs, cancellation,
streaming rows, long ranges split into windows, and many exports at once.

Downloaded files are compared byte for byte with a direct, credential-free GET of the
same file URL (the sandbox serves each distinct request's file from disk, so an
uninterrupted download is the reference). Every exact HTTP exchange the sandbox cannot
produce (a lying Content-Length, redirects on the file host, recorded request headers)
comes from a tiny loopback server (``loopback_server`` fixture).
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import logging
import os
import re
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from aioresponses import aioresponses
from conftest import NOW, TOKEN_A, ClientFor, LoopbackServer, MakeClient, SandboxFactory
from yarl import URL

from lexer_activity_async import (
    DownloadError,
    ExportError,
    ExportFailedError,
    ExportTimeoutError,
    LexerClient,
    LexerConnectionError,
    LexerTimeoutError,
    LimiterRegistry,
    RetryPolicy,
    ServerError,
    ValidationError,
    durable,
    exports,
)
from lexer_activity_async import models as m
from lexer_activity_async.events import DownloadProgress, ExportState
from lexer_activity_async.exports import DownloadPolicy, PollPolicy
from lexer_activity_async.reports import ReportType, add_months, split_range
from lexer_activity_async.sandbox import Sandbox, _data
from lexer_activity_async.sandbox._exports import COLUMNS

KEY_A = Sandbox.key(TOKEN_A)
JAN = datetime(2026, 1, 1, tzinfo=timezone.utc)
FEB = datetime(2026, 2, 1, tzinfo=timezone.utc)
AEDT = timezone(timedelta(hours=11))
POLL = PollPolicy(first_delay=0.02, factor=1.5, cap=0.05, timeout=30.0)
MOCK_STATUS = "https://clients.lexer.test/api/public/v1"
STATUS_PATH = "/activity/reports/status"


async def fetch(url: str) -> bytes:
    """The file as a plain, credential-free GET sees it (the uninterrupted reference)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.read()


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


class FakeClock:
    """The sandbox's monotonic clock (rate window and job age), moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- whole exports ------------------------------------------------------------------------

KINDS: list[tuple[str, dict[str, Any]]] = [
    ("case_details", {}),
    ("nps_submissions", {"form": 55, "nps_category": "promoters"}),
    ("mention_sla_export", {}),
]


def world_rows(kind: str, options: dict[str, Any]) -> int:
    """How many rows the export of JAN..FEB has: the matching report's count in the
    sandbox's world (cases closed, submissions received, messages arrived)."""
    report, field = {
        "case_details": (ReportType.CASE_SUMMARY, "total_cases"),
        "nps_submissions": (ReportType.NPS_SUMMARY, "total_received"),
        "mention_sla_export": (ReportType.SUMMARY, "total_volume"),
    }[kind]
    count = _data.build_report(report, KEY_A, JAN, FEB, options, now=NOW)[field]
    assert count > 0
    return int(count)


@pytest.mark.parametrize(("kind", "options"), KINDS, ids=[k for k, _ in KINDS])
async def test_export_each_kind(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path, kind: str, options: dict[str, Any]
) -> None:
    dest = tmp_path / "out" / f"{kind}.csv"  # parent created on demand
    events: list[Any] = []
    async with make_client(on_event=events.append) as client:
        result = await client.export(kind, JAN, FEB, dest, poll=POLL, **options)
        stats = client.stats

    [job] = result.jobs
    assert result.kind == kind
    assert result.paths == (dest,)
    assert job.status == "complete"
    assert job.url is not None
    assert job.url.startswith(sandbox.files_url + "/files/")
    data = dest.read_bytes()
    assert result.bytes == len(data)
    assert not part_of(dest).exists()
    assert data == await fetch(job.url)
    rows = read_rows(dest)
    assert len(rows) == world_rows(kind, options)
    assert tuple(rows[0]) == COLUMNS[kind]
    if kind == "nps_submissions":
        assert {r["form_id"] for r in rows} == {"55"}
        assert {r["category"] for r in rows} == {"promoter"}
        assert {int(r["score"]) for r in rows} <= {9, 10}

    assert sandbox.stats.leaks == 0
    assert sandbox.stats.exports_started == 1
    # Every poll took a limiter slot: the client counted what the server counted.
    assert result.polls == sandbox.stats.status_polls[job.token] >= 1
    assert stats.requests == sandbox.stats.requests[KEY_A] == 1 + result.polls

    states = [e for e in events if isinstance(e, ExportState)]
    assert states[0] == ExportState(client.label, kind, job.token, "pending")
    assert states[-1] == ExportState(client.label, kind, job.token, "complete")
    progress = [e for e in events if isinstance(e, DownloadProgress)]
    assert progress
    assert all(e.kind == kind and e.total == len(data) for e in progress)
    received = [e.received for e in progress]
    assert received == sorted(set(received))
    assert received[-1] == len(data)


async def test_step_functions(
    sandbox_factory: SandboxFactory, client_for: ClientFor, tmp_path: Path
) -> None:
    clock = FakeClock()
    sb = await sandbox_factory(clock=clock, export_pending_seconds=5.0)
    async with client_for(sb) as client:
        job = await client.start_export("case_details", JAN, FEB)
        assert job == m.ExportJob("pending", None, job.token)
        assert re.fullmatch(r"[0-9a-f]{32}", job.token)
        # Not old enough yet: still pending, however often it is asked.
        assert await client.export_status(job.token) == job
        assert await client.export_status(job.token) == job
        with pytest.raises(ValidationError):
            await client.download_export(job, tmp_path / "early.csv")

        clock.now += 10.0
        done = await client.wait_for_export(job, poll=POLL)
        assert done.status == "complete"
        assert done.token == job.token
        assert done.url is not None
        assert done.url.startswith(sb.files_url)
        # A complete job is returned at once, without another poll.
        polls = sb.stats.status_polls[job.token]
        assert await client.wait_for_export(done, poll=POLL) is done
        assert sb.stats.status_polls[job.token] == polls

        size = await client.download_export(done, tmp_path / "cases.csv")
        stats = client.stats

    assert size == (tmp_path / "cases.csv").stat().st_size
    assert (tmp_path / "cases.csv").read_bytes() == await fetch(done.url)
    assert not (tmp_path / "early.csv").exists()
    assert sb.stats.exports_started == 1
    assert polls >= 3
    assert stats.requests == sb.stats.requests[KEY_A] == 1 + polls
    assert sb.stats.leaks == 0


async def test_polls_share_a_strict_limit(
    sandbox_factory: SandboxFactory, client_for: ClientFor, tmp_path: Path
) -> None:
    strict = await sandbox_factory(max_requests=4, window=1.0, export_pending_seconds=0.4)
    async with client_for(strict) as client:
        result = await client.export(
            "case_details",
            JAN,
            FEB,
            tmp_path / "c.csv",
            poll=PollPolicy(first_delay=0.01, factor=1.0, cap=0.01, timeout=30.0),
        )
        stats = client.stats

    assert result.polls >= 4  # more requests than fit in one window
    assert strict.stats.rate_limited == 0
    assert strict.stats.max_in_window(KEY_A, 1.0) <= 4
    assert stats.requests == strict.stats.requests[KEY_A] == 1 + result.polls
    assert stats.waits > 0


async def test_export_start_is_not_retried_after_it_may_have_reached_the_server(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    retry = RetryPolicy(max_retries=3, base=0.01, cap=0.02)
    async with make_client(retry=retry) as client:
        sandbox.faults.fail_next(503, path_contains="/activity/reports")
        with pytest.raises(ServerError):
            await client.start_export("case_details", JAN, FEB)
        sandbox.faults.drop_next(1, path_contains="/activity/reports")
        with pytest.raises(LexerConnectionError):
            await client.start_export("case_details", JAN, FEB)
        assert sandbox.stats.requests == {KEY_A: 2}
        # Status polls are idempotent: a 503 there is retried and the export completes.
        sandbox.faults.fail_next(503, path_contains="/status")
        result = await client.export("case_details", JAN, FEB, tmp_path / "c.csv", poll=POLL)
        stats = client.stats
    assert stats.retries == 1
    assert result.bytes == (tmp_path / "c.csv").stat().st_size
    assert sandbox.stats.exports_started == 1


async def test_invalid_exports_send_nothing(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    dest = tmp_path / "x.csv"
    long_from = datetime(2024, 12, 1, tzinfo=timezone.utc)
    invalid: list[tuple[str, datetime, datetime, dict[str, Any]]] = [
        ("summary", JAN, FEB, {}),  # a report, not an export
        ("case_details", datetime(2026, 1, 1), FEB, {}),
        ("case_details", FEB, JAN, {}),
        ("case_details", NOW + timedelta(hours=1), NOW + timedelta(days=2), {}),
        ("nps_submissions", JAN, FEB, {}),
        ("nps_submissions", long_from, FEB, {}),  # 14 windows, all checked first
        ("nps_submissions", JAN, FEB, {"form": 55, "nps_category": "fans"}),
        ("case_details", JAN, FEB, {"form": 55}),
        ("case_details", long_from, FEB, {"window_months": 13}),
    ]
    async with make_client() as client:
        for kind, start, end, kw in invalid:
            with pytest.raises(ValidationError):
                await client.export(kind, start, end, dest, poll=POLL, **kw)
        rows = client.export_rows("nps_submissions", JAN, FEB)
        with pytest.raises(ValidationError):
            await rows.__anext__()
    assert sandbox.stats.requests == {}
    assert list(tmp_path.iterdir()) == []


# -- job outcomes ------------------------------------------------------------------------


async def test_failed_job(make_client: MakeClient, sandbox: Sandbox, tmp_path: Path) -> None:
    dest = tmp_path / "c.csv"
    sandbox.faults.fail_jobs = 1
    async with make_client() as client:
        with pytest.raises(ExportFailedError) as info:
            await client.export("case_details", JAN, FEB, dest, poll=POLL)
    assert info.value.status == "failed"
    assert info.value.kind == "case_details"
    assert isinstance(info.value, ExportError)
    assert list(tmp_path.iterdir()) == []
    assert sandbox.stats.file_requests == 0


async def test_failed_window_of_a_long_export(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    dest = tmp_path / "c.csv"
    sandbox.faults.fail_jobs = 1
    async with make_client() as client:
        # Raised as itself (like a one-window export), not wrapped in an ExceptionGroup.
        with pytest.raises(ExportFailedError) as info:
            await client.export(
                "case_details",
                datetime(2024, 12, 1, tzinfo=timezone.utc),
                datetime(2026, 6, 1, tzinfo=timezone.utc),
                dest,
                poll=POLL,
                window_months=3,
            )
    assert info.value.status == "failed"
    assert list(tmp_path.iterdir()) == []  # no dest, no window files, no .part


async def test_job_that_never_completes(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    dest = tmp_path / "c.csv"
    sandbox.faults.never_complete = True
    # polls at most 0.05 s apart for 1 s: at least 3 even if each round trip took 0.3 s
    poll = PollPolicy(first_delay=0.02, factor=1.5, cap=0.05, timeout=1.0)
    async with make_client() as client:
        with pytest.raises(ExportTimeoutError) as info:
            await client.export("case_details", JAN, FEB, dest, poll=poll)
    assert isinstance(info.value, LexerTimeoutError)
    assert "'pending'" in str(info.value)
    [polls] = sandbox.stats.status_polls.values()
    assert polls >= 3
    assert list(tmp_path.iterdir()) == []


def _status_url(token: str) -> str:
    return f"{MOCK_STATUS}{STATUS_PATH}?token={token}"


async def test_undocumented_statuses_are_logged_once_each(
    mock_http: aioresponses, registry: LimiterRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lexer_activity_async")
    url = _status_url("r1")
    for status in ["processing", "processing", "PROCESSING", "queued", "queued"]:
        mock_http.get(url, payload={"status": status, "url": None, "token": "r1"})
    mock_http.get(url, payload={"status": "complete", "url": "https://f.example/x", "token": "r1"})
    events: list[Any] = []
    async with LexerClient(
        TOKEN_A, status_url=MOCK_STATUS, registry=registry, on_event=events.append
    ) as client:
        done = await exports.wait_for_export(
            client, m.ExportJob("pending", None, "r1"), kind="case_details", poll=POLL
        )
    assert done == m.ExportJob("complete", "https://f.example/x", "r1")
    warnings = [r.getMessage() for r in caplog.records if "undocumented status" in r.getMessage()]
    assert len(warnings) == 2
    assert "'processing'" in warnings[0]
    assert "'queued'" in warnings[1]
    assert [e.status for e in events if isinstance(e, ExportState)] == [
        "processing",
        "PROCESSING",
        "queued",
        "complete",
    ]
    calls = mock_http.requests[("GET", URL(url))]
    assert len(calls) == 6
    assert all(c.kwargs["headers"]["Auth-Api-Token"] == TOKEN_A for c in calls)


@pytest.mark.parametrize("status", ["error", "expired", "cancelled", "Failed"])
async def test_failure_statuses(
    mock_http: aioresponses, registry: LimiterRegistry, status: str
) -> None:
    mock_http.get(_status_url("r2"), payload={"status": "pending", "url": None, "token": "r2"})
    mock_http.get(_status_url("r2"), payload={"status": status, "url": None, "token": "r2"})
    async with LexerClient(TOKEN_A, status_url=MOCK_STATUS, registry=registry) as client:
        with pytest.raises(ExportFailedError) as info:
            await client.wait_for_export(m.ExportJob("pending", None, "r2"), poll=POLL)
    assert info.value.status == status


# -- the file host: no credentials, no plain http ----------------------------------------


def _lower_keys(headers: dict[str, str]) -> set[str]:
    return {key.lower() for key in headers}


async def test_the_file_request_carries_no_credentials_or_client_headers(
    make_client: MakeClient, sandbox: Sandbox, loopback_server: LoopbackServer, tmp_path: Path
) -> None:
    body = b"a,b\r\n1,2\r\n"

    async def serve(request: web.Request) -> web.StreamResponse:
        response = web.Response(body=body, content_type="text/csv")
        response.set_cookie("sid", "from-the-file-host")
        return response

    url, seen = await loopback_server(serve)
    async with make_client() as client:
        await client.users()  # the API session has been used with the token
        job = m.ExportJob("complete", url + "/files/abc/x.csv", "r")
        assert await client.download_export(job, tmp_path / "1.csv") == len(body)
        assert await client.download_export(job, tmp_path / "2.csv") == len(body)

    assert [s["path_qs"] for s in seen] == ["/files/abc/x.csv"] * 2
    for request in seen:
        keys = _lower_keys(request["headers"])
        assert "auth-api-token" not in keys
        assert "user-agent" not in keys
        assert "cookie" not in keys  # not even the file host's own cookie
        assert not any("lexer-activity-async" in v for v in request["headers"].values())
        assert TOKEN_A not in repr(request)
    assert (tmp_path / "1.csv").read_bytes() == body


async def test_sandbox_exports_never_leak(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    async with make_client() as client:
        for kind, kw in KINDS:
            await client.export(kind, JAN, FEB, tmp_path / f"{kind}.csv", poll=POLL, **kw)
            rows = [r async for r in client.export_rows(kind, JAN, FEB, poll=POLL, **kw)]
            assert len(rows) == world_rows(kind, kw)
    assert sandbox.stats.file_requests == 6
    assert sandbox.stats.leaks == 0
    # The counter works: a request with the token is refused and counted.
    job_url = await _any_file_url(sandbox, make_client)
    async with (
        aiohttp.ClientSession() as session,
        session.get(job_url, headers={"Auth-Api-Token": TOKEN_A}) as response,
    ):
        assert response.status == 403
    assert sandbox.stats.leaks == 1


async def _any_file_url(sandbox: Sandbox, make_client: MakeClient) -> str:
    async with make_client() as client:
        job = await client.start_export("case_details", JAN, FEB)
        done = await client.wait_for_export(job, poll=POLL)
    assert done.url is not None
    return done.url


@pytest.mark.parametrize(
    ("api_url", "file_url", "allowed"),
    [
        ("https://api.lexer.io/v1", "http://files.example/x.csv", False),
        ("https://api.lexer.io/v1", "http://127.0.0.1:8000/x.csv", False),
        ("https://api.lexer.io/v1", "https://files.example/x.csv", True),
        ("https://api.lexer.io/v1", "ftp://files.example/x.csv", False),
        ("https://api.lexer.io/v1", "https:///x.csv", False),
        ("http://127.0.0.1:9000/v1", "http://127.0.0.1:9002/files/x.csv", True),
        ("http://localhost:9000/v1", "http://[::1]:9002/files/x.csv", True),
        ("http://127.0.0.1:9000/v1", "http://files.example/x.csv", False),
        ("http://127.0.0.1:9000/v1", "https://files.example/x.csv", True),
    ],
)
def test_check_file_url(api_url: str, file_url: str, allowed: bool) -> None:
    client = LexerClient(TOKEN_A, api_url=api_url)
    if allowed:
        exports._check_file_url(client, file_url)
    else:
        with pytest.raises(DownloadError):
            exports._check_file_url(client, file_url)


async def test_file_host_redirects_are_followed_by_hand_and_checked(
    make_client: MakeClient, loopback_server: LoopbackServer, tmp_path: Path
) -> None:
    body = b"h\r\n" + b"x\r\n" * 100

    async def final(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="text/csv")

    target, target_seen = await loopback_server(final)

    async def hop(request: web.Request) -> web.StreamResponse:
        where = {
            "/ok": target + "/real.csv",
            "/insecure": "http://files.example/real.csv",
            "/loop": "/loop",
        }[request.path]
        return web.Response(status=302, headers={"Location": where})

    origin, origin_seen = await loopback_server(hop)
    async with make_client() as client:
        ok = m.ExportJob("complete", origin + "/ok", "r")
        assert await client.download_export(ok, tmp_path / "ok.csv") == len(body)
        for path, message in [("/insecure", "only https"), ("/loop", "too many redirects")]:
            job = m.ExportJob("complete", origin + path, "r")
            with pytest.raises(DownloadError, match=message):
                await client.download_export(job, tmp_path / "bad.csv")

    assert (tmp_path / "ok.csv").read_bytes() == body
    assert not (tmp_path / "bad.csv").exists()
    assert not part_of(tmp_path / "bad.csv").exists()
    assert [s["path_qs"] for s in target_seen] == ["/real.csv"]
    for request in origin_seen + target_seen:
        assert "auth-api-token" not in _lower_keys(request["headers"])
    assert sum(s["path_qs"] == "/loop" for s in origin_seen) == 10


# -- streaming -----------------------------------------------------------------------------


async def test_part_file_then_rename(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    dest = tmp_path / "c.csv"
    observed: list[tuple[bool, bool]] = []

    def on_event(event: Any) -> None:
        if isinstance(event, DownloadProgress):
            observed.append((part_of(dest).exists(), dest.exists()))

    async with make_client(on_event=on_event) as client:
        await client.export(
            "case_details", JAN, FEB, dest, poll=POLL, policy=DownloadPolicy(chunk_size=4096)
        )
    assert len(observed) > 10
    assert set(observed) == {(True, False)}
    assert dest.exists()
    assert not part_of(dest).exists()


async def test_an_existing_dest_is_replaced_only_on_success(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    dest = tmp_path / "c.csv"
    dest.write_bytes(b"old contents")
    sandbox.faults.expire_urls = 10
    async with make_client() as client:
        with pytest.raises(DownloadError):
            await client.export(
                "case_details",
                JAN,
                FEB,
                dest,
                poll=POLL,
                policy=DownloadPolicy(max_url_refreshes=0),
            )
        assert dest.read_bytes() == b"old contents"
        sandbox.faults.expire_urls = 0
        result = await client.export("case_details", JAN, FEB, dest, poll=POLL)
    assert dest.stat().st_size == result.bytes
    assert dest.read_bytes() != b"old contents"


@pytest.mark.parametrize("chunk_size", [1000, 4096])
async def test_chunk_size_is_configurable(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path, chunk_size: int
) -> None:
    sizes: dict[str, list[int]] = {}
    for name, policy in [("small", DownloadPolicy(chunk_size=chunk_size)), ("default", None)]:
        progress: list[int] = []

        def on_event(event: Any, progress: list[int] = progress) -> None:
            if isinstance(event, DownloadProgress):
                progress.append(event.received)

        async with make_client(on_event=on_event) as client:
            result = await client.export(
                "case_details", JAN, FEB, tmp_path / f"{name}.csv", poll=POLL, policy=policy
            )
        steps = [b - a for a, b in zip([0, *progress], progress, strict=False)]
        sizes[name] = steps
        assert sum(steps) == result.bytes

    total = sum(sizes["small"])
    assert max(sizes["small"]) <= chunk_size
    assert len(sizes["small"]) >= -(-total // chunk_size)
    assert max(sizes["default"]) > chunk_size
    assert (tmp_path / "small.csv").read_bytes() == (tmp_path / "default.csv").read_bytes()


async def test_content_length_is_verified(
    make_client: MakeClient, loopback_server: LoopbackServer, tmp_path: Path
) -> None:
    body = b"a,b\r\n" + b"1,2\r\n" * 200

    async def short(request: web.Request) -> web.StreamResponse:
        # Promises 100 bytes more than it sends, then hangs up.
        response = web.StreamResponse(status=200)
        response.content_length = len(body) + 100
        await response.prepare(request)
        await response.write(body)
        assert request.transport is not None
        request.transport.close()
        raise asyncio.CancelledError

    url, seen = await loopback_server(short)
    dest = tmp_path / "c.csv"
    progress: list[DownloadProgress] = []
    async with make_client(on_event=lambda e: progress.append(e)) as client:
        job = m.ExportJob("complete", url + "/f.csv", "r")
        with pytest.raises(DownloadError):
            await client.download_export(job, dest, policy=DownloadPolicy(max_resumes=1))
    assert len(seen) == 2  # the first try and one resumption
    assert seen[1]["headers"]["Range"] == f"bytes={len(body)}-"
    assert {e.total for e in progress} == {len(body) + 100}
    assert not dest.exists()
    assert not part_of(dest).exists()


# -- resuming and refreshing --------------------------------------------------------------


async def _current_url(client: LexerClient, token: str) -> str:
    job = await client.export_status(token)
    assert job.url is not None
    return job.url


@pytest.mark.parametrize(("ranges", "cuts"), [(True, 1), (True, 2), (False, 1)])
async def test_dropped_download_resumes_byte_identical(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path, ranges: bool, cuts: int
) -> None:
    sandbox.faults.ranges = ranges
    sandbox.faults.drop_download_after = 5000
    sandbox.faults.drop_download_count = cuts
    dest = tmp_path / "c.csv"
    progress: list[int] = []

    def on_event(event: Any) -> None:
        if isinstance(event, DownloadProgress):
            progress.append(event.received)

    async with make_client(on_event=on_event) as client:
        result = await client.export("case_details", JAN, FEB, dest, poll=POLL)
    served = sandbox.stats.bytes_served
    size = result.bytes
    assert sandbox.stats.file_requests == cuts + 1
    assert sandbox.stats.errors_injected == cuts
    if ranges:
        assert served == size  # each resumption asked only for the rest (Range)
    else:
        assert served == 5000 + size  # the host ignored Range: re-read from the start
    assert progress == sorted(set(progress))  # no byte counted twice
    assert progress[-1] == size
    assert dest.read_bytes() == await fetch(result.jobs[0].url or "")
    assert sandbox.stats.leaks == 0


async def test_too_many_drops(make_client: MakeClient, sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.faults.drop_download_after = 3000
    sandbox.faults.drop_download_count = 10
    dest = tmp_path / "c.csv"
    async with make_client() as client:
        with pytest.raises(DownloadError):
            await client.export(
                "case_details", JAN, FEB, dest, poll=POLL, policy=DownloadPolicy(max_resumes=1)
            )
    assert sandbox.stats.file_requests == 2
    assert list(tmp_path.iterdir()) == []


async def test_expired_url_is_refreshed_through_a_status_poll(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.faults.expire_urls = 1
    dest = tmp_path / "c.csv"
    async with make_client() as client:
        result = await client.export("case_details", JAN, FEB, dest, poll=POLL)
        [job] = result.jobs
        polls = sandbox.stats.status_polls[job.token]
        fresh = await _current_url(client, job.token)
    assert polls == result.polls + 1  # one extra poll fetched the fresh URL
    assert sandbox.stats.file_requests == 2
    assert fresh != job.url
    assert dest.read_bytes() == await fetch(fresh)
    assert sandbox.stats.leaks == 0


async def test_more_expiries_than_refreshes(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.faults.expire_urls = 10
    dest = tmp_path / "c.csv"
    async with make_client() as client:
        with pytest.raises(DownloadError, match="expired"):
            await client.export(
                "case_details",
                JAN,
                FEB,
                dest,
                poll=POLL,
                policy=DownloadPolicy(max_url_refreshes=2),
            )
    [polls] = sandbox.stats.status_polls.values()
    assert sandbox.stats.file_requests == 3
    assert polls >= 3  # at least one to complete, then one per refresh
    assert list(tmp_path.iterdir()) == []


async def test_cancellation_mid_download_leaves_nothing(
    sandbox_factory: SandboxFactory, client_for: ClientFor, tmp_path: Path
) -> None:
    big = await sandbox_factory(export_size_bytes=8_000_000)
    dest = tmp_path / "big.csv"
    progress: list[DownloadProgress] = []
    task: asyncio.Task[Any] | None = None

    def on_event(event: Any) -> None:
        if isinstance(event, DownloadProgress):
            progress.append(event)
            if len(progress) == 3:
                assert task is not None
                task.cancel()  # delivered at the download's next await

    async with client_for(big, on_event=on_event) as client:
        task = asyncio.ensure_future(
            client.export(
                "case_details", JAN, FEB, dest, poll=POLL, policy=DownloadPolicy(chunk_size=65536)
            )
        )
        with pytest.raises(asyncio.CancelledError):
            await task
        # Chunks already buffered may still arrive before the next real suspension.
        assert len(progress) >= 3
        assert progress[-1].total is not None
        assert progress[-1].received < progress[-1].total
        # The client is still usable after the cancelled download.
        assert len(await client.users()) == 4
    assert list(tmp_path.iterdir()) == []


class _BlockingFile:
    """A real file whose writes block (as on a slow, saturated disk) until released."""

    def __init__(
        self,
        path: Any,
        mode: str,
        entered: threading.Event,
        release: threading.Event,
        outcomes: list[bool],
    ) -> None:
        self._file = open(path, mode)  # noqa: SIM115 - closed through close()
        self._entered, self._release, self._outcomes = entered, release, outcomes

    def _block(self) -> None:
        self._entered.set()
        self._outcomes.append(self._release.wait(timeout=5))

    def write(self, data: bytes) -> int:
        self._block()
        return self._file.write(data)

    def writelines(self, lines: list[bytes]) -> None:
        self._block()
        self._file.writelines(lines)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


async def test_a_blocked_disk_write_does_not_stall_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """While a chunk's write is stuck in the kernel, the loop runs other tasks: here the
    test itself, which releases the write. Were the write on the loop, the release could
    not happen until the write gave up waiting (5 s), and it would report False."""
    outcomes: list[bool]
    entered, release, outcomes = threading.Event(), threading.Event(), []
    monkeypatch.setattr(
        durable,
        "open",
        lambda path, mode: _BlockingFile(path, mode, entered, release, outcomes),
        raising=False,
    )

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * (durable.WRITE_BATCH // 2 + 1)

    dest = tmp_path / "out.csv"
    async with anyio.create_task_group() as group:
        group.start_soon(durable.write_atomically, dest, chunks())
        await anyio.to_thread.run_sync(entered.wait)
        release.set()
    assert outcomes
    assert all(outcomes)
    assert dest.stat().st_size == 3 * (durable.WRITE_BATCH // 2 + 1)
    assert os.listdir(tmp_path) == [dest.name]


# -- rows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "options"), KINDS, ids=[k for k, _ in KINDS])
async def test_export_rows_equal_dictreader_over_the_file(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path, kind: str, options: dict[str, Any]
) -> None:
    dest = tmp_path / "c.csv"
    async with make_client() as client:
        rows = [
            row
            async for row in client.export_rows(
                kind, JAN, FEB, poll=POLL, policy=DownloadPolicy(chunk_size=777), **options
            )
        ]
        await client.export(kind, JAN, FEB, dest, poll=POLL, **options)
    expected = read_rows(dest)
    assert rows == expected
    assert len(rows) == world_rows(kind, options)
    free_text = [r[COLUMNS[kind][-1]] for r in rows]
    assert any("\n" in t for t in free_text)
    assert any("\r\n" in t for t in free_text)
    assert any('"' in t and "," in t for t in free_text)
    assert any("日本語" in t for t in free_text)
    assert any(ord(ch) > 0xFFFF for t in free_text for ch in t)  # 4-byte UTF-8 (emoji)
    assert sandbox.stats.leaks == 0


@pytest.mark.parametrize("ranges", [True, False])
async def test_export_rows_survive_a_dropped_connection(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path, ranges: bool
) -> None:
    sandbox.faults.ranges = ranges
    sandbox.faults.drop_download_after = 7001
    dest = tmp_path / "c.csv"
    async with make_client() as client:
        rows = [
            r
            async for r in client.export_rows(
                "mention_sla_export", JAN, FEB, poll=POLL, policy=DownloadPolicy(chunk_size=500)
            )
        ]
        await client.export("mention_sla_export", JAN, FEB, dest, poll=POLL)
    assert sandbox.stats.errors_injected == 1
    assert rows == read_rows(dest)


TRICKY = (
    "id,text,name\r\n"
    '1,"a, b","x ""y"" z"\r\n'
    '2,"line1\nline2\r\nline3",café 😀\r\n'
    '3,,"日本語"\r\n'
    '4,"ends with quote ""","Renée O\'Brien"\r\n'
    '5,"",\r\n'
    '6,"\r\n",""""\n'
    "7,plain,no newline at the end"
).encode()


async def _records(chunks: list[bytes]) -> list[list[str]]:
    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [record async for record in exports.iter_csv_records(stream())]


def _reference(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))


@pytest.mark.parametrize(
    "data",
    [TRICKY, b"\xef\xbb\xbf" + TRICKY, TRICKY + b"\r\n"],
    ids=["tricky", "with-bom", "final-newline"],
)
async def test_iter_csv_records_at_every_split(data: bytes) -> None:
    expected = _reference(data)
    assert len(expected) == 8
    assert await _records([data]) == expected
    assert await _records([data[i : i + 1] for i in range(len(data))]) == expected
    for i in range(len(data) + 1):
        assert await _records([data[:i], data[i:]]) == expected, i


async def test_iter_csv_records_at_every_pair_of_splits() -> None:
    data = TRICKY
    expected = _reference(data)
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            got = await _records([data[:i], data[i:j], data[j:]])
            assert got == expected, (i, j)


def test_tricky_csv_really_is_tricky() -> None:
    # Splits inside a multibyte character, inside quotes and between \r and \n exist.
    assert "😀".encode() in TRICKY
    assert len("😀".encode()) == 4
    assert b'"line1\nline2\r\nline3"' in TRICKY
    assert TRICKY.count(b"\r\n") >= 6


@pytest.mark.parametrize(
    "data",
    [
        b'1,ab"c,d\n2,"x\ny",z\n3,q\n',  # a stray quote inside an unquoted field
        b'1,"ab"cd,e\n2,"f\ng"\n',  # text after a closing quote
        b'1,"a""b\nc",d\n',
        b'1, "a\nb",c\n',  # a quote after a space is literal
    ],
)
async def test_iter_csv_records_matches_csv_on_lenient_input(data: bytes) -> None:
    expected = _reference(data)
    assert await _records([data]) == expected
    for i in range(len(data) + 1):
        assert await _records([data[:i], data[i:]]) == expected, i


# -- long ranges --------------------------------------------------------------------------

LONG_FROM = datetime(2024, 12, 1, tzinfo=AEDT)
LONG_TO = datetime(2026, 6, 1, tzinfo=AEDT)  # 18 months


def _url_name(lo: datetime, hi: datetime) -> str:
    return f"case_details-{lo:%Y%m%d}-{hi:%Y%m%d}.csv"


def test_split_range_is_half_open_and_gap_free() -> None:
    for months, count in [(1, 18), (3, 6), (12, 2)]:
        windows = split_range(LONG_FROM, LONG_TO, months=months)
        assert len(windows) == count
        assert windows[0][0] == LONG_FROM
        assert windows[-1][1] == LONG_TO
        for (_, hi), (lo, _) in itertools.pairwise(windows):
            assert hi == lo
        for i, (lo, _) in enumerate(windows):
            assert lo == add_months(LONG_FROM, months * i)


async def test_long_export_merged_with_default_monthly_windows(
    sandbox_factory: SandboxFactory, client_for: ClientFor, tmp_path: Path
) -> None:
    sb = await sandbox_factory(export_rows=20)
    dest = tmp_path / "cases.csv"
    async with client_for(sb) as client:
        result = await client.export("case_details", LONG_FROM, LONG_TO, dest, poll=POLL)
        stats = client.stats

    windows = split_range(LONG_FROM, LONG_TO, months=1)
    assert len(result.jobs) == len(windows) == 18
    assert sb.stats.exports_started == 18
    names = [URL(job.url or "").name for job in result.jobs]
    assert names == [_url_name(lo, hi) for lo, hi in windows]
    assert result.paths == (dest,)
    assert list(tmp_path.iterdir()) == [dest]  # window files removed after the merge

    parts = [await fetch(job.url or "") for job in result.jobs]
    header = parts[0].split(b"\r\n", 1)[0] + b"\r\n"
    assert all(p.startswith(header) for p in parts)
    assert dest.read_bytes() == parts[0] + b"".join(p[len(header) :] for p in parts[1:])
    assert dest.read_bytes().count(header) == 1
    assert len(read_rows(dest)) == 18 * 20
    assert result.bytes == dest.stat().st_size
    assert stats.requests == sb.stats.requests[KEY_A] == 18 + result.polls
    assert sb.stats.leaks == 0


@pytest.mark.parametrize("merge", [False, True])
async def test_long_export_in_three_month_windows(
    sandbox_factory: SandboxFactory, client_for: ClientFor, tmp_path: Path, merge: bool
) -> None:
    sb = await sandbox_factory(export_rows=20)
    dest = tmp_path / "out" / "cases.csv"
    async with client_for(sb) as client:
        result = await client.export(
            "case_details", LONG_FROM, LONG_TO, dest, poll=POLL, window_months=3, merge=merge
        )
        # The same windows exported one by one give the same bytes: the server received
        # exactly these ranges, to the second.
        direct = []
        for lo, hi in split_range(LONG_FROM, LONG_TO, months=3):
            job = await client.wait_for_export(
                await client.start_export("case_details", lo, hi), poll=POLL
            )
            direct.append(await fetch(job.url or ""))

    windows = split_range(LONG_FROM, LONG_TO, months=3)
    assert len(windows) == len(result.jobs) == 6
    assert [URL(j.url or "").name for j in result.jobs] == [_url_name(*w) for w in windows]
    if merge:
        assert result.paths == (dest,)
        assert sorted(p.name for p in dest.parent.iterdir()) == ["cases.csv"]
        rows = read_rows(dest)
        assert len(rows) == 6 * 20
        assert rows == [
            r for data in direct for r in csv.DictReader(io.StringIO(data.decode(), newline=""))
        ]
    else:
        expected_paths = tuple(exports.window_path(dest, lo, hi) for lo, hi in windows)
        assert result.paths == expected_paths
        assert expected_paths[0].name == (
            "cases.2024-12-01T00-00-00+11-00_2025-03-01T00-00-00+11-00.csv"
        )
        assert not dest.exists()
        assert sorted(dest.parent.iterdir()) == sorted(expected_paths)
        assert [p.read_bytes() for p in expected_paths] == direct
        assert result.bytes == sum(len(d) for d in direct)


async def test_exactly_twelve_months_is_one_job(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    start = datetime(2025, 6, 1, tzinfo=timezone.utc)
    async with make_client() as client:
        result = await client.export(
            "case_details", start, add_months(start, 12), tmp_path / "y.csv", poll=POLL
        )
        longer = await client.export(
            "case_details",
            start,
            add_months(start, 12) + timedelta(seconds=1),
            tmp_path / "z.csv",
            poll=POLL,
        )
    assert len(result.jobs) == 1
    # One second more: split into monthly windows, the last one a second long.
    assert len(longer.jobs) == 13
    assert URL(longer.jobs[-1].url or "").name == "case_details-20260601-20260601.csv"


# -- many exports at once ------------------------------------------------------------------


async def test_fifty_exports_across_ten_tokens(
    sandbox_factory: SandboxFactory, registry: LimiterRegistry, tmp_path: Path
) -> None:
    sb = await sandbox_factory(tokens=None, export_rows=100)
    tokens = [f"load-token-{i:02d}-abcdef" for i in range(10)]
    months = [(add_months(JAN, -i), add_months(JAN, 1 - i)) for i in range(5)]
    results: dict[tuple[int, int], exports.ExportResult] = {}
    clients = [
        LexerClient(
            token,
            api_url=sb.api_url,
            status_url=sb.status_url,
            registry=registry,
            now=lambda: NOW,
        )
        for token in tokens
    ]

    async def one(c: int, i: int) -> None:
        lo, hi = months[i]
        dest = tmp_path / f"t{c}" / f"m{i}.csv"
        results[c, i] = await clients[c].export("case_details", lo, hi, dest, poll=POLL)

    for client in clients:
        await client.open()
    try:
        async with anyio.create_task_group() as group:
            for c in range(10):
                for i in range(5):
                    group.start_soon(one, c, i)
        stats = [client.stats for client in clients]
    finally:
        for client in clients:
            await client.aclose()

    assert len(results) == 50
    contents = set()
    for (c, i), result in results.items():
        dest = tmp_path / f"t{c}" / f"m{i}.csv"
        data = dest.read_bytes()
        assert data == await fetch(result.jobs[0].url or "")
        assert len(read_rows(dest)) == 100
        contents.add(data)
    assert len(contents) == 50  # every token and month has its own file
    assert sb.stats.leaks == 0
    assert sb.stats.exports_started == 50
    for token, stat in zip(tokens, stats, strict=True):
        assert stat.requests == sb.stats.requests[Sandbox.key(token)]
    assert list(tmp_path.rglob("*.part")) == []
