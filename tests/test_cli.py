"""The ``lexer-activity`` command line: in-process with click's CliRunner where that is
enough, as subprocesses where a real process matters (SIGKILL mid-backfill, ``sandbox``).

The sandboxes here run on a loop in a background thread (``sandbox_in_thread``), since
the commands run their own event loops.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner, Result
from conftest import TOKEN_A, TOKEN_B

from lexer_activity_async import LexerClient, LimiterRegistry
from lexer_activity_async._version import __version__
from lexer_activity_async.backfill import (
    ALL_REPORTS,
    CHECKPOINT_NAME,
    SERIES_REPORTS,
    BackfillSpec,
    plan,
)
from lexer_activity_async.checkpoint import DONE, PENDING
from lexer_activity_async.cli import DEMO_MARKER, main
from lexer_activity_async.limits_sqlite import STORE_ENV
from lexer_activity_async.models import converter
from lexer_activity_async.reports import ExportKind
from lexer_activity_async.sandbox import Sandbox
from lexer_activity_async.sandbox._exports import COLUMNS

REPO = Path(__file__).resolve().parents[1]
ENV_A, ENV_B = "LEXER_TEST_CLI_A", "LEXER_TEST_CLI_B"
UTC = timezone.utc
NOWHERE = "http://127.0.0.1:9/v1"
"""An API URL nothing listens on, for commands that must fail before sending."""


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in-process; wide columns so tables are not wrapped."""
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200", **(env or {})})


def base_spec(sb: Sandbox | None = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "date_from": "2024-01-01",
        "date_to": "2024-03-01",
        "reports": ["summary", "nps_volume"],
        "nps": {"form": 55},
        "exports": [{"kind": "case_details"}],
        "tokens": [{"label": "a", "env": ENV_A}, {"label": "b", "env": ENV_B}],
        "poll": {"first_delay": 0.05, "cap": 0.2},
    }
    if sb is not None:
        data.update(api_url=sb.api_url, status_url=sb.status_url)
    data.update(extra)
    return data


def table_rows(text: str) -> dict[str, list[str]]:
    """The body rows of rich tables in ``text``, keyed by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def files_of(root: Path) -> dict[str, bytes]:
    """Every output file under ``root`` (not the checkpoint or its WAL files)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(CHECKPOINT_NAME)
    }


def assert_no_tokens(*texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        assert TOKEN_A.encode() not in data
        assert TOKEN_B.encode() not in data


# -- in-process: version, plan, bad input ----------------------------------------------------


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"lexer-activity, version {__version__}"


@pytest.mark.parametrize(
    ("extra", "units", "windows", "requests", "least"),
    [
        # 3 monthly windows x (2 reports + 1 export) = 9 units per token;
        # 3 x 2 reports + 3 x (start + 2 polls) = 15 requests; 4 per 10 s: 3 waits = 30 s.
        (
            {
                "date_to": "2024-04-01",
                "reports": ["summary", "user_volume"],
                "rate_limit": {"max_requests": 4, "window": 10},
            },
            9,
            3,
            (15, 15),
            ("0:00:30", "0:00:30"),
        ),
        # The API's limit, 18 months of every report and three exports (the demo's shape):
        # 18 x 15 = 270 units; 18 x 12 + 54 x 3 = 378 requests, at 90 per 300 s (a backfill
        # leaves the reserve of 10): ceil(378 / 90) - 1 = 4 x 300 s. Joined: the 4 series
        # reports take 2 requests each (12 + 6 months), not 18: 314, ceil(314 / 90) - 1 = 3.
        (
            {
                "date_to": "2025-07-01",
                "reports": "all",
                "exports": [
                    "case_details",
                    "mention_sla_export",
                    {"kind": "nps_submissions", "form": 55},
                ],
            },
            270,
            18,
            (314, 378),
            ("0:15:00", "0:20:00"),
        ),
        # Quarterly windows over 18 months: 6 windows x 2 units = 12 units; 6 + 18 = 24
        # requests; at 100 per 300 s no wait at all.
        (
            {"date_to": "2025-07-01", "window_months": 3, "reports": ["summary"]},
            12,
            6,
            (24, 24),
            ("0:00:00", "0:00:00"),
        ),
    ],
)
def test_dry_run_prints_units_requests_and_least_time(
    tmp_path: Path,
    write_spec: Callable[..., Path],
    extra: dict[str, Any],
    units: int,
    windows: int,
    requests: tuple[int, int],
    least: tuple[str, str],
) -> None:
    """Requests and least time joined, then window by window."""
    spec = write_spec(tmp_path / "spec.toml", base_spec(**extra))
    # Every token source is read (nothing is sent: no server is named).
    result = invoke("backfill", str(spec), "--dry-run", env={ENV_A: TOKEN_A, ENV_B: TOKEN_B})
    assert result.exit_code == 0, result.output
    assert f"Plan: {2 * units} units in {windows} windows" in result.output
    rows = table_rows(result.output)
    expected = [str(units), str(requests[0]), least[0], str(requests[1]), least[1]]
    assert rows["a"] == rows["b"] == expected
    assert not (tmp_path / "lexer-output").exists()


BAD_SPECS = [
    ({"colour": "blue"}, "unknown keys in spec: colour"),
    ({"tokens": []}, "at least one token"),
    ({"tokens": [{"label": "a", "token": TOKEN_A}]}, "never in the spec"),
    ({"tokens": [{"label": "a", "env": "X", "file": "t"}]}, "exactly one of `env` or `file`"),
    ({"date_from": "2024-02-30"}, "is not an ISO 8601 date"),
    ({"date_from": "2024-01-01T00:00:00"}, "has no UTC offset"),
    ({"reports": ["summary", "surnmary"]}, "unknown report 'surnmary'"),
    ({"nps": {}}, "NPS reports need `form`"),
    ({"exports": [{"kind": "nps_submissions"}]}, "export nps_submissions: NPS reports need"),
    ({"poll": {"first": 1}}, "unknown keys in [poll]: first"),
    ({"concurrency": {"per_tokens": 2}}, "unknown keys in [concurrency]: per_tokens"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SPECS, ids=[m for _, m in BAD_SPECS])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_bad_specs_exit_2_with_a_clear_message(
    tmp_path: Path,
    write_spec: Callable[..., Path],
    change: dict[str, Any],
    message: str,
    dry_run: bool,
) -> None:
    spec = write_spec(tmp_path / "spec.toml", base_spec(**change))
    result = invoke("backfill", str(spec), *(["--dry-run"] if dry_run else []))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert str(spec) in result.output
    assert "Traceback" not in result.output
    assert_no_tokens(result.output)


def test_missing_spec_file_exits_2(tmp_path: Path) -> None:
    result = invoke("backfill", str(tmp_path / "nope.toml"))
    assert result.exit_code == 2
    assert "does not exist" in result.output


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["report", "summary", "--from", "2024-02-30", "--to", "2024-03-01"],
            {"LEXER_API_TOKEN": TOKEN_A},
            "'2024-02-30' is not an ISO 8601",
        ),
        (
            ["report", "summary", "--from", "2024-01-01T00:00:00", "--to", "2024-03-01"],
            {"LEXER_API_TOKEN": TOKEN_A},
            "has no UTC offset",
        ),
        (
            ["report", "sumary", "--from", "2024-01-01", "--to", "2024-02-01"],
            {"LEXER_API_TOKEN": TOKEN_A},
            "unknown report type 'sumary'",
        ),
        (
            ["report", "summary", "--from", "2024-03-01", "--to", "2024-01-01"],
            {"LEXER_API_TOKEN": TOKEN_A},
            "must be before --to",
        ),
        (
            ["report", "summary", "--from", "2099-01-01", "--to", "2099-02-01"],
            {"LEXER_API_TOKEN": TOKEN_A},
            "is in the future",
        ),
        (
            ["report", "nps_summary", "--from", "2024-01-01", "--to", "2024-02-01"],
            {"LEXER_API_TOKEN": TOKEN_A},
            "needs --form ID, the id of an NPS form; list the "
            "account's forms with `lexer-activity forms`",
        ),
        (
            [
                "export",
                "nps_submissions",
                "--from",
                "2024-01-01",
                "--to",
                "2024-02-01",
                "-o",
                "x.csv",
            ],
            {"LEXER_API_TOKEN": TOKEN_A},
            "`lexer-activity forms`",
        ),
        (
            ["report", "case_details", "--from", "2024-01-01", "--to", "2024-02-01"],
            {"LEXER_API_TOKEN": TOKEN_A},
            "use `lexer-activity export case_details",
        ),
        (
            ["report", "summary", "--from", "2024-01-01", "--to", "2024-02-01"],
            {"LEXER_API_TOKEN": ""},
            "LEXER_API_TOKEN is empty",
        ),
        (
            ["report", "summary", "--from", "2024-01-01", "--to", "2024-02-01"],
            {"LEXER_API_TOKEN": " \t"},
            "LEXER_API_TOKEN is only whitespace",
        ),
        (
            [
                "report",
                "summary",
                "--from",
                "2024-01-01",
                "--to",
                "2024-02-01",
                "--token-env",
                "LEXER_TEST_CLI_UNSET",
            ],
            {},
            "LEXER_TEST_CLI_UNSET is unset",
        ),
        (
            [
                "report",
                "summary",
                "--from",
                "2024-01-01",
                "--to",
                "2024-02-01",
                "--token-file",
                "/nonexistent/token",
            ],
            {},
            "cannot read /nonexistent/token",
        ),
        (
            ["report", "summary", "--from", "2024-01-01", "--to", "2024-02-01", "--token", TOKEN_A],
            {},
            "No such option",  # click < 8.4 and >= 8.4 word it apart
        ),
        (
            ["export", "cases", "--from", "2024-01-01", "--to", "2024-02-01", "-o", "x.csv"],
            {"LEXER_API_TOKEN": TOKEN_A},
            "'cases' is not one of 'case_details'",
        ),
        (
            ["export", "case_details", "--from", "yesterday", "--to", "2024-02-01", "-o", "x.csv"],
            {"LEXER_API_TOKEN": TOKEN_A},
            "'yesterday' is not an ISO 8601",
        ),
    ],
)
def test_bad_arguments_exit_2(args: list[str], env: dict[str, str], message: str) -> None:
    result = invoke(*args, "--api-url", NOWHERE, env={"LEXER_API_TOKEN": "", **env})
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert_no_tokens(result.output)


# -- in-process against a sandbox: report, export, backfill ---------------------------------


def fetch_report(sb: Sandbox, token: str, name: str, **options: Any) -> Any:
    async def go() -> Any:
        async with LexerClient(
            token, api_url=sb.api_url, status_url=sb.status_url, registry=LimiterRegistry()
        ) as client:
            return converter.unstructure(
                await client.report(
                    name,
                    datetime(2024, 1, 1, tzinfo=UTC),
                    datetime(2024, 2, 1, tzinfo=UTC),
                    **options,
                )
            )

    return json.loads(json.dumps(asyncio.run(go())))


def test_report_prints_json_with_the_token_from_env_or_file(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox]
) -> None:
    sb = sandbox_in_thread()
    window = ["--from", "2024-01-01", "--to", "2024-02-01", "--api-url", sb.api_url]
    result = invoke("report", "summary", *window, env={"LEXER_API_TOKEN": TOKEN_A})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == fetch_report(sb, TOKEN_A, "summary")

    (tmp_path / "b.token").write_text(TOKEN_B + "\n")
    by_file = invoke(
        "report",
        "nps_summary",
        *window,
        "--form",
        "55",
        "--nps-category",
        "promoters",
        "--token-file",
        str(tmp_path / "b.token"),
    )
    assert by_file.exit_code == 0, by_file.output
    expected = fetch_report(sb, TOKEN_B, "nps_summary", form=55, nps_category="promoters")
    assert json.loads(by_file.stdout) == expected
    assert expected != fetch_report(sb, TOKEN_A, "nps_summary", form=55, nps_category="promoters")

    by_env = invoke("report", "user_volume", *window, "--token-env", ENV_B, env={ENV_B: TOKEN_B})
    assert by_env.exit_code == 0, by_env.output
    assert json.loads(by_env.stdout) == fetch_report(sb, TOKEN_B, "user_volume")
    assert_no_tokens(result.output, by_file.output, by_env.output)

    wrong = invoke("report", "summary", *window, env={"LEXER_API_TOKEN": "not-a-valid-token"})
    assert wrong.exit_code == 1
    assert "401" in wrong.output
    assert "not-a-valid-token" not in wrong.output


def test_export_writes_the_csv(tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox]) -> None:
    sb = sandbox_in_thread(export_rows=25)
    dest = tmp_path / "cases.csv"
    result = invoke(
        "export",
        "case_details",
        "--from",
        "2024-01-01",
        "--to",
        "2024-02-01",
        "-o",
        str(dest),
        "--api-url",
        sb.api_url,
        "--status-url",
        sb.status_url,
        env={"LEXER_API_TOKEN": TOKEN_A},
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(dest)
    data = dest.read_bytes()
    assert data.startswith(",".join(COLUMNS["case_details"]).encode() + b"\r\n")
    assert sb.stats.exports_started == 1
    assert "1 file(s)" in result.stderr
    assert not list(tmp_path.glob("*.part"))
    assert_no_tokens(result.output, data)


def test_export_in_parallel_ranges(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox]
) -> None:
    sb = sandbox_in_thread(export_size_bytes=4_500_000)  # over 4 MiB: 4 ranges of 1 MiB+
    dests = [tmp_path / "one.csv", tmp_path / "four.csv"]
    for dest, connections in zip(dests, ("1", "4"), strict=True):
        result = invoke(
            "export", "case_details", "--from", "2024-01-01", "--to", "2024-02-01",
            "-o", str(dest), "--connections", connections,
            "--api-url", sb.api_url, "--status-url", sb.status_url,
            env={"LEXER_API_TOKEN": TOKEN_A},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    assert dests[0].read_bytes() == dests[1].read_bytes()
    assert len(dests[0].read_bytes()) == 4_500_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four.csv", "one.csv"]
    assert sb.stats.file_requests == 1 + 1 + 4  # one stream; a probe and four ranges
    bad = invoke("export", "case_details", "--from", "2024-01-01", "--to", "2024-02-01",
                 "-o", str(tmp_path / "x.csv"), "--connections", "0",
                 env={"LEXER_API_TOKEN": TOKEN_A})  # fmt: skip
    assert bad.exit_code == 2
    assert "--connections" in bad.output
    assert sb.stats.exports_started == 2


def test_backfill_progress_and_summary_in_a_non_tty(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    sb = sandbox_in_thread()
    spec = write_spec(tmp_path / "spec.toml", base_spec(sb, output="out"))
    result = invoke("backfill", str(spec), env={ENV_A: TOKEN_A, ENV_B: TOKEN_B})
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    assert rows["a"][:3] == rows["b"][:3] == ["6", "0", "0"]  # done, skipped, failed
    assert "units_done=12" in result.stdout
    assert "files=12" in result.stdout
    # The progress display drew per-token and overall bars without a terminal.
    assert "all tokens" in result.stderr
    assert "12/12" in result.stderr
    assert "6/6" in result.stderr
    assert "KiB" in result.stderr  # bytes per token
    assert "waited 0s" in result.stderr  # time spent waiting on the rate limit
    assert "eta " in result.stderr
    # Piped output is plain lines that never wrap at 80 columns.
    assert all(len(line) <= 80 for line in result.stderr.splitlines())
    totals = [line for line in result.stdout.splitlines() if "=" in line]
    assert totals
    assert all(len(line) <= 80 for line in totals)
    assert len(files_of(tmp_path / "out")) == 12
    assert_no_tokens(result.output, *files_of(tmp_path / "out").values())

    again = invoke("backfill", str(spec), "--json", env={ENV_A: TOKEN_A, ENV_B: TOKEN_B})
    assert again.exit_code == 0
    *events, summary = [json.loads(line) for line in again.stdout.splitlines()]
    assert summary["event"] == "summary"
    assert (summary["units_skipped"], summary["units_done"], summary["requests"]) == (12, 0, 0)
    assert [e["state"] for e in events] == ["skipped"] * 12


def test_backfill_json_lines(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    sb = sandbox_in_thread(max_requests=4, window=0.25)
    spec = write_spec(
        tmp_path / "spec.toml",
        base_spec(sb, rate_limit={"max_requests": 4, "window": 0.25}, output="out"),
    )
    result = invoke("backfill", str(spec), "--json", env={ENV_A: TOKEN_A, ENV_B: TOKEN_B})
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    *events, summary = records
    kinds = {e["event"] for e in events}
    assert {"UnitStarted", "UnitFinished", "ExportState", "RateLimitWait"} <= kinds
    finished = [e for e in events if e["event"] == "UnitFinished"]
    assert len(finished) == 12
    assert all(e["state"] == "done" and e["bytes"] > 0 for e in finished)
    assert summary["units_done"] == 12
    assert summary["bytes"] == sum(e["bytes"] for e in finished)
    assert summary["rate_limited"] == 0
    assert summary["failed"] == {}
    assert all(e["t"] >= 0 for e in events)
    assert_no_tokens(result.output)


def test_backfill_failure_summary_then_retry_failed(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    sb = sandbox_in_thread(tokens=frozenset({TOKEN_A}))
    spec = write_spec(tmp_path / "spec.toml", base_spec(sb, output="out"))
    env = {ENV_A: TOKEN_A, ENV_B: TOKEN_B}
    failed = invoke("backfill", str(spec), env=env)
    assert failed.exit_code == 1
    rows = table_rows(failed.stdout)
    assert rows["a"][:3] == ["6", "0", "0"]
    assert rows["b"][:3] == ["0", "0", "6"]
    assert "TokenMismatchError: HTTP 401" in rows["b"][3]
    assert "some units failed" in failed.stdout
    assert "--retry-failed" in failed.stdout
    assert_no_tokens(failed.output)
    requests_a = sb.stats.requests[Sandbox.key(TOKEN_A)]

    sb.config.tokens = None  # the cause is fixed
    retried = invoke("backfill", str(spec), "--retry-failed", env=env)
    assert retried.exit_code == 0, retried.output
    rows = table_rows(retried.stdout)
    assert rows["a"][:3] == ["0", "6", "0"]
    assert rows["b"][:3] == ["6", "0", "0"]
    assert sb.stats.requests[Sandbox.key(TOKEN_A)] == requests_a
    the_plan = plan(BackfillSpec.from_toml(spec))
    assert sorted(files_of(tmp_path / "out")) == sorted(
        str(u.path(tmp_path / "out").relative_to(tmp_path / "out")) for u in the_plan.units
    )


# -- demo ---------------------------------------------------------------------------------------


def test_demo_small_run_and_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEXER_DEMO_TOKEN_TEAM_A", "")  # the demo sets it; restored after
    out = tmp_path / "demo"
    out.mkdir()  # an empty directory is fine
    args = ["demo", "--tokens", "1", "--months", "2", "--window", "2", "-o", str(out)]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["event"] == "summary"
    units = 2 * (len(ALL_REPORTS) + len(ExportKind))
    assert summary["units_done"] == summary["files"] == units == 30
    assert summary["units_failed"] == 0
    assert summary["server_429s"] == 0
    assert summary["file_host_leaks"] == 0
    # At least: each aggregate report per window, each series report once (its two
    # windows joined into one fetch), each export a start and a poll; more polls as
    # the jobs take longer.
    aggregates = len(set(ALL_REPORTS) - SERIES_REPORTS)
    least = 2 * aggregates + len(SERIES_REPORTS) + 2 * 2 * len(ExportKind)
    assert summary["requests"] >= least
    files = files_of(out)
    assert summary["bytes"] == sum(len(b) for name, b in files.items() if name != DEMO_MARKER)
    reports = {Path(name).parts[2] for name in files if "/reports/" in name}
    exports = {Path(name).parts[2] for name in files if "/exports/" in name}
    assert reports == set(ALL_REPORTS)
    assert exports == {k.value for k in ExportKind}
    assert len(files) == units + 1  # and the demo marker
    assert (out / CHECKPOINT_NAME).is_file()

    # A second demo replaces its own earlier output; the human summary this time.
    (out / "team-a" / "stale.txt").write_text("from before")
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "units_done=30" in again.stdout
    assert "server_429s=0" in again.stdout
    assert f"output: {out.resolve()}" in again.stdout.replace("\n", "")
    assert not (out / "team-a" / "stale.txt").exists()
    assert len(files_of(out)) == units + 1
    # The same demo team each run: every window holds the same data as the first run's.
    assert files_of(out) == files


def test_demo_refuses_to_delete_a_directory_it_did_not_make(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = invoke("demo", "--tokens", "1", "--months", "1", "-o", str(mine))
    assert result.exit_code == 2
    assert "is not a demo output" in result.output
    assert (mine / "notes.txt").read_text() == "keep me"

    # A real backfill's output has a checkpoint too, and must survive as well.
    real = tmp_path / "backfill-output"
    (real / "care" / "reports" / "summary").mkdir(parents=True)
    (real / "care" / "reports" / "summary" / "2024.json").write_text("{}")
    sqlite3.connect(real / CHECKPOINT_NAME).close()
    result = invoke("demo", "--tokens", "1", "--months", "1", "-o", str(real))
    assert result.exit_code == 2
    assert "is not a demo output" in result.output
    assert (real / "care" / "reports" / "summary" / "2024.json").is_file()


# -- subprocesses: SIGKILL and resume; the sandbox command ------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    # Keep the test's own limit store (STORE_ENV); drop every other LEXER_ variable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEXER_") or k == STORE_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_cli(
    args: list[str],
    env: dict[str, str],
    log: Path,
    kill_when: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> tuple[int, list[dict[str, Any]], str]:
    """Run ``python -m lexer_activity_async ARGS`` (JSON lines on stdout), SIGKILL it as
    soon as ``kill_when(lines so far)`` is true; return its status, lines and stderr."""
    with log.open("w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lexer_activity_async", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            text=True,
        )
        assert proc.stdout is not None
        lines: list[dict[str, Any]] = []
        try:
            for raw in proc.stdout:
                lines.append(json.loads(raw))
                if kill_when is not None and kill_when(lines):
                    proc.send_signal(signal.SIGKILL)
                    break
        finally:
            proc.stdout.close()
            status = proc.wait(timeout=60)
        stderr.seek(0)
        return status, lines, stderr.read()


def kill_after(k: int, in_flight: bool) -> Callable[[list[dict[str, Any]]], bool]:
    """After ``k`` units finished in this run; with ``in_flight``, only once a line follows
    an export job's start (so its report token is in the checkpoint: the runner records
    it right after the event, before anything else can print)."""

    def ready(lines: list[dict[str, Any]]) -> bool:
        done = sum(1 for r in lines if r["event"] == "UnitFinished" and r["state"] == "done")
        started = [
            i
            for i, r in enumerate(lines)
            if r["event"] == "ExportState" and r["status"] == "pending"
        ]
        return done >= k and (not in_flight or (bool(started) and started[0] < len(lines) - 1))

    return ready


def checkpoint_of(output: Path) -> dict[str, tuple[str, str | None]]:
    if not (output / CHECKPOINT_NAME).exists():
        return {}
    with sqlite3.connect(output / CHECKPOINT_NAME) as db:
        rows = db.execute("SELECT unit_id, state, report_token FROM units").fetchall()
    return {unit_id: (state, token) for unit_id, state, token in rows}


def test_sigkill_at_several_points_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    sb = sandbox_in_thread(export_pending_seconds=0.4, export_rows=40, latency=0.005)
    spec_path = write_spec(
        tmp_path / "spec.toml",
        base_spec(
            sb,
            date_to="2024-04-01",
            reports=["summary", "user_volume", "nps_volume"],
            exports=["case_details", {"kind": "nps_submissions", "form": 55}],
            concurrency={"per_token": 2, "total": 3},
        ),
    )
    the_plan = plan(BackfillSpec.from_toml(spec_path))
    export_ids = {u.id for u in the_plan.units if u.is_export}
    assert (len(the_plan.units), len(export_ids)) == (30, 12)
    env = cli_env(**{ENV_A: TOKEN_A, ENV_B: TOKEN_B})
    logs: list[str] = []

    reference = tmp_path / "reference"
    status, lines, err = run_cli(
        ["backfill", str(spec_path), "--json", "-o", str(reference)], env, tmp_path / "ref.log"
    )
    assert status == 0, err
    assert lines[-1]["units_done"] == 30
    logs += [json.dumps(lines), err]
    expected = files_of(reference)
    assert len(expected) == 30

    crashed = tmp_path / "crashed"
    args = ["backfill", str(spec_path), "--json", "-o", str(crashed)]
    for n, (k, in_flight) in enumerate([(1, True), (3, False), (2, True)]):
        before = checkpoint_of(crashed)
        started = sb.stats.exports_started
        status, lines, err = run_cli(args, env, tmp_path / f"kill{n}.log", kill_after(k, in_flight))
        logs += [json.dumps(lines), err]
        assert status == -signal.SIGKILL, f"run {n} ended before its kill point: {err}"
        after = checkpoint_of(crashed)
        # Units already done were skipped, not redone.
        skipped = {r["unit"] for r in lines if r.get("state") == "skipped"}
        assert skipped == {u for u, (s, _) in before.items() if s == DONE}
        # A job recorded before was polled again, never replaced by a new one ...
        for unit_id, (state, token) in before.items():
            if state == PENDING and after[unit_id][0] == PENDING:
                assert after[unit_id][1] == token
        # ... and jobs were started only for export units that had none.
        startable = {u for u in export_ids if before.get(u, (None, None))[1] is None}
        assert sb.stats.exports_started - started <= len(startable - skipped)
        if in_flight:
            assert any(state == PENDING for state, _ in after.values())
        # Whatever is on disk under its final name is complete (atomic writes).
        for name, data in files_of(crashed).items():
            if not name.endswith(".part"):
                assert data == expected[name], name

    before = checkpoint_of(crashed)
    in_flight_jobs = {u: t for u, (s, t) in before.items() if s == PENDING}
    assert in_flight_jobs, "the last kill left no export job in flight"
    assert 0 < sum(1 for s, _ in before.values() if s == DONE) < 30
    started = sb.stats.exports_started
    polls = dict(sb.stats.status_polls)
    status, lines, err = run_cli(args, env, tmp_path / "final.log")
    logs += [json.dumps(lines), err]
    assert status == 0, err
    summary = lines[-1]
    assert summary["units_failed"] == 0
    assert summary["units_skipped"] == sum(1 for s, _ in before.values() if s == DONE)
    assert summary["units_done"] + summary["units_skipped"] == 30
    # Pending jobs were polled again rather than started again.
    never_started = {
        u
        for u in export_ids
        if before.get(u, (None, None))[0] != DONE and before.get(u, (None, None))[1] is None
    }
    assert sb.stats.exports_started - started == len(never_started)
    for token in in_flight_jobs.values():
        assert token is not None
        assert sb.stats.status_polls[token] > polls.get(token, 0)

    assert files_of(crashed) == expected  # byte for byte
    assert not list(crashed.rglob("*.part"))
    assert {s for s, _ in checkpoint_of(crashed).values()} == {DONE}
    for root in (crashed, reference):
        assert_no_tokens(
            *(str(p) for p in root.rglob("*")),
            *(p.read_bytes() for p in root.rglob("*") if p.is_file()),
        )
    assert_no_tokens(*logs)


def free_port_triple() -> int:
    """A port P with P, P + 1 and P + 2 free just now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port + 2 > 65535:
                continue
            try:
                with socket.socket() as second, socket.socket() as third:
                    second.bind(("127.0.0.1", port + 1))
                    third.bind(("127.0.0.1", port + 2))
            except OSError:
                continue
            return port
    raise RuntimeError("no three consecutive free ports")


def http(url: str, token: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    headers = {"Auth-Api-Token": token} if token else {}
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_sandbox_command_serves_on_a_free_port(tmp_path: Path) -> None:
    port = free_port_triple()
    (tmp_path / "tokens").write_text(f"{TOKEN_A}\n\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lexer_activity_async",
            "sandbox",
            "--port",
            str(port),
            "--max-requests",
            "3",
            "--window",
            "60",
            "--tokens-file",
            str(tmp_path / "tokens"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        text=True,
    )
    try:
        assert proc.stdout is not None
        urls = [proc.stdout.readline().split()[-1] for _ in range(3)]
        assert urls == [
            f"http://127.0.0.1:{port}/v1",
            f"http://127.0.0.1:{port + 1}/api/public/v1",
            f"http://127.0.0.1:{port + 2}",
        ]
        api = urls[0]
        status, users = http(api + "/users", TOKEN_A)
        assert status == 200
        assert users[0]["id"] == 12345
        mismatch = {"error": "Unauthorized - api token not matching"}
        assert http(api + "/users", TOKEN_B) == (401, mismatch)
        status, summary = http(
            api + "/activity/reports",
            TOKEN_A,
            {
                "type": "summary",
                "date_from": "2024-01-01T00:00:00+00:00",
                "date_to": "2024-02-01T00:00:00+00:00",
            },
        )
        assert status == 200
        assert "total_volume" in summary
        assert http(api + "/groups", TOKEN_A)[0] == 200
        assert http(api + "/groups", TOKEN_A) == (429, {"error": "Rate limited exceeded"})
    finally:
        proc.terminate()
        status = proc.wait(timeout=10)
    assert status == -signal.SIGTERM
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lexer_activity_async", "--version"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"lexer-activity, version {__version__}"


# -- users, groups, forms; report help; filters; rate-limit countdown ------------------------


def fetch_list(sb: Sandbox, name: str) -> Any:
    async def go() -> Any:
        async with LexerClient(TOKEN_A, api_url=sb.api_url, registry=LimiterRegistry()) as client:
            return converter.unstructure(await getattr(client, name)())

    return json.loads(json.dumps(asyncio.run(go()), default=str))


@pytest.mark.parametrize("name", ["users", "groups", "forms"])
def test_list_commands_print_json_or_a_table(
    name: str, sandbox_in_thread: Callable[..., Sandbox]
) -> None:
    sb = sandbox_in_thread()
    result = invoke(name, "--api-url", sb.api_url, env={"LEXER_API_TOKEN": TOKEN_A})
    assert result.exit_code == 0, result.output
    expected = fetch_list(sb, name)
    assert expected
    assert json.loads(result.stdout) == expected
    table = invoke(name, "--table", "--api-url", sb.api_url, env={"LEXER_API_TOKEN": TOKEN_A})
    assert table.exit_code == 0, table.output
    rows = table_rows(table.stdout)
    assert set(rows) >= {str(item["id"]) for item in expected}
    assert_no_tokens(result.output, table.output)


def test_report_help_lists_the_report_types_and_points_exports_elsewhere() -> None:
    result = invoke("report", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name in ("summary", "states_volume", "states", "case_classifications", "nps_volume"):
        assert name in text
    assert "use `lexer-activity export`" in text
    assert "--filter KEY=VALUE" in text
    assert "--max-requests" in text


class _Recorder:
    """Stands in for `LexerClient`: records how the CLI builds and calls it."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, token: str, **options: Any) -> None:
        self.calls.append(("client", options))

    async def __aenter__(self) -> _Recorder:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def report(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("report", kwargs))
        return {}

    async def export(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(("export", kwargs))
        from lexer_activity_async.exports import ExportResult

        return ExportResult(args[0], (Path(args[3]),), 0, (), 0)


def test_filters_users_groups_and_rate_options_reach_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lexer_activity_async.cli as cli_module

    monkeypatch.setattr(cli_module, "LexerClient", _Recorder)
    _Recorder.calls = []
    args = [
        "--from",
        "2024-01-01",
        "--to",
        "2024-02-01",
        "--users",
        "1,2",
        "--users",
        "5",
        "--groups",
        "3",
        "--filter",
        "channel=twitter",
        "--filter",
        "min_score=5",
        "--filter",
        "tags=[1, 2]",
        "--filter",
        "flag=true",
        "--filter",
        "note=",
        "--max-requests",
        "7",
        "--window",
        "30",
    ]
    result = invoke("report", "summary", *args, env={"LEXER_API_TOKEN": TOKEN_A})
    assert result.exit_code == 0, result.output
    dest = tmp_path / "x.csv"
    exported = invoke(
        "export", "case_details", *args, "-o", str(dest), env={"LEXER_API_TOKEN": TOKEN_A}
    )
    assert exported.exit_code == 0, exported.output
    filters = {
        "users": [1, 2, 5],
        "groups": [3],
        "extra_filters": {
            "channel": "twitter",
            "min_score": 5,
            "tags": [1, 2],
            "flag": True,
            "note": "",
        },
    }
    (_, client), (_, report), (_, client2), (_, export) = _Recorder.calls
    assert client["max_requests"] == client2["max_requests"] == 7
    assert client["window"] == client2["window"] == 30.0
    assert {k: report[k] for k in filters} == filters
    assert {k: export[k] for k in filters} == filters

    _Recorder.calls = []
    plain = invoke("report", "summary", *args[:4], env={"LEXER_API_TOKEN": TOKEN_A})
    assert plain.exit_code == 0, plain.output
    assert {k: _Recorder.calls[1][1][k] for k in filters} == dict.fromkeys(filters)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--filter", "nokey"], "'nokey' is not key=value"),
        (["--filter", "=5"], "'=5' is not key=value"),
        (["--filter", "users=[1]"], "'users' is set by --users, not --filter"),
        (["--filter", "nps_category=all"], "'nps_category' is set by --nps-category"),
        (["--users", "1,x"], "'x' is not an integer id"),
    ],
)
def test_bad_filters_exit_2_before_anything_is_sent(option: list[str], message: str) -> None:
    result = invoke(
        "report",
        "summary",
        "--from",
        "2024-01-01",
        "--to",
        "2024-02-01",
        *option,
        "--api-url",
        NOWHERE,
        env={"LEXER_API_TOKEN": TOKEN_A},
    )
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_report_says_when_a_429_holds_it(sandbox_in_thread: Callable[..., Sandbox]) -> None:
    sb = sandbox_in_thread()
    sb.faults.fail_next(429, retry_after="1")
    result = invoke(
        "report",
        "summary",
        "--from",
        "2024-01-01",
        "--to",
        "2024-02-01",
        "--api-url",
        sb.api_url,
        env={"LEXER_API_TOKEN": TOKEN_A},
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == fetch_report(sb, TOKEN_A, "summary")
    assert result.stderr.splitlines() == ["summary: rate limit (HTTP 429): 1s left"]
