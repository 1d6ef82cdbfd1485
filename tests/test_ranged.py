"""Parallel ranged downloads (`DownloadPolicy(connections=N)`, `ranged`) over real
loopback HTTP against the sandbox's file host: byte-identical files under connections
cut at random points, resumption per range after a killed process and after a
cancellation, a file that changes mid-download, hosts without ranges, the bandwidth cap.

Every file is compared byte for byte with a plain, credential-free GET of its URL."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from conftest import ClientFor, LoopbackServer, SandboxFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lexer_activity_async import ConfigurationError, DownloadError, LexerClient, exports, ranged
from lexer_activity_async import models as m
from lexer_activity_async.events import DownloadProgress
from lexer_activity_async.exports import DownloadPolicy, PollPolicy
from lexer_activity_async.sandbox import Sandbox, SandboxConfig, _server

JAN_2026 = datetime(2026, 1, 1, tzinfo=timezone.utc)
FEB_2026 = datetime(2026, 2, 1, tzinfo=timezone.utc)
POLL = PollPolicy(first_delay=0.02, factor=1.5, cap=0.05, timeout=30.0)
SIZE = 400_000
CHILD = Path(__file__).with_name("ranged_child.py")


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.read()


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name != dest.name)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resume at once after a cut (the backoff's delays are tested in test_retry_policy),
    and record progress every 32 KiB written 8 KiB at a time, so small files have many
    checkpoints."""
    monkeypatch.setattr(ranged, "exponential", lambda *args, **kwargs: 0.0)
    monkeypatch.setattr(ranged, "CHECKPOINT_BYTES", 32 << 10)
    monkeypatch.setattr(ranged, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(ranged, "RANGE_WRITE", 8 << 10)


@attrs.frozen
class Ready:
    sandbox: Sandbox
    client: LexerClient
    job: m.ExportJob
    reference: bytes


@pytest.fixture
async def ready(sandbox_factory: SandboxFactory, client_for: ClientFor) -> AsyncIterator[Ready]:
    """A sandbox serving one finished export of `SIZE` bytes, a client, and the file."""
    sb = await sandbox_factory(export_size_bytes=SIZE)
    async with client_for(sb) as client:
        job = await client.start_export("case_details", JAN_2026, FEB_2026)
        done = await client.wait_for_export(job, poll=POLL)
        assert done.url is not None
        yield Ready(sb, client, done, await fetch(done.url))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    connections=st.integers(min_value=2, max_value=6),
    cuts=st.lists(st.integers(min_value=1, max_value=SIZE // 2), max_size=8),
)
async def test_byte_identical_under_random_cuts(
    ready: Ready, tmp_path_factory: pytest.TempPathFactory, connections: int, cuts: list[int]
) -> None:
    ready.sandbox.faults.reset()
    ready.sandbox.faults.download_cuts = list(cuts)
    dest = tmp_path_factory.mktemp("cuts") / "cases.csv"
    before = ready.sandbox.stats.file_requests
    policy = DownloadPolicy(connections=connections, max_resumes=len(cuts))
    size = await exports.download(ready.client, ready.job, dest, policy=policy)
    assert size == SIZE
    assert dest.read_bytes() == ready.reference
    assert leftovers(dest) == []
    # The probe, then one request per range plus one per cut that fell inside a range.
    assert ready.sandbox.stats.file_requests - before <= 1 + connections + len(cuts)
    assert ready.sandbox.stats.leaks == 0


async def test_ranges_split_the_file_and_each_byte_is_fetched_once(
    ready: Ready, tmp_path: Path
) -> None:
    served, requests = ready.sandbox.stats.bytes_served, ready.sandbox.stats.file_requests
    progress: list[DownloadProgress] = []
    ready.client.channel.on_event = lambda e: (
        progress.append(e) if isinstance(e, DownloadProgress) else None
    )
    dest = tmp_path / "cases.csv"
    await exports.download(ready.client, ready.job, dest, policy=DownloadPolicy(connections=4))
    assert dest.read_bytes() == ready.reference
    assert ready.sandbox.stats.file_requests - requests == 1 + 4
    assert ready.sandbox.stats.bytes_served - served == 1 + SIZE  # the probe's byte, then once
    received = [e.received for e in progress]
    assert received == sorted(received)
    assert received[-1] == SIZE
    assert {e.total for e in progress} == {SIZE}


async def test_a_host_without_ranges_gets_one_stream(ready: Ready, tmp_path: Path) -> None:
    ready.sandbox.faults.ranges = False
    requests = ready.sandbox.stats.file_requests
    dest = tmp_path / "cases.csv"
    await exports.download(ready.client, ready.job, dest, policy=DownloadPolicy(connections=4))
    assert dest.read_bytes() == ready.reference
    assert ready.sandbox.stats.file_requests - requests == 2  # the refused probe, one stream
    assert leftovers(dest) == []


async def test_too_many_cuts_of_one_range_fail_and_keep_the_progress(
    ready: Ready, tmp_path: Path
) -> None:
    ready.sandbox.faults.drop_download_after = 20_000
    ready.sandbox.faults.drop_download_count = 100
    dest = tmp_path / "cases.csv"
    policy = DownloadPolicy(connections=2, max_resumes=1)
    with pytest.raises(DownloadError, match="ranged download failed"):
        await exports.download(ready.client, ready.job, dest, policy=policy)
    assert not dest.exists()
    assert leftovers(dest) == ["cases.csv.part", "cases.csv.part.ranges"]
    record = json.loads((tmp_path / "cases.csv.part.ranges").read_text())
    assert_recorded_bytes_are_right(dest, record, ready.reference)
    ready.sandbox.faults.reset()
    await exports.download(ready.client, ready.job, dest, policy=policy)
    assert dest.read_bytes() == ready.reference
    assert leftovers(dest) == []


def assert_recorded_bytes_are_right(dest: Path, record: dict[str, Any], reference: bytes) -> int:
    """Every byte the record says is done is on disk and right; the bytes done."""
    part = (dest.parent / (dest.name + ".part")).read_bytes()
    assert len(part) == len(reference) == record["size"]
    done = 0
    for start, stop, upto in record["ranges"]:
        assert start <= upto <= stop
        assert part[start:upto] == reference[start:upto]
        done += upto - start
    return done


async def wait_until(condition: Any, timeout: float = 20.0) -> None:
    """Poll ``condition`` (a real condition, not a guessed delay) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def test_resume_after_a_killed_process_fetches_only_what_is_missing(
    sandbox_factory: SandboxFactory, client_for: ClientFor, tmp_path: Path
) -> None:
    # Capped at 400 KB/s a connection, the 1.2 MB file takes the child about a second.
    size = 1_200_000
    sb = await sandbox_factory(export_size_bytes=size, file_bandwidth=400_000)
    async with client_for(sb) as client:
        job = await client.wait_for_export(
            await client.start_export("case_details", JAN_2026, FEB_2026), poll=POLL
        )
        assert job.url is not None
        sb.config.file_bandwidth = None
        reference = await fetch(job.url)
        sb.config.file_bandwidth = 400_000
        dest = tmp_path / "cases.csv"
        sidecar = tmp_path / "cases.csv.part.ranges"

        def progressed() -> bool:
            try:
                record = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                return False
            done: int = sum(upto - start for start, _, upto in record["ranges"])
            return done > 0

        child = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), sb.api_url, job.url, str(dest), "3",
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )  # fmt: skip
        try:
            await wait_until(progressed)
        finally:
            child.kill()
            await child.wait()
        assert child.returncode != 0
        await wait_until(lambda: sb.stats.in_progress == 0)
        assert not dest.exists()
        record = json.loads(sidecar.read_text())
        done = assert_recorded_bytes_are_right(dest, record, reference)
        assert 0 < done < size
        served = sb.stats.bytes_served
        sb.config.file_bandwidth = None
        await exports.download(client, job, dest, policy=DownloadPolicy(connections=3))
    assert dest.read_bytes() == reference
    assert sb.stats.bytes_served - served == 1 + size - done  # only the missing bytes
    assert leftovers(dest) == []


async def test_cancellation_leaves_no_final_file_and_the_rest_resumes(
    sandbox_factory: SandboxFactory, client_for: ClientFor, tmp_path: Path
) -> None:
    sb = await sandbox_factory(export_size_bytes=SIZE, file_bandwidth=200_000)
    dest = tmp_path / "cases.csv"
    task: asyncio.Task[int] | None = None
    seen = 0

    def on_event(event: Any) -> None:
        nonlocal seen
        if isinstance(event, DownloadProgress):
            seen += 1
            if seen == 6:
                assert task is not None
                task.cancel()

    async with client_for(sb, on_event=on_event) as client:
        job = await client.wait_for_export(
            await client.start_export("case_details", JAN_2026, FEB_2026), poll=POLL
        )
        policy = DownloadPolicy(connections=4)
        task = asyncio.ensure_future(client.download_export(job, dest, policy=policy))
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not dest.exists()
        assert leftovers(dest) == ["cases.csv.part", "cases.csv.part.ranges"]
        assert job.url is not None
        sb.config.file_bandwidth = None
        reference = await fetch(job.url)
        record = json.loads((tmp_path / "cases.csv.part.ranges").read_text())
        done = assert_recorded_bytes_are_right(dest, record, reference)
        assert done > 0
        client.channel.on_event = None
        await client.download_export(job, dest, policy=policy)
    assert dest.read_bytes() == reference
    assert leftovers(dest) == []


async def test_a_record_of_another_file_is_ignored(ready: Ready, tmp_path: Path) -> None:
    dest = tmp_path / "cases.csv"
    (tmp_path / "cases.csv.part").write_bytes(b"x" * SIZE)
    stale = {"version": 1, "size": SIZE, "validator": '"other"', "ranges": [[0, SIZE, SIZE]]}
    (tmp_path / "cases.csv.part.ranges").write_text(json.dumps(stale))
    await exports.download(ready.client, ready.job, dest, policy=DownloadPolicy(connections=3))
    assert dest.read_bytes() == ready.reference
    assert leftovers(dest) == []


async def test_a_file_that_changes_mid_download_restarts_whole(
    client_for: ClientFor, sandbox: Sandbox, loopback_server: LoopbackServer, tmp_path: Path
) -> None:
    versions = {'"v1"': bytes(range(256)) * 400, '"v2"': bytes(reversed(range(256))) * 500}
    current = ['"v1"']

    async def handler(request: web.Request) -> web.StreamResponse:
        etag = current[0]
        body = versions[etag]
        wanted = request.headers.get("Range", "")
        if_range = request.headers.get("If-Range")
        if wanted == "bytes=0-0":
            response = web.Response(
                status=206,
                body=body[:1],
                headers={"ETag": etag, "Content-Range": f"bytes 0-0/{len(body)}"},
            )
            current[0] = '"v2"'  # changed just after the first probe
            return response
        if if_range != etag:
            return web.Response(status=200, body=body, headers={"ETag": etag})
        first, last = (int(x) for x in wanted.removeprefix("bytes=").split("-"))
        return web.Response(
            status=206,
            body=body[first : last + 1],
            headers={"ETag": etag, "Content-Range": f"bytes {first}-{last}/{len(body)}"},
        )

    url, seen = await loopback_server(handler)
    job = m.ExportJob("complete", url + "/files/x/cases.csv", "r1")
    dest = tmp_path / "cases.csv"
    async with client_for(sandbox) as client:
        size = await exports.download(client, job, dest, policy=DownloadPolicy(connections=3))
    assert dest.read_bytes() == versions['"v2"']
    assert size == len(versions['"v2"'])
    assert sum(1 for r in seen if r["headers"].get("Range") == "bytes=0-0") == 2
    assert all("Auth-Api-Token" not in r["headers"] for r in seen)
    assert leftovers(dest) == []


@pytest.mark.parametrize("etag", ['W/"weak"', None])
async def test_no_strong_validator_means_one_stream(
    client_for: ClientFor,
    sandbox: Sandbox,
    loopback_server: LoopbackServer,
    tmp_path: Path,
    etag: str | None,
) -> None:
    body = b"id,notes\r\n" + b"1,x\r\n" * 5000

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"ETag": etag} if etag else {}
        if request.headers.get("Range") == "bytes=0-0":
            headers["Content-Range"] = f"bytes 0-0/{len(body)}"
            return web.Response(status=206, body=body[:1], headers=headers)
        return web.Response(status=200, body=body, headers=headers)

    url, seen = await loopback_server(handler)
    dest = tmp_path / "cases.csv"
    async with client_for(sandbox) as client:
        job = m.ExportJob("complete", url + "/files/x/cases.csv", "r1")
        await exports.download(client, job, dest, policy=DownloadPolicy(connections=4))
    assert dest.read_bytes() == body
    assert [r["headers"].get("Range") for r in seen] == ["bytes=0-0", None]


async def test_an_empty_file_refusing_the_probe_is_streamed(
    client_for: ClientFor, sandbox: Sandbox, loopback_server: LoopbackServer, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if "Range" in request.headers:
            return web.Response(status=416, headers={"Content-Range": "bytes */0"})
        return web.Response(status=200, body=b"", headers={"ETag": '"empty"'})

    url, seen = await loopback_server(handler)
    dest = tmp_path / "cases.csv"
    async with client_for(sandbox) as client:
        job = m.ExportJob("complete", url + "/files/x/cases.csv", "r1")
        size = await exports.download(client, job, dest, policy=DownloadPolicy(connections=4))
    assert size == 0
    assert dest.read_bytes() == b""
    assert [r["headers"].get("Range") for r in seen] == ["bytes=0-0", None]
    assert leftovers(dest) == []


@pytest.mark.parametrize("value", [0, 33, -1, True, 2.0, "4", None])
def test_connections_must_be_an_integer_from_1_to_32(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="connections"):
        DownloadPolicy(connections=value)


@pytest.mark.parametrize("value", [0, -5.0, float("nan"), float("inf"), True, "1e6"])
def test_file_bandwidth_must_be_a_positive_number(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="file_bandwidth"):
        SandboxConfig(file_bandwidth=value)


def test_split_covers_the_file_once() -> None:
    for size, parts in [(10, 3), (1, 4), (1000, 7), (7, 7)]:
        spans = ranged.split(size, parts)
        assert spans[0][0] == 0
        assert spans[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert all(start == upto for start, _, upto in spans)


# -- the sandbox's bandwidth cap, in virtual time -------------------------------------------


class VirtualTime:
    """A clock that only a sleep moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("rate", [1_000.0, 100_000.0, 3e6, 1e9])
async def test_the_pacer_holds_a_response_to_its_rate(rate: float) -> None:
    clock = VirtualTime()
    pacer = _server.Pacer(rate, clock, clock.sleep)
    assert 1 <= pacer.piece <= max(1, rate / 20)
    sent = 0
    while sent < SIZE:
        await pacer.wait(sent)
        assert sent / rate - 1e-9 <= clock.now  # never ahead of the rate
        sent += min(pacer.piece, SIZE - sent)
    # The last piece goes out at once: the stream ends within one piece of SIZE / rate.
    assert (SIZE - pacer.piece) / rate - 1e-9 <= clock.now <= SIZE / rate


async def test_the_capped_host_serves_ranges_byte_identical(
    sandbox_factory: SandboxFactory, client_for: ClientFor, tmp_path: Path
) -> None:
    sb = await sandbox_factory(export_size_bytes=SIZE, file_bandwidth=2e6)
    async with client_for(sb) as client:
        job = await client.wait_for_export(
            await client.start_export("case_details", JAN_2026, FEB_2026), poll=POLL
        )
        one, four = tmp_path / "one.csv", tmp_path / "four.csv"
        await client.download_export(job, one)
        await client.download_export(job, four, policy=DownloadPolicy(connections=4))
    assert one.read_bytes() == four.read_bytes()
    assert len(one.read_bytes()) == SIZE
    assert sb.stats.leaks == 0  # no request to the file host carried the token
