"""Backfill exports as typed Parquet (``[exports] format = "parquet"``, ``keep_csv``) against
the sandbox: the files, their rows against the CSVs, resume, a CSV that does not fit its
schema, and the spec's keys and refusals."""

from __future__ import annotations

import asyncio
import csv
import importlib
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import pyarrow.parquet as pq
import pytest
from conftest import TOKEN_A, TOKEN_B

from lexer_activity_async import LimiterRegistry, tables
from lexer_activity_async.backfill import (
    BackfillEvent,
    BackfillSpec,
    ExportSpec,
    SpecError,
    TokenSource,
    UnitFinished,
    plan,
    run_backfill,
)
from lexer_activity_async.exports import PollPolicy
from lexer_activity_async.reports import ExportKind
from lexer_activity_async.sandbox import Sandbox

UTC = timezone.utc
JAN = datetime(2024, 1, 1, tzinfo=UTC)
MAR = datetime(2024, 3, 1, tzinfo=UTC)
ENV_A, ENV_B = "LEXER_TEST_PARQUET_A", "LEXER_TEST_PARQUET_B"
EXPORTS = (
    ExportSpec(ExportKind.CASE_DETAILS),
    ExportSpec(ExportKind.NPS_SUBMISSIONS, 55),
    ExportSpec(ExportKind.MENTION_SLA_EXPORT),
)


@pytest.fixture(autouse=True)
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_A, TOKEN_A)
    monkeypatch.setenv(ENV_B, TOKEN_B)


def make_spec(sb: Sandbox, output: Path, **overrides: Any) -> BackfillSpec:
    """Two tokens x two months x three exports, no reports, written as Parquet."""
    fields: dict[str, Any] = {
        "tokens": (TokenSource("a", env=ENV_A), TokenSource("b", env=ENV_B)),
        "date_from": JAN,
        "date_to": MAR,
        "output": output,
        "reports": (),
        "exports": EXPORTS,
        "export_format": "parquet",
        "api_url": sb.api_url,
        "status_url": sb.status_url,
        "max_requests": sb.config.max_requests,
        "window": sb.config.window,
        "poll": PollPolicy(first_delay=0.02, cap=0.05),
    }
    fields.update(overrides)
    return BackfillSpec(**fields)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def files(output: Path, suffix: str) -> list[Path]:
    return sorted(output.rglob(f"*{suffix}"))


async def test_exports_land_as_typed_parquet_with_the_csvs_rows(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    as_csv = make_spec(sandbox, tmp_path / "csv", export_format="csv")
    as_parquet = make_spec(sandbox, tmp_path / "parquet")
    assert (await run_backfill(as_csv, registry=registry)).ok
    summary = await run_backfill(as_parquet, registry=registry)
    assert summary.ok
    assert summary.done == {"a": 6, "b": 6}

    assert not files(as_parquet.output, ".csv")  # instead of the CSVs, not beside them
    assert not files(as_parquet.output, ".part")
    units = plan(as_parquet).units
    assert {u.path(as_parquet.output) for u in units} == set(files(as_parquet.output, ".parquet"))
    assert summary.bytes == sum(u.path(as_parquet.output).stat().st_size for u in units)
    for unit in units:
        schema = tables.export_schema_for(unit.name)
        table = pq.read_table(unit.path(as_parquet.output))
        assert table.column_names == list(schema.names)
        expected = csv_rows(unit.csv_path(as_csv.output))
        assert expected, unit.id
        rows = table.to_pylist()
        assert len(rows) == len(expected)
        first = schema.data_columns[0].name  # the row id, an integer
        assert [r[first] for r in rows] == [int(e[first]) for e in expected]
        assert {(r["label"], r["window_start"], r["window_end"]) for r in rows} == {
            (unit.label, unit.date_from, unit.date_to)
        }

    started = sandbox.stats.exports_started
    again = await run_backfill(as_parquet, registry=registry)
    assert again.skipped == {"a": 6, "b": 6}  # resume semantics as for CSVs
    assert sandbox.stats.exports_started == started

    lost = units[0].path(as_parquet.output)
    lost.unlink()
    third = await run_backfill(as_parquet, registry=registry)
    assert third.done == {"a": 1, "b": 0}
    assert sandbox.stats.exports_started == started + 1
    assert lost.is_file()


async def test_keep_csv_keeps_the_download_beside_the_parquet(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    spec = make_spec(
        sandbox,
        tmp_path / "out",
        keep_csv=True,
        tokens=(TokenSource("a", env=ENV_A),),
        exports=EXPORTS[:1],
    )
    assert (await run_backfill(spec, registry=registry)).ok
    for unit in plan(spec).units:
        assert unit.csv_path(spec.output).is_file()
        rows = pq.read_table(unit.path(spec.output)).num_rows
        assert rows == len(csv_rows(unit.csv_path(spec.output)))


async def test_an_interrupted_run_resumes_to_the_same_rows(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    reference = make_spec(sandbox, tmp_path / "reference")
    assert (await run_backfill(reference, registry=registry)).ok
    spec = make_spec(sandbox, tmp_path / "out", per_token_concurrency=1)
    reached = asyncio.Event()

    def watch(event: BackfillEvent) -> None:
        if isinstance(event, UnitFinished) and event.state == "done":
            reached.set()

    task = asyncio.create_task(run_backfill(spec, on_event=watch, registry=registry))
    await asyncio.wait_for(reached.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(files(spec.output, ".parquet")) < 12
    assert (await run_backfill(spec, registry=registry)).ok
    assert not files(spec.output, ".part")
    assert not files(spec.output, ".csv")
    for unit in plan(spec).units:
        got = pq.read_table(unit.path(spec.output))
        assert got.equals(pq.read_table(unit.path(reference.output))), unit.id


async def test_a_csv_that_does_not_fit_fails_its_unit_with_row_and_column(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = tables.export_schema_for(ExportKind.CASE_DETAILS)
    channel = schema.names.index("channel")
    columns = list(schema.columns)
    columns[channel] = attrs.evolve(columns[channel], type=tables.ColumnType.INT64)
    monkeypatch.setitem(
        tables.EXPORT_SCHEMAS,
        ExportKind.CASE_DETAILS,
        attrs.evolve(schema, columns=tuple(columns)),
    )
    spec = make_spec(sandbox, tmp_path / "out", exports=EXPORTS[:2])
    summary = await run_backfill(spec, registry=registry)
    assert not summary.ok
    assert summary.done == {"a": 2, "b": 2}  # nps_submissions went on
    failures = [error for errors in summary.failed.values() for _, error in errors]
    assert len(failures) == 4
    for error in failures:
        assert "ExportSchemaError" in error
        assert "row 1, column 'channel'" in error
        assert "is not an integer" in error
        assert TOKEN_A not in error
        assert TOKEN_B not in error
    for unit in plan(spec).units:
        if unit.name == "case_details":
            assert not unit.path(spec.output).exists()
            assert not unit.csv_path(spec.output).exists()
    assert not files(spec.output, ".part")


def test_the_exports_table_form_in_toml(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(
        'date_from = "2024-01-01"\ndate_to = "2024-03-01"\nreports = ["summary"]\n'
        '[[tokens]]\nlabel = "a"\nenv = "X"\n'
        '[exports]\nformat = "parquet"\nkeep_csv = true\n'
        '[[exports.kinds]]\nkind = "case_details"\n'
        '[[exports.kinds]]\nkind = "nps_submissions"\nform = 55\n',
        encoding="utf-8",
    )
    spec = BackfillSpec.from_toml(spec_file)
    assert spec.export_format == "parquet"
    assert spec.keep_csv is True
    assert spec.exports == (
        ExportSpec(ExportKind.CASE_DETAILS),
        ExportSpec(ExportKind.NPS_SUBMISSIONS, 55),
    )
    [unit, *_] = [u for u in plan(spec).units if u.is_export]
    assert unit.path(spec.output).suffix == ".parquet"
    assert unit.csv_path(spec.output).suffix == ".csv"
    listed = BackfillSpec.from_dict(
        {
            "date_from": "2024-01-01",
            "date_to": "2024-03-01",
            "tokens": [{"label": "a", "env": "X"}],
            "reports": ["summary"],
            "exports": ["case_details"],
        }
    )
    assert listed.export_format == "csv"
    assert listed.keep_csv is False


def test_parquet_without_the_extra_names_it_before_any_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.delitem(sys.modules, "lexer_activity_async.csv_parquet", raising=False)
    with pytest.raises(SpecError, match=r"pip install 'lexer-activity-async\[tables\]'"):
        BackfillSpec(
            tokens=(TokenSource("a", env=ENV_A),),
            date_from=JAN,
            date_to=MAR,
            output=tmp_path,
            exports=EXPORTS[:1],
            export_format="parquet",
        )
    monkeypatch.undo()
    importlib.import_module("lexer_activity_async.csv_parquet")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"export_format": "xlsx"}, '[exports] format must be "csv" or "parquet"'),
        ({"keep_csv": "yes"}, "[exports] keep_csv must be true or false"),
    ],
)
def test_bad_export_options_are_refused(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    base: dict[str, Any] = {
        "tokens": (TokenSource("a", env=ENV_A),),
        "date_from": JAN,
        "date_to": MAR,
        "output": tmp_path,
        "exports": EXPORTS[:1],
    }
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        BackfillSpec(**base, **fields)
