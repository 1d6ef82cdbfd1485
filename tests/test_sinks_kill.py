"""Kill-and-resume for the parquet and duckdb sinks: a CLI backfill SIGKILLed several
times mid-run, then finished, holds exactly the rows of an uninterrupted run (no row
twice, none missing)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TOKEN_A, TOKEN_B
from test_cli import ENV_A, ENV_B, base_spec, cli_env, kill_after, run_cli
from test_sinks import duckdb_rows, parquet_rows

from lexer_activity_async.sandbox import Sandbox


@pytest.mark.parametrize("format", ["parquet", "duckdb"])
def test_sigkill_mid_run_then_resume_holds_the_rows_of_an_uninterrupted_run(
    format: str,
    tmp_path: Path,
    sandbox_in_thread: Callable[..., Sandbox],
    write_spec: Callable[..., Path],
) -> None:
    sb = sandbox_in_thread(latency=0.005)
    spec_path = write_spec(
        tmp_path / "spec.toml",
        base_spec(
            sb,
            date_to="2024-05-01",
            reports=["summary", "user_volume", "states_volume"],
            exports=[],
            concurrency={"per_token": 2, "total": 2},
            format=format,
        ),
    )
    env = cli_env(**{ENV_A: TOKEN_A, ENV_B: TOKEN_B})
    read = parquet_rows if format == "parquet" else duckdb_rows

    reference = tmp_path / "reference"
    status, lines, err = run_cli(
        ["backfill", str(spec_path), "--json", "-o", str(reference)], env, tmp_path / "ref.log"
    )
    assert status == 0, err
    assert lines[-1]["units_done"] == 24
    expected = read(reference)
    assert sum(map(len, expected.values())) > 24

    crashed = tmp_path / "crashed"
    args = ["backfill", str(spec_path), "--json", "-o", str(crashed)]
    for n, k in enumerate((2, 5, 4)):
        status, lines, err = run_cli(args, env, tmp_path / f"kill{n}.log", kill_after(k, False))
        assert status == -signal.SIGKILL, f"run {n} ended before its kill point: {err}"
        for kind, rows in read(crashed).items():  # what is there is whole and once
            assert len(set(rows)) == len(rows), kind
            assert set(rows) <= set(expected[kind]), kind
    status, lines, err = run_cli(args, env, tmp_path / "final.log")
    assert status == 0, err
    assert lines[-1]["units_failed"] == 0
    assert 0 < lines[-1]["units_skipped"] < 24
    assert read(crashed) == expected
