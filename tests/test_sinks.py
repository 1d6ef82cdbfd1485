"""The backfill's report sinks against the sandbox: json, raw (the body byte for byte),
parquet and duckdb hold the same rows; a provisional window refetched replaces its rows;
bad output (unknown format, missing extra, another schema version, a database held by
another process) is refused before any request, leaving nothing written. Kill-and-resume
runs are in ``test_sinks_kill.py``."""

from __future__ import annotations

import json
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import NOW
from test_backfill import ENV_A, ENV_B, make_spec, token_env, tree  # noqa: F401
from test_backfill_schedule import Clock, rolling_spec
from test_transport import SUMMARY, mock_client

from lexer_activity_async import ConfigurationError, LimiterRegistry, OutputError, Reports
from lexer_activity_async.backfill import BackfillSpec, SpecError, backfill_status, run_backfill
from lexer_activity_async.kinds import REPORT_KINDS
from lexer_activity_async.models import converter
from lexer_activity_async.reports import ReportType, window_stamp
from lexer_activity_async.sandbox import Sandbox
from lexer_activity_async.sinks import Slot, make_sink
from lexer_activity_async.sinks.arrow_tables import VERSION_KEY
from lexer_activity_async.sinks.duckdb_sink import DATABASE_NAME, DuckDBSink
from lexer_activity_async.tables import schema_for, to_rows
from lexer_activity_async.transport import HttpRequest, HttpResponse, MockTransport

UTC = timezone.utc
JAN = datetime(2024, 1, 1, tzinfo=UTC)
FEB = datetime(2024, 2, 1, tzinfo=UTC)
REPORTS = ("summary", "user_volume", "states_volume", "nps_volume")

Rows = dict[str, list[tuple[Any, ...]]]


def sent(sb: Sandbox) -> int:
    """Requests the sandbox has answered, all tokens together."""
    return sum(sb.stats.requests.values())


def json_rows(output: Path, spec: BackfillSpec) -> Rows:
    """Every kind's rows, from a json backfill's files (via `tables.to_rows`)."""
    found: Rows = {}
    for path in sorted(output.glob("*/reports/*/*.json")):
        label, name = path.parts[-4], path.parts[-2]
        kind = ReportType(name)
        lo, hi = next(
            (u.date_from, u.date_to)
            for u in _units(spec)
            if (u.label, u.name) == (label, name) and u.stamp == path.stem
        )
        result = converter.structure(json.loads(path.read_bytes()), REPORT_KINDS[kind].result)
        rows = to_rows(
            kind,
            result,
            label=label,
            window_start=lo,
            window_end=hi,
            form=spec.nps_form if kind.needs_form else None,
        )
        found.setdefault(kind.value, []).extend(tuple(r.values()) for r in rows)
    return {k: sorted(v) for k, v in found.items()}


def _units(spec: BackfillSpec) -> Any:
    from lexer_activity_async.backfill import plan

    return plan(spec, now=NOW).units


def _utc(value: Any) -> Any:
    return value.astimezone(UTC) if isinstance(value, datetime) else value


def parquet_rows(output: Path) -> Rows:
    found: Rows = {}
    for path in sorted(output.glob("*/label=*/window=*/part.parquet")):
        table = pq.read_table(path)
        assert table.schema.metadata[VERSION_KEY] == b"1"
        rows = [tuple(_utc(v) for v in r.values()) for r in table.to_pylist()]
        found.setdefault(path.parts[-4], []).extend(rows)
    return {k: sorted(v) for k, v in found.items()}


def duckdb_rows(output: Path) -> Rows:
    with duckdb.connect(str(output / DATABASE_NAME), read_only=True) as con:
        tables = [r[0] for r in con.execute("SELECT table_name FROM _lexer_schema").fetchall()]
        found = {
            t: sorted(
                tuple(_utc(v) for v in row)
                for row in con.execute(f'SELECT * FROM "{t}"').fetchall()
            )
            for t in tables
        }
    return {k: v for k, v in found.items() if v}


@pytest.mark.usefixtures("token_env")
async def test_parquet_and_duckdb_hold_exactly_the_rows_of_the_json_files(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    outputs = {f: tmp_path / f for f in ("json", "parquet", "duckdb")}
    for format, output in outputs.items():
        spec = make_spec(sandbox, output, reports=REPORTS, exports=(), format=format)
        summary = await run_backfill(spec, registry=registry, now=lambda: NOW)
        assert summary.ok, summary.failed
        assert summary.done == {"a": 8, "b": 8}
    expected = json_rows(outputs["json"], spec)
    assert set(expected) == {"summary", "user_volume", "states_volume", "nps_volume"}
    assert all(expected.values())
    assert parquet_rows(outputs["parquet"]) == expected
    assert duckdb_rows(outputs["duckdb"]) == expected
    # One file per kind, label and window, in hive partitions; no part file left.
    files = sorted(
        str(p.relative_to(outputs["parquet"])) for p in outputs["parquet"].rglob("*.parquet")
    )
    assert len(files) == 16
    assert "summary/label=a/window=2024-01-01_2024-02-01/part.parquet" in files
    assert not [p for p in outputs["parquet"].rglob("*") if p.name.endswith(".part")]
    # A rerun sends nothing and changes nothing.
    for format in ("parquet", "duckdb"):
        spec = make_spec(sandbox, outputs[format], reports=REPORTS, exports=(), format=format)
        again = await run_backfill(spec, registry=registry, now=lambda: NOW)
        assert (again.requests, again.skipped) == (0, {"a": 8, "b": 8})
    assert parquet_rows(outputs["parquet"]) == expected
    assert duckdb_rows(outputs["duckdb"]) == expected


@pytest.mark.usefixtures("token_env")
async def test_raw_files_are_the_response_bodies_byte_for_byte(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry, client_for: Any
) -> None:
    out = tmp_path / "raw"
    spec = make_spec(sandbox, out, reports=("summary", "user_volume"), exports=(), format="raw")
    assert (await run_backfill(spec, registry=registry, now=lambda: NOW)).ok
    files = sorted(out.glob("*/raw/*/*.json"))
    assert len(files) == 8
    async with client_for(sandbox) as client:
        raw = await client.report_raw("user_volume", JAN, FEB)
    assert (out / f"a/raw/user_volume/{window_stamp(JAN, FEB)}.json").read_bytes() == raw.body
    # The client's typed API is intact: the same result as report().
    async with client_for(sandbox) as client:
        assert raw.result == await client.user_volume(JAN, FEB)
    assert not list(out.glob("*/reports"))


async def test_report_raw_keeps_the_body_as_sent_next_to_the_typed_result() -> None:
    body = (json.dumps(SUMMARY, indent=3) + "\n\n").encode()  # not how json.dumps writes it

    def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, {"Content-Type": "application/json"}, body)

    async with mock_client(MockTransport(handler)) as client:
        raw = await client.report_raw(Reports.SUMMARY, JAN, FEB)
        assert raw.body == body
        assert raw.result == await client.summary(JAN, FEB)
        assert repr(raw).endswith(f"body=<{len(body)} bytes>)")


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.mark.parametrize("format", ["parquet", "duckdb"])
@pytest.mark.usefixtures("token_env")
async def test_a_refetched_provisional_window_replaces_its_rows(
    format: str,
    sandbox_factory: Any,
    clock: Clock,
    tmp_path: Path,
    registry: LimiterRegistry,
) -> None:
    sb = await sandbox_factory(now=clock)
    out, reference = tmp_path / format, tmp_path / "json"
    spec = rolling_spec(sb, out, exports=(), reports=("summary", "states_volume"), format=format)
    ref_spec = attrs.evolve(spec, output=reference, format="json")
    seen = []
    for day in (15, 16, 17):
        clock.now = datetime(2026, 6, day, 12, tzinfo=UTC)
        for each in (spec, ref_spec):
            summary = await run_backfill(each, registry=registry, now=clock)
            assert summary.ok, summary.failed
            assert summary.provisional == {"a": 2}
        read = parquet_rows(out) if format == "parquet" else duckdb_rows(out)
        assert read == json_rows(reference, ref_spec)  # June's rows replaced, none twice
        seen.append(read["states_volume"])
    assert len(seen[0]) < len(seen[1]) < len(seen[2])  # June grew by a day each run


# -- bad input: refused before any request, nothing written --------------------------------


def test_an_unknown_format_is_refused_by_the_spec(tmp_path: Path) -> None:
    data = {
        "tokens": [{"label": "a", "env": ENV_A}],
        "date_from": "2024-01-01",
        "reports": "summary",
    }
    with pytest.raises(SpecError, match=r"`format` must be one of json, raw, parquet, duckdb"):
        BackfillSpec.from_dict({**data, "format": "xml"})
    with pytest.raises(SpecError, match=r"got a list"):
        BackfillSpec.from_dict({**data, "format": ["json"]})
    assert BackfillSpec.from_dict({**data, "format": "duckdb"}).format == "duckdb"
    with pytest.raises(ConfigurationError, match="unknown format 'xml'"):
        make_sink("xml", tmp_path)


@pytest.mark.parametrize(("format", "module"), [("parquet", "pyarrow"), ("duckdb", "duckdb")])
@pytest.mark.usefixtures("token_env")
async def test_without_the_tables_extra_a_clear_error_names_it_before_any_request(
    format: str,
    module: str,
    sandbox: Sandbox,
    tmp_path: Path,
    registry: LimiterRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(sys.modules):
        if name == module or name.startswith(f"{module}."):
            monkeypatch.setitem(sys.modules, name, None)  # `import` now fails
    monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "out"
    spec = make_spec(sandbox, out, exports=(), format=format)
    with pytest.raises(ConfigurationError, match=r"\[tables\] extra") as raised:
        await run_backfill(spec, registry=registry, now=lambda: NOW)
    assert "pip install 'lexer-activity-async[tables]'" in str(raised.value)
    assert module in str(raised.value)
    assert sent(sandbox) == 0
    assert not out.exists()


def holder(path: Path, read_only: bool) -> str:
    """Code that opens ``path`` and keeps it open until a line arrives on stdin."""
    return (
        "import duckdb, sys\n"
        f"con = duckdb.connect({str(path)!r}, read_only={read_only})\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "con.close()\n"
    )


@pytest.mark.usefixtures("token_env")
async def test_a_database_another_process_holds_is_refused_before_any_request(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry, other_process: Any
) -> None:
    out = tmp_path / "out"
    spec = make_spec(sandbox, out, exports=(), format="duckdb")
    assert (await run_backfill(spec, registry=registry, now=lambda: NOW)).ok
    requests = sent(sandbox)
    before = tree(out)
    other_process(holder(out / DATABASE_NAME, read_only=False))
    refetch = (NOW.replace(year=2020), NOW)
    with pytest.raises(OutputError, match="another process holds the database") as raised:
        await run_backfill(spec, registry=registry, now=lambda: NOW, refresh=refetch)
    assert raised.value.path == str(out / DATABASE_NAME)
    assert sent(sandbox) == requests
    assert tree(out) == before


@pytest.mark.usefixtures("token_env")
async def test_a_second_backfill_writing_the_database_is_refused(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    out = tmp_path / "out"
    first = DuckDBSink(out)
    first.open([ReportType.SUMMARY])  # a run in progress holds the writer lock
    try:
        spec = make_spec(sandbox, out, exports=(), format="duckdb")
        with pytest.raises(OutputError, match="another backfill is writing this database"):
            await run_backfill(spec, registry=registry, now=lambda: NOW)
        assert sent(sandbox) == 0
    finally:
        first.close()
    assert (await run_backfill(spec, registry=registry, now=lambda: NOW)).ok  # released


@pytest.mark.parametrize("format", ["parquet", "duckdb"])
@pytest.mark.usefixtures("token_env")
async def test_an_output_of_another_schema_version_is_refused_before_any_request(
    format: str, sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    out = tmp_path / "out"
    spec = make_spec(sandbox, out, exports=(), format=format)
    assert (await run_backfill(spec, registry=registry, now=lambda: NOW)).ok
    if format == "duckdb":
        with duckdb.connect(str(out / DATABASE_NAME)) as con:
            con.execute("UPDATE _lexer_schema SET version = 99 WHERE table_name = 'summary'")
    else:
        path = next(out.glob("summary/label=a/window=*/part.parquet"))
        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata({VERSION_KEY: b"99"}), path)
    requests = sent(sandbox)
    before = tree(out)
    with pytest.raises(OutputError, match=r"schema version 99.*writes\b.* 1") as raised:
        await run_backfill(spec, registry=registry, now=lambda: NOW, refresh=(JAN, FEB))
    assert "summary" in str(raised.value)
    assert sent(sandbox) == requests
    assert tree(out) == before


# -- DuckDB and readers: a reader between batches, the writer waiting for it ----------------


def _staged(sink: DuckDBSink, label: str) -> Any:
    result = converter.structure(SUMMARY, REPORT_KINDS[ReportType.SUMMARY].result)
    slot = Slot(label, "summary", ReportType.SUMMARY, JAN, FEB, "jan")
    return sink.stage(slot, result, None)


def test_a_reader_can_open_the_database_between_batches_and_the_writer_waits_for_it(
    tmp_path: Path, other_process: Any
) -> None:
    locked = threading.Event()
    sink = DuckDBSink(tmp_path, on_locked=locked.set)
    sink.open([ReportType.SUMMARY])
    try:
        assert sink.write([_staged(sink, "a")]) == [None]
        reader = other_process(holder(tmp_path / DATABASE_NAME, read_only=True))  # it opens
        results: list[list[Exception | None]] = []
        writing = threading.Thread(target=lambda: results.append(sink.write([_staged(sink, "b")])))
        writing.start()
        assert locked.wait(timeout=60)  # the batch found the reader there, and waits
        assert not results
        assert reader.stdin is not None
        reader.stdin.write("done\n")  # the reader closes; the waiting batch goes ahead
        reader.stdin.flush()
        writing.join(timeout=60)
        assert results == [[None]]
    finally:
        sink.close()
    with duckdb.connect(str(tmp_path / DATABASE_NAME), read_only=True) as con:
        labels = con.execute("SELECT label FROM summary ORDER BY label").fetchall()
    assert labels == [("a",), ("b",)]


def test_a_reader_that_stays_past_the_wait_fails_the_batch_and_leaves_nothing(
    tmp_path: Path, other_process: Any
) -> None:
    sink = DuckDBSink(tmp_path, lock_wait=0.0)
    sink.open([ReportType.SUMMARY])
    try:
        other_process(holder(tmp_path / DATABASE_NAME, read_only=True))
        errors = sink.write([_staged(sink, "a"), _staged(sink, "b")])
    finally:
        sink.close()
    assert all(isinstance(e, OutputError) and "holds the database" in str(e) for e in errors)
    assert len(errors) == 2


def test_schemas_carry_their_version_and_types(tmp_path: Path) -> None:
    from lexer_activity_async.sinks.arrow_tables import arrow_schema

    schema = arrow_schema(schema_for(ReportType.STATES_VOLUME))
    assert schema.metadata[VERSION_KEY] == b"1"
    assert schema.field("period_start").type == pa.timestamp("us", tz="UTC")
    assert schema.field("value").type == pa.int64()
    assert not schema.field("label").nullable


@pytest.mark.parametrize("format", ["raw", "parquet", "duckdb"])
@pytest.mark.usefixtures("token_env")
async def test_a_window_gone_from_the_output_is_pending_and_fetched_again_alone(
    format: str, sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry
) -> None:
    out = tmp_path / "out"
    spec = make_spec(sandbox, out, reports=("summary", "user_volume"), exports=(), format=format)
    assert (await run_backfill(spec, registry=registry, now=lambda: NOW)).ok
    if format == "duckdb":
        with duckdb.connect(str(out / DATABASE_NAME)) as con:
            con.execute("DELETE FROM _lexer_windows WHERE label = 'b' AND table_name = 'summary'")
    elif format == "parquet":
        for path in out.glob("summary/label=b/window=*/part.parquet"):
            path.unlink()
    else:
        for path in out.glob("b/raw/summary/*.json"):
            path.unlink()
    status = {s.label: s for s in backfill_status(spec, now=NOW)}
    if format != "duckdb":  # status reads no database (a run may hold it): it trusts it
        assert (status["a"].pending, status["b"].pending) == (0, 2)
    again = await run_backfill(spec, registry=registry, now=lambda: NOW)
    assert again.done == {"a": 0, "b": 2}
    assert again.requests == 2
