"""`lexer-activity show` over every format, `--format` on backfill, the demo ending with
the overview, and the README's "Loading the data" queries run against real outputs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
from conftest import TOKEN_A, TOKEN_B
from test_cli import ENV_A, ENV_B, REPO, base_spec, invoke
from test_sinks import holder

from lexer_activity_async.overview import AGGREGATE_STATES, overview
from lexer_activity_async.sandbox import Sandbox

FORMATS = ("json", "raw", "parquet", "duckdb")


def body_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in ``text``, as cells."""
    return [
        [c.strip() for c in line.strip("│").split("│")]
        for line in text.splitlines()
        if line.startswith("│")
    ]


def readme_query(marker: str) -> str:
    text = (REPO / "README.md").read_text("utf-8")
    found = re.search(rf"<!-- {marker} -->\n```sql\n(.*?)```", text, re.S)
    assert found is not None, marker
    return found.group(1)


def expected_user_volume(output: Path) -> list[list[str]]:
    """From a json output: per label and month, rows and messages outside aggregates."""
    rows = []
    for path in sorted(output.glob("*/reports/user_volume/*.json")):
        agents = json.loads(path.read_bytes())
        n = sum(len(a["states"]) for a in agents)
        total = sum(v for a in agents for s, v in a["states"].items() if s not in AGGREGATE_STATES)
        rows.append([path.parts[-4], path.stem[:7], str(n), str(total)])
    return rows


def test_show_reads_every_format_alike_and_the_parquet_query_of_the_readme_runs(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    sb = sandbox_in_thread()
    spec = write_spec(
        tmp_path / "spec.toml",
        base_spec(sb, reports=["summary", "user_volume"], exports=[], date_to="2024-04-01"),
    )
    env = {ENV_A: TOKEN_A, ENV_B: TOKEN_B}
    shown = {}
    for format in FORMATS:
        out = tmp_path / format
        result = invoke("backfill", str(spec), "--format", format, "-o", str(out), env=env)
        assert result.exit_code == 0, result.output
        result = invoke("show", str(out), "--kind", "user_volume")
        assert result.exit_code == 0, result.output
        assert "user_volume: rows and totals" in result.stdout
        assert f"read from {out} ({format})" in result.stdout
        assert re.search(r"also:\s+summary\s", result.stdout)
        shown[format] = body_rows(result.stdout)
    expected = expected_user_volume(tmp_path / "json")
    assert len(expected) == 6
    assert all(rows == expected for rows in shown.values()), shown
    # The default kind is summary; the format is found by itself.
    result = invoke("show", str(tmp_path / "parquet"))
    assert result.exit_code == 0, result.output
    assert "summary: rows and totals" in result.stdout
    assert len(body_rows(result.stdout)) == 6

    query = readme_query("readme-parquet-query").replace("lexer-output", str(tmp_path / "parquet"))
    relation = duckdb.sql(query)
    assert relation is not None
    got = relation.fetchall()
    assert got
    by_label: dict[str, int] = {}
    for label, *_, messages in got:
        by_label[label] = by_label.get(label, 0) + messages
    assert by_label == {
        label: sum(int(r[3]) for r in expected if r[0] == label) for label in ("a", "b")
    }


def test_the_demo_ends_with_the_overview_and_the_readme_duckdb_query_runs_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for label in ("A", "B"):
        monkeypatch.setenv(f"LEXER_DEMO_TOKEN_TEAM_{label}", "")  # the demo sets it
    out = tmp_path / "demo"
    args = ["demo", "--tokens", "2", "--months", "2", "--window", "1", "--format", "duckdb"]
    result = invoke(*args, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "summary: rows and totals" in result.stdout
    assert f"read from {out} (duckdb)" in result.stdout
    shown = body_rows(result.stdout.split("rows and totals")[-1])
    assert [r[0] for r in shown] == ["team-a", "team-a", "team-b", "team-b"]

    with duckdb.connect(str(out / "lexer.duckdb"), read_only=True) as con:
        got = con.execute(readme_query("readme-duckdb-query")).fetchall()
    view = overview(out)
    assert [(label, month, volume, replied) for label, month, volume, replied, _ in got] == [
        (w.label, w.window_start.strftime("%Y-%m"), *w.totals) for w in view.windows
    ]
    assert [r[1:] for r in shown] == [
        [month, "1", str(volume), str(replied)] for _, month, volume, replied, _ in got
    ]
    assert all(0 < pct <= 100 for *_, pct in got)


# -- error paths -----------------------------------------------------------------------------


def test_show_errors_are_one_line(tmp_path: Path) -> None:
    missing = invoke("show", str(tmp_path / "nope"))
    assert missing.exit_code == 2
    assert "no such folder" in missing.output
    (tmp_path / "empty").mkdir()
    empty = invoke("show", str(tmp_path / "empty"))
    assert empty.exit_code == 2
    assert "holds no backfill reports" in empty.output
    (tmp_path / "out/a/reports/summary").mkdir(parents=True)
    bad = (
        tmp_path / "out/a/reports/summary/2024-01-01T00-00-00+00-00_2024-02-01T00-00-00+00-00.json"
    )
    bad.write_text("[1, 2]")
    broken = invoke("show", str(tmp_path / "out"))
    assert broken.exit_code == 2
    assert "not a summary report" in broken.output
    other = invoke("show", str(tmp_path / "out"), "--kind", "case_summary")
    assert other.exit_code == 2
    assert "holds no case_summary reports (it holds: summary)" in other.output
    for result in (missing, empty, broken, other):
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_an_unknown_format_is_bad_usage_before_anything(
    tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    spec = write_spec(tmp_path / "spec.toml", base_spec(format="xml"))
    result = invoke("backfill", str(spec), env={ENV_A: TOKEN_A, ENV_B: TOKEN_B})
    assert result.exit_code == 2
    assert "`format` must be one of json, raw, parquet, duckdb, got 'xml'" in result.output
    flag = invoke("backfill", str(write_spec(tmp_path / "ok.toml", base_spec())), "--format", "x")
    assert flag.exit_code == 2
    assert "Invalid value for '--format'" in flag.output
    assert not (tmp_path / "lexer-output").exists()


def test_a_held_database_is_one_error_line_before_any_progress(
    tmp_path: Path,
    sandbox_in_thread: Callable[..., Sandbox],
    write_spec: Callable[..., Path],
    other_process: Callable[[str], object],
) -> None:
    sb = sandbox_in_thread()
    spec = write_spec(tmp_path / "spec.toml", base_spec(sb, exports=[], format="duckdb"))
    env = {ENV_A: TOKEN_A, ENV_B: TOKEN_B}
    out = tmp_path / "out"
    assert invoke("backfill", str(spec), "-o", str(out), env=env).exit_code == 0
    other_process(holder(out / "lexer.duckdb", read_only=False))
    requests = sum(sb.stats.requests.values())
    result = invoke("backfill", str(spec), "-o", str(out), "--refresh", "2024-01-01..2024-03-01")
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot write ")
    assert "another process holds the database" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sum(sb.stats.requests.values()) == requests
