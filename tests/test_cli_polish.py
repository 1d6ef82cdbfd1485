"""What a new user of ``lexer-activity`` ran into: options checked before anything is
touched, a closed stdout pipe, ``--debug`` keeping the exit status, token sources, quiet
JSON runs, NaN filters and error messages that name the options typed."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import TOKEN_A, TOKEN_B

from lexer_activity_async.cli import DEMO_MARKER, main
from lexer_activity_async.limits_sqlite import STORE_ENV
from lexer_activity_async.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
ENV_A, ENV_B = "LEXER_TEST_POLISH_A", "LEXER_TEST_POLISH_B"
NOWHERE = "http://127.0.0.1:9/v1"
"""An API URL nothing listens on, for commands that must fail before sending."""
WINDOW = ["--from", "2024-01-01", "--to", "2024-02-01"]


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200", **(env or {})})


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def cli_env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("LEXER_") or k == STORE_ENV}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH")]))
    out.update(extra)
    return out


def spec_for(sb: Sandbox, out: Path) -> dict[str, object]:
    return {
        "date_from": "2024-01-01",
        "date_to": "2024-03-01",
        "reports": ["summary", "nps_volume"],
        "nps": {"form": 55},
        "exports": [{"kind": "case_details"}],
        "tokens": [{"label": "a", "env": ENV_A}, {"label": "b", "env": ENV_B}],
        "poll": {"first_delay": 0.05, "cap": 0.2},
        "api_url": sb.api_url,
        "status_url": sb.status_url,
        "output": str(out),
    }


# -- 1: every option is checked before an earlier demo output is deleted ---------------------


@pytest.mark.parametrize("window", ["0", "-1"])
def test_demo_with_a_bad_window_names_it_and_keeps_the_earlier_output(
    tmp_path: Path, window: str
) -> None:
    earlier = tmp_path / "d2"
    earlier.mkdir()
    (earlier / DEMO_MARKER).write_text("demo\n")
    (earlier / "kept.csv").write_text("a,b\n")
    result = invoke("demo", "--window", window, "-o", str(earlier))
    assert result.exit_code == 2, result.output
    assert "'--window'" in result.output
    assert "rate_limit" not in result.output
    no_traceback(result)
    assert sorted(p.name for p in earlier.iterdir()) == sorted([DEMO_MARKER, "kept.csv"])


# -- 2: a closed stdout pipe ends quietly --------------------------------------------------


def run_into_a_closed_pipe(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI with stdout a pipe whose reader has already gone (as after ``| head``
    stops reading): its first write fails with EPIPE, deterministically."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [sys.executable, "-m", "lexer_activity_async", *args],
            stdout=writer,
            stderr=subprocess.PIPE,
            env=cli_env(**env),
            timeout=120,
            check=False,
        )
    finally:
        os.close(writer)


def test_backfill_json_into_a_closed_pipe_ends_quietly(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    sb = sandbox_in_thread()
    spec = write_spec(tmp_path / "spec.toml", spec_for(sb, tmp_path / "out"))
    done = run_into_a_closed_pipe(
        "backfill", str(spec), "--json", **{ENV_A: TOKEN_A, ENV_B: TOKEN_B}
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""


def test_users_into_a_closed_pipe_ends_quietly(
    sandbox_in_thread: Callable[..., Sandbox],
) -> None:
    sb = sandbox_in_thread()
    done = run_into_a_closed_pipe("users", "--api-url", sb.api_url, LEXER_API_TOKEN=TOKEN_A)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""


def test_backfill_json_writes_nothing_to_stderr_even_when_rate_limited(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    sb = sandbox_in_thread()
    sb.faults.fail_next(429, retry_after="1")
    spec = write_spec(tmp_path / "spec.toml", spec_for(sb, tmp_path / "out"))
    done = subprocess.run(
        [sys.executable, "-m", "lexer_activity_async", "backfill", str(spec), "--json"],
        capture_output=True,
        text=True,
        env=cli_env(**{ENV_A: TOKEN_A, ENV_B: TOKEN_B}),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert '"RateLimited"' in done.stdout  # the 429 is in the JSON lines...
    assert done.stderr == ""  # ...and not repeated as a log line


# -- 3: --debug adds the traceback and keeps the status ----------------------------------------


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["export", "case_details", *WINDOW, "-o", "{blocker}/out.csv", "--api-url", NOWHERE], 2),
        (["backfill", "{spec}", "-o", "{blocker}/out"], 2),
    ],
    ids=["export-unwritable", "backfill-unwritable"],
)
def test_debug_shows_the_traceback_and_keeps_the_exit_status(
    tmp_path: Path, write_spec: Callable[..., Path], args: list[str], status: int
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    spec = write_spec(
        tmp_path / "spec.toml",
        {
            "date_from": "2024-01-01",
            "date_to": "2024-02-01",
            "reports": ["summary"],
            "tokens": [{"label": "a", "env": ENV_A}],
            "api_url": NOWHERE,
        },
    )
    argv = [a.format(blocker=blocker, spec=spec) for a in args]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lexer_activity_async", *extra, *argv],
            capture_output=True,
            text=True,
            env=cli_env(LEXER_API_TOKEN=TOKEN_A, **{ENV_A: TOKEN_A}),
            timeout=120,
            check=False,
        )

    plain, debug = run(), run("--debug")
    assert plain.returncode == debug.returncode == status, (plain.stderr, debug.stderr)
    assert "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr
    assert "not a directory" in plain.stderr.lower()
    assert [ln for ln in plain.stderr.splitlines() if ln.startswith("Error:")] == [
        ln for ln in debug.stderr.splitlines() if ln.startswith("Error:")
    ]


# -- 9: one token source -------------------------------------------------------------------


def test_token_file_and_token_env_together_is_a_usage_error(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_A + "\n")
    result = invoke(
        "users",
        "--token-file",
        str(token_file),
        "--token-env",
        "MY_TOKEN",
        "--api-url",
        NOWHERE,
        env={"MY_TOKEN": TOKEN_B},
    )
    assert result.exit_code == 2, result.output
    assert "--token-file or --token-env, not both" in result.output
    assert TOKEN_A not in result.output
    assert TOKEN_B not in result.output
    no_traceback(result)


# -- 4: piped output fits 80 columns and never cuts an error ------------------------------------


def test_the_piped_summary_table_wraps_a_long_error_whole(tmp_path: Path) -> None:
    import io
    from datetime import datetime, timezone

    from rich.console import Console

    from lexer_activity_async.backfill import BackfillSpec, BackfillSummary, TokenSource
    from lexer_activity_async.cli import _summary_table

    error = (
        "TokenMismatchError: HTTP 401: Unauthorized - api token not matching "
        "(report type 'summary', window 2024-01-01 to 2024-02-01, form 55)"
    )
    assert len(error) > 80
    spec = BackfillSpec(
        tokens=(TokenSource("marketing", env=ENV_A),),
        date_from=datetime(2024, 1, 1, tzinfo=timezone.utc),
        date_to=datetime(2024, 2, 1, tzinfo=timezone.utc),
        output=tmp_path,
        reports=("summary",),
    )
    summary = BackfillSummary(
        done={"marketing": 0},
        failed={"marketing": [("unit", error)]},
        skipped={"marketing": 0},
        bytes=0,
        requests=1,
        rate_limited=0,
        retries=0,
        files=0,
    )
    console = Console(file=io.StringIO(), width=80)
    console.print(_summary_table(summary, spec))
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert all(len(line) <= 80 for line in lines)
    cells = [line.strip("│").split("│") for line in lines if line.startswith("│")]
    wrapped = " ".join(row[4].strip() for row in cells if row[0].strip() != "token")
    assert wrapped == error  # whole, broken between words only
    assert "…" not in console.file.getvalue()  # type: ignore[attr-defined]


def test_a_piped_backfill_says_a_429_in_at_most_80_columns(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    sb = sandbox_in_thread(tokens=frozenset({TOKEN_A}))
    sb.faults.fail_next(429, retry_after="1")
    data = spec_for(sb, tmp_path / "out")
    data["tokens"] = [{"label": "token-d26b0dc4", "env": ENV_A}]
    spec = write_spec(tmp_path / "spec.toml", data)
    done = subprocess.run(
        [sys.executable, "-m", "lexer_activity_async", "backfill", str(spec)],
        capture_output=True,
        text=True,
        env=cli_env(COLUMNS="80", **{ENV_A: TOKEN_A}),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "429" in line]
    assert said, done.stderr
    assert "HTTP 429 for token-d26b0dc4: holding its requests 1s (Retry-After)" in said
    assert all(len(line) <= 80 for line in done.stderr.splitlines()), done.stderr
    assert "waiting 0s" not in done.stderr


# -- 7: strict JSON filters, and messages that name what the user typed ---------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"), ("5", 5)],
)
def test_filter_values_are_strict_json_else_strings(raw: str, value: object) -> None:
    from lexer_activity_async.cli import _filters

    parsed = _filters(None, None, [f"x={raw}"])  # type: ignore[arg-type]
    assert parsed == {"x": value}
    assert type(parsed["x"]) is type(value)


def test_from_after_to_names_the_options() -> None:
    result = invoke(
        "report",
        "summary",
        "--from",
        "2024-03-01",
        "--to",
        "2024-02-01",
        "--api-url",
        NOWHERE,
        env={"LEXER_API_TOKEN": TOKEN_A},
    )
    assert result.exit_code == 2, result.output
    assert "--from 2024-03-01T00:00:00+00:00 must be before --to 2024-02-01" in result.output
    assert "date_from" not in result.output
    no_traceback(result)


def test_a_spec_that_is_not_toml_names_its_path_once(tmp_path: Path) -> None:
    spec = tmp_path / "t.toml"
    spec.write_text("this is = = not toml\n")
    result = invoke("backfill", str(spec))
    assert result.exit_code == 2, result.output
    assert "is not valid TOML" in result.output
    assert result.output.count(str(spec)) == 1, result.output
    no_traceback(result)


# -- 6, 12, 13: dry-run JSON, sandbox help, the [redis] hint ------------------------------------


def test_dry_run_json_prints_the_plan_as_json(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    import json

    sb = sandbox_in_thread()
    spec = write_spec(tmp_path / "spec.toml", spec_for(sb, tmp_path / "out"))
    result = invoke("backfill", str(spec), "--dry-run", "--json", env={ENV_A: TOKEN_A})
    assert result.exit_code == 1, result.output  # b's token variable is not set
    record = json.loads(result.stdout)
    assert record["event"] == "plan"
    assert record["units"] == 12
    assert [t["label"] for t in record["tokens"]] == ["a", "b"]
    assert [t["units"] for t in record["tokens"]] == [6, 6]
    assert all(t["requests"] >= t["units"] for t in record["tokens"])
    assert len(record["unreadable_tokens"]) == 1
    assert ENV_B in record["unreadable_tokens"][0]
    assert sb.stats.requests == {}  # nothing sent


def test_sandbox_help_explains_every_option_and_port_0() -> None:
    result = invoke("sandbox", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "0: three free ports" in text
    assert "Requests each token may send per window" in text
    assert "Rows per export file" in text


def test_a_missing_redis_extra_is_a_setup_error_with_both_install_commands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    result = invoke(
        "users",
        "--redis-url",
        "redis://127.0.0.1:1",
        "--api-url",
        NOWHERE,
        env={"LEXER_API_TOKEN": TOKEN_A},
    )
    assert result.exit_code == 2, result.output
    assert "pip install 'lexer-activity-async[redis]'" in result.output
    assert "pip install -e '.[redis]'" in result.output
    no_traceback(result)


# -- 10, 11: a 404 says which host answered, and points at `forms` for a form ------------------


def test_a_404_names_the_host_that_answered(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox]
) -> None:
    sb = sandbox_in_thread()
    no_v1 = sb.api_url.removesuffix("/v1")
    result = invoke("users", "--api-url", no_v1, env={"LEXER_API_TOKEN": TOKEN_A})
    assert result.exit_code == 1, result.output
    assert f"HTTP 404 from the API {no_v1}" in result.output
    assert "check --api-url (it ends in /v1)" in result.output
    no_traceback(result)

    wrong_status = sb.status_url + "/nothing-here"
    result = invoke(
        "export",
        "case_details",
        *WINDOW,
        "-o",
        str(tmp_path / "cases.csv"),
        "--api-url",
        sb.api_url,
        "--status-url",
        wrong_status,
        env={"LEXER_API_TOKEN": TOKEN_A},
    )
    assert result.exit_code == 1, result.output
    assert f"HTTP 404 from the status host {wrong_status}" in result.output
    assert "check --status-url" in result.output
    assert TOKEN_A not in result.output
    assert not (tmp_path / "cases.csv").exists()
    no_traceback(result)


@pytest.mark.parametrize("form", ["57", "9999"])
def test_an_nps_report_for_a_form_that_is_not_nps_points_at_forms(
    sandbox_in_thread: Callable[..., Sandbox], form: str
) -> None:
    sb = sandbox_in_thread()
    result = invoke(
        "report",
        "nps_volume",
        *WINDOW,
        "--form",
        form,
        "--api-url",
        sb.api_url,
        env={"LEXER_API_TOKEN": TOKEN_A},
    )
    assert result.exit_code == 1, result.output
    assert "HTTP 404" in result.output
    assert f"is --form {form} one of the account's NPS forms?" in result.output
    assert "`lexer-activity forms`" in result.output
    no_traceback(result)


# -- 5: export destinations ----------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a Linux /proc")
def test_export_into_a_folder_that_refuses_files_gives_the_true_reason() -> None:
    result = invoke(
        "export",
        "case_details",
        *WINDOW,
        "-o",
        "/proc/x.csv",
        "--api-url",
        NOWHERE,
        env={"LEXER_API_TOKEN": TOKEN_A},
    )
    assert result.exit_code == 2, result.output
    assert "cannot write /proc/x.csv: /proc exists but refuses new files" in result.output
    no_traceback(result)


def test_export_to_dash_is_a_usage_error_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "export",
        "case_details",
        *WINDOW,
        "-o",
        "-",
        "--api-url",
        NOWHERE,
        env={"LEXER_API_TOKEN": TOKEN_A},
    )
    assert result.exit_code == 2, result.output
    assert "'-' (stdout) is not supported" in result.output
    assert list(tmp_path.iterdir()) == []
    no_traceback(result)


# -- 8: help wraps between words --------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    ["", "users", "forms", "report", "export", "backfill", "status", "sandbox", "demo"],
)
def test_help_at_80_columns_never_breaks_a_word_or_cuts_a_line(command: str) -> None:
    result = CliRunner().invoke(main, [*command.split(), "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines)
    for line, after in itertools.pairwise(lines):
        broken = line.endswith("-") and line[-2:-1].isalnum() and after.strip()[:1].isalnum()
        assert not broken, (line, after)
    listed = [line for line in lines if line.startswith("  ") and not line.startswith("   ")]
    assert not any(line.endswith("...") for line in listed), result.output  # no cut summary
    assert "\ue000" not in result.output
