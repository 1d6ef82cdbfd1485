"""Observability: OpenTelemetry spans and metrics (the SDK's in-memory exporter and
reader, against the sandbox over loopback; rate-limit waits under virtual time), their
absence at zero cost, ``"auto"``, structured log fields, and the CLI's ``--json`` logs."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import NOW, SANDBOX_DEFAULTS, TOKEN_A
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from otel_memory import Telemetry

from lexer_activity_async import (
    ConfigurationError,
    DownloadError,
    LexerClient,
    LexerTimeoutError,
    LimiterRegistry,
    RetryPolicy,
)
from lexer_activity_async.backfill import BackfillSpec, TokenSource, run_backfill
from lexer_activity_async.cli import main
from lexer_activity_async.exports import DownloadPolicy, PollPolicy
from lexer_activity_async.logs import FIELDS, JsonFormatter
from lexer_activity_async.sandbox import Sandbox
from lexer_activity_async.sync import LexerClient as SyncClient

UTC = timezone.utc
JAN = datetime(2024, 1, 1, tzinfo=UTC)
FEB = datetime(2024, 2, 1, tzinfo=UTC)
MAR = datetime(2024, 3, 1, tzinfo=UTC)
QUICK_RETRY = RetryPolicy(base=0.01, cap=0.02)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def telemetry() -> Telemetry:
    return Telemetry()


def of_call(spans: list[ReadableSpan], report_type: str) -> list[ReadableSpan]:
    found = [s for s in spans if (s.attributes or {}).get("lexer.report_type") == report_type]
    return sorted(found, key=lambda s: int((s.attributes or {})["lexer.attempt"]))  # type: ignore[arg-type]


def events(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


# -- spans and metrics --------------------------------------------------------------------


@pytest.mark.looptime
async def test_a_span_per_attempt_with_waits_retries_and_429s(telemetry: Telemetry) -> None:
    """Three calls of a token allowed 2 requests per 30 s: a plain one, one retried after
    a 500 (whose retry waits for a slot), one retried after a 429 (which holds the token
    5 s). Five attempts: five spans, and metrics that add up."""
    async with (
        Sandbox(**SANDBOX_DEFAULTS) as sb,
        LexerClient(
            TOKEN_A,
            label="svc",
            api_url=sb.api_url,
            status_url=sb.status_url,
            registry=LimiterRegistry(),
            max_requests=2,
            window=30.0,
            retry=QUICK_RETRY,
            now=lambda: NOW,
            instrumentation=telemetry.hooks,
        ) as client,
    ):
        await client.users()
        sb.faults.fail_next(500)
        await client.summary(JAN, FEB)
        sb.faults.fail_next(429, retry_after="5")
        await client.user_summary(JAN, FEB)
        stats = client.stats

    spans = telemetry.spans
    assert len(spans) == 5 == stats.requests
    assert {s.kind for s in spans} == {SpanKind.CLIENT}
    assert all((s.attributes or {})["lexer.token_label"] == "svc" for s in spans)
    [users] = [s for s in spans if (s.attributes or {})["lexer.endpoint"] == "/users"]
    assert users.name == "GET /users"
    assert (users.attributes or {})["http.response.status_code"] == 200

    failed, retried = of_call(spans, "summary")
    assert failed.name == "POST /activity/reports"
    assert [(s.attributes or {})["lexer.attempt"] for s in (failed, retried)] == [1, 2]
    assert (failed.attributes or {})["http.response.status_code"] == 500
    assert failed.status.status_code is StatusCode.ERROR
    [retry] = events(failed, "retry")
    assert retry["lexer.retry.reason"] == "ServerError"
    assert retry["lexer.retry.delay"] > 0
    assert (retried.attributes or {})["http.response.status_code"] == 200
    assert retried.status.status_code is StatusCode.UNSET
    # The third request of the window waited for the first slot to free (about 30 s).
    [wait] = events(retried, "rate_limit_wait")
    assert 25 < wait["lexer.wait.seconds"] <= 30

    limited, after = of_call(spans, "user_summary")
    assert (limited.attributes or {})["http.response.status_code"] == 429
    [retry] = events(limited, "retry")
    assert retry == {"lexer.retry.reason": "RateLimitedError", "lexer.retry.delay": 5.0}
    assert (after.attributes or {})["http.response.status_code"] == 200
    assert events(after, "rate_limit_wait")  # held by the 429's penalty

    # One request id per call, shared by its attempts.
    ids = [(s.attributes or {})["lexer.request_id"] for s in (users, failed, retried, limited)]
    assert ids[1] == ids[2]
    assert len({ids[0], ids[1], ids[3]}) == 3

    assert telemetry.total("lexer.requests") == 5
    assert telemetry.total("lexer.requests", **{"http.response.status_code": 200}) == 3
    assert telemetry.total("lexer.rate_limited") == 1
    assert telemetry.total("lexer.rate_limited", **{"lexer.report_type": "user_summary"}) == 1
    assert telemetry.total("lexer.retries") == 2
    assert telemetry.total("lexer.retries", **{"lexer.retry.reason": "ServerError"}) == 1
    waited = [w["lexer.wait.seconds"] for s in spans for w in events(s, "rate_limit_wait")]
    assert telemetry.total("lexer.rate_limit.wait") == pytest.approx(sum(waited))
    assert telemetry.total("lexer.rate_limit.wait") == pytest.approx(stats.wait_seconds)
    assert not [text for text in telemetry.texts() if TOKEN_A in text]


@pytest.mark.looptime
async def test_a_call_past_its_deadline_ends_its_span_as_an_error(telemetry: Telemetry) -> None:
    async with (
        Sandbox(**SANDBOX_DEFAULTS) as sb,
        LexerClient(
            TOKEN_A,
            api_url=sb.api_url,
            registry=LimiterRegistry(),
            max_requests=1,
            window=30.0,
            instrumentation=telemetry.hooks,
        ) as client,
    ):
        await client.users()
        with pytest.raises(LexerTimeoutError):
            await client.groups(deadline=2.0)  # waits for the only slot: 30 s
    [users, groups] = sorted(telemetry.spans, key=lambda s: s.start_time or 0)
    assert users.status.status_code is StatusCode.UNSET
    assert groups.name == "GET /groups"
    assert groups.end_time is not None
    assert groups.status.status_code is StatusCode.ERROR
    assert (groups.attributes or {})["error.type"] == "LexerTimeoutError"
    assert "http.response.status_code" not in (groups.attributes or {})


async def test_exports_count_their_bytes_and_poll_spans_hide_the_job_token(
    sandbox: Sandbox, tmp_path: Path, telemetry: Telemetry
) -> None:
    poll = PollPolicy(first_delay=0.02, cap=0.05)
    async with LexerClient(
        TOKEN_A,
        api_url=sandbox.api_url,
        status_url=sandbox.status_url,
        registry=LimiterRegistry(),
        now=lambda: NOW,
        instrumentation=telemetry.hooks,
    ) as client:
        result = await client.export("case_details", JAN, FEB, tmp_path / "cases.csv", poll=poll)
    [job] = result.jobs
    assert result.bytes == (tmp_path / "cases.csv").stat().st_size > 0
    assert telemetry.total("lexer.export.bytes", **{"lexer.export_kind": "case_details"}) == (
        result.bytes
    )
    spans = telemetry.spans
    [start] = [s for s in spans if s.name == "POST /activity/reports"]
    assert (start.attributes or {})["lexer.report_type"] == "case_details"
    polls = [s for s in spans if s.name == "GET /activity/reports/status"]
    assert len(polls) == result.polls > 0
    assert {(s.attributes or {})["lexer.origin"] for s in polls} == {"status"}
    [download] = [s for s in spans if s.name == "GET export-file"]
    attributes = download.attributes or {}
    assert (attributes["lexer.origin"], attributes["lexer.report_type"]) == ("file", "case_details")
    assert download.status.status_code is StatusCode.UNSET
    assert download.end_time is not None
    assert job.url is not None
    for secret in (TOKEN_A, job.token, job.url):
        assert not [text for text in telemetry.texts() if secret in text]


async def test_a_failed_download_ends_its_span_as_an_error_and_an_early_stop_does_not(
    sandbox: Sandbox, tmp_path: Path, telemetry: Telemetry
) -> None:
    poll = PollPolicy(first_delay=0.02, cap=0.05)
    sandbox.faults.drop_download_after = 100
    sandbox.faults.drop_download_count = 100
    async with LexerClient(
        TOKEN_A,
        api_url=sandbox.api_url,
        status_url=sandbox.status_url,
        registry=LimiterRegistry(),
        now=lambda: NOW,
        instrumentation=telemetry.hooks,
    ) as client:
        with pytest.raises(DownloadError):
            await client.export(
                "case_details",
                JAN,
                FEB,
                tmp_path / "cases.csv",
                poll=poll,
                policy=DownloadPolicy(max_resumes=1),
            )
        [failed] = [s for s in telemetry.spans if s.name == "GET export-file"]
        assert failed.status.status_code is StatusCode.ERROR
        assert (failed.attributes or {})["error.type"] == "DownloadError"
        # Two connections, each cut after 100 bytes: all 200 bytes that arrived count.
        assert telemetry.total("lexer.export.bytes") == 200

        sandbox.faults.reset()
        rows = client.export_rows("case_details", JAN, FEB, poll=poll)
        async for _ in rows:
            break
        await rows.aclose()  # type: ignore[attr-defined]
    stopped = [s for s in telemetry.spans if s.name == "GET export-file"][1]
    assert stopped.end_time is not None
    assert stopped.status.status_code is StatusCode.UNSET


async def test_backfill_units_are_counted_by_state(
    sandbox: Sandbox, tmp_path: Path, telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEXER_TEST_OBS_TOKEN", TOKEN_A)
    spec = BackfillSpec(
        tokens=(TokenSource("a", env="LEXER_TEST_OBS_TOKEN"),),
        date_from=JAN,
        date_to=MAR,
        output=tmp_path / "out",
        reports=("summary", "user_summary"),
        exports=(),
        api_url=sandbox.api_url,
        status_url=sandbox.status_url,
        max_requests=sandbox.config.max_requests,
        window=sandbox.config.window,
    )
    registry = LimiterRegistry()
    sandbox.faults.fail_next(400)  # one unit of four fails (a 400 is not retried)
    first = await run_backfill(
        spec, registry=registry, instrumentation=telemetry.hooks, now=lambda: NOW
    )
    assert (first.done["a"], len(first.failed["a"])) == (3, 1)
    second = await run_backfill(
        spec, registry=registry, instrumentation=telemetry.hooks, now=lambda: NOW
    )
    assert second.skipped["a"] == 4

    units = Counter[str]()
    for attributes, value in telemetry.points("lexer.backfill.units"):
        assert attributes["lexer.token_label"] == "a"
        assert attributes["lexer.report_type"] in ("summary", "user_summary")
        units[attributes["lexer.state"]] += int(value)
    assert units == {"done": 3, "failed": 1, "skipped": 4}
    assert telemetry.total("lexer.requests", **{"lexer.token_label": "a"}) == first.requests


async def test_spans_are_children_of_the_callers_current_span(
    sandbox: Sandbox, telemetry: Telemetry
) -> None:
    tracer = telemetry.tracers.get_tracer("the-service")
    async with LexerClient(
        TOKEN_A,
        api_url=sandbox.api_url,
        registry=LimiterRegistry(),
        instrumentation=telemetry.hooks,
    ) as client:
        with tracer.start_as_current_span("handle-request") as parent:
            await client.users()
        await client.groups()
    by_name = {s.name: s for s in telemetry.spans}
    users, groups = by_name["GET /users"], by_name["GET /groups"]
    assert users.parent is not None
    assert users.parent.span_id == parent.get_span_context().span_id
    assert users.context is not None
    assert users.context.trace_id == parent.get_span_context().trace_id
    assert groups.parent is None


def test_the_sync_client_reports_to_its_instrumentation(
    sandbox_in_thread: Callable[..., Sandbox],
) -> None:
    sb = sandbox_in_thread()
    telemetry = Telemetry()
    with SyncClient(TOKEN_A, api_url=sb.api_url, instrumentation=telemetry.hooks) as client:
        client.users()
    assert [s.name for s in telemetry.spans] == ["GET /users"]
    assert telemetry.total("lexer.requests", **{"http.response.status_code": 200}) == 1


@pytest.mark.parametrize(
    ("option", "message"),
    [("otel", 'must be "auto", None or hooks'), (object(), "object lacks request, downloaded")],
)
def test_bad_instrumentation_is_refused_before_anything_is_sent(option: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        LexerClient(TOKEN_A, instrumentation=option)


# -- zero cost without it, and "auto" -------------------------------------------------------


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


CALL_THROUGH_A_MOCK = """
import asyncio, sys
from lexer_activity_async import HttpResponse, LexerClient, MockTransport
from lexer_activity_async.backfill import run_backfill
import lexer_activity_async.cli, lexer_activity_async.sync

async def call():
    answer = MockTransport(lambda request: HttpResponse(200, {}, b"[]"))
    async with LexerClient("tok-0123456789abcdef", transport=answer) as client:
        assert await client.users() == []
        return client.channel.instrumentation
"""


def test_without_opentelemetry_nothing_of_it_is_imported_and_auto_finds_it_once_set() -> None:
    """One fresh interpreter: a call without OpenTelemetry imports none of it; with the API
    imported but no provider set, still nothing; once the application sets a tracer
    provider, ``"auto"`` reports to it."""
    out = _python(
        CALL_THROUGH_A_MOCK
        + """
hooks = asyncio.run(call())
print(hooks, sorted(m for m in sys.modules if m.startswith("opentelemetry")),
      "lexer_activity_async.otel" in sys.modules)
from opentelemetry import trace
print(asyncio.run(call()))
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
print(type(asyncio.run(call())).__name__, [s.name for s in exporter.get_finished_spans()])
"""
    )
    assert out.splitlines() == ["None [] False", "None", "OpenTelemetry ['GET /users']"]


# -- structured logs ---------------------------------------------------------------------


def test_every_log_call_of_the_package_passes_the_structured_fields() -> None:
    """Each ``log.<level>(...)`` in the package gives ``extra=`` (from `logs.fields`), so
    no record lacks token_label, request_id and report_type."""
    calls = []
    for path in (ROOT / "lexer_activity_async").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
            ):
                calls.append((path.name, node.lineno, {k.arg for k in node.keywords}))
    assert len(calls) >= 7
    assert [c for c in calls if "extra" not in c[2]] == []


async def test_retry_and_429_records_carry_label_request_id_and_report_type(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lexer_activity_async")
    async with LexerClient(
        TOKEN_A,
        label="svc",
        api_url=sandbox.api_url,
        registry=LimiterRegistry(),
        retry=QUICK_RETRY,
        now=lambda: NOW,
        instrumentation=None,
    ) as client:
        sandbox.faults.fail_next(503)
        sandbox.faults.fail_next(429, retry_after="0.01")
        await client.summary(JAN, FEB)
    retry, limited = (r for r in caplog.records if r.name == "lexer_activity_async")
    assert "retrying" in retry.getMessage()
    assert "429" in limited.getMessage()
    for record in (retry, limited):
        assert [getattr(record, name) for name in FIELDS[::2]] == ["svc", "summary"]
    assert retry.request_id == limited.request_id  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(limited))
    assert {k: line[k] for k in ("level", "token_label", "report_type")} == {
        "level": "warning",
        "token_label": "svc",
        "report_type": "summary",
    }
    assert line["request_id"] == retry.request_id  # type: ignore[attr-defined]
    assert "429" in line["message"]


def test_the_json_formatter_names_an_error_without_its_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed %s", ("it",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "Traceback" not in line
    entry = json.loads(line)
    assert (entry["message"], entry["error"], entry["token_label"]) == (
        "failed it",
        "ValueError",
        None,
    )


# -- the CLI's --json ------------------------------------------------------------------------


def test_cli_json_writes_log_records_as_json_lines(
    sandbox_in_thread: Callable[..., Sandbox],
) -> None:
    sb = sandbox_in_thread()
    sb.faults.fail_next(503)
    sb.faults.fail_next(429, retry_after="0.05")
    logger = logging.getLogger("lexer_activity_async")
    handlers, level = list(logger.handlers), logger.level
    args = ["--json", "report", "summary", "--from", "2024-01-01", "--to", "2024-02-01"]
    result = CliRunner().invoke(
        main,
        [*args, "--api-url", sb.api_url],
        env={"LEXER_API_TOKEN": TOKEN_A, "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert (logger.handlers, logger.level) == (handlers, level)  # undone afterwards
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [line["level"] for line in lines] == ["info", "warning"]
    assert {line["report_type"] for line in lines} == {"summary"}
    assert {line["token_label"] for line in lines} == {f"token-{_key(TOKEN_A)[:8]}"}
    assert len({line["request_id"] for line in lines}) == 1
    assert set(lines[0]) == {"time", "level", "logger", "message", *FIELDS}
    assert TOKEN_A not in result.stderr + result.stdout


def _key(token: str) -> str:
    from lexer_activity_async.limits import token_key

    return token_key(token)
