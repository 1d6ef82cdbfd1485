"""``[exports] connections``: parallel ranged downloads for backfill exports. The spec key
in both spec forms (checked before any request, a `SpecError` naming the key), kept out
of the workers' run identity, the ``--connections`` override and the dry run, and a
backfill against the sandbox whose export files come as ranges over several connections,
byte-identical to a one-connection run."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from click.testing import CliRunner, Result
from conftest import TOKEN_A, TOKEN_B

from lexer_activity_async.backfill import (
    CHECKPOINT_NAME,
    BackfillSpec,
    ExportSpec,
    SpecError,
    TokenSource,
    run_backfill,
)
from lexer_activity_async.backfill.spec import run_identity
from lexer_activity_async.cli import main
from lexer_activity_async.exports import PollPolicy
from lexer_activity_async.ranged import RANGE_WRITE, split
from lexer_activity_async.reports import ExportKind
from lexer_activity_async.sandbox import Sandbox

UTC = timezone.utc
ENV_A, ENV_B = "LEXER_TEST_CONNECTIONS_A", "LEXER_TEST_CONNECTIONS_B"
HEAD = 'date_from = "2024-01-01"\ndate_to = "2024-03-01"\nreports = ["summary"]\n'
TOKENS = '[[tokens]]\nlabel = "a"\nenv = "X"\n'
FILE_SIZE = 4 * RANGE_WRITE + 12_345
"""Bytes of each export file (`SandboxConfig.export_size_bytes`): a range is at least
`RANGE_WRITE`, so this is enough for 4."""


def load(tmp_path: Path, text: str) -> BackfillSpec:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return BackfillSpec.from_toml(path)


def test_connections_in_the_exports_table_and_the_list_form(tmp_path: Path) -> None:
    table = load(
        tmp_path,
        HEAD + TOKENS + '[exports]\nconnections = 4\n[[exports.kinds]]\nkind = "case_details"\n',
    )
    listed = load(
        tmp_path,
        HEAD + "export_connections = 6\n" + TOKENS + '[[exports]]\nkind = "case_details"\n',
    )
    default = load(tmp_path, HEAD + TOKENS + '[[exports]]\nkind = "case_details"\n')
    assert (table.export_connections, listed.export_connections) == (4, 6)
    assert default.export_connections == 1
    assert [s.download_policy.connections for s in (table, listed, default)] == [4, 6, 1]


@pytest.mark.parametrize("bad", [0, 33, -1, True, 2.0, "4"])
def test_a_spec_built_in_python_checks_connections(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(SpecError, match=r"\[exports\] connections must be an integer from 1 to 32"):
        BackfillSpec(
            tokens=(TokenSource("a", env="X"),),
            date_from=datetime(2024, 1, 1, tzinfo=UTC),
            output=tmp_path,
            export_connections=bad,
        )


def test_connections_are_not_part_of_the_run_identity(tmp_path: Path) -> None:
    """Workers sharing a checkpoint may download with different counts (each host has its
    own link to the file host): the files are byte-identical whatever the count."""
    spec = load(tmp_path, HEAD + TOKENS + '[[exports]]\nkind = "case_details"\n')
    assert run_identity(spec) == run_identity(attrs.evolve(spec, export_connections=8))


# -- against the sandbox -------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(CHECKPOINT_NAME)
    }


async def test_backfill_exports_download_as_ranges_over_several_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_A, TOKEN_A)
    monkeypatch.setenv(ENV_B, TOKEN_B)
    now = datetime(2026, 6, 15, tzinfo=UTC)
    async with Sandbox(
        now=lambda: now, export_size_bytes=FILE_SIZE, export_pending_seconds=0.05
    ) as sb:

        def spec(output: Path, connections: int) -> BackfillSpec:
            return BackfillSpec(
                tokens=(TokenSource("a", env=ENV_A), TokenSource("b", env=ENV_B)),
                date_from=datetime(2024, 1, 1, tzinfo=UTC),
                date_to=datetime(2024, 3, 1, tzinfo=UTC),
                output=output,
                reports=(),
                exports=(ExportSpec(ExportKind.CASE_DETAILS),),
                api_url=sb.api_url,
                status_url=sb.status_url,
                poll=PollPolicy(first_delay=0.02, cap=0.1),
                export_connections=connections,
            )

        single = await run_backfill(spec(tmp_path / "one", 1))
        assert single.ok
        assert all(r.range is None for r in sb.stats.file_log)  # one plain stream each
        sb.stats.file_log.clear()
        ranged = await run_backfill(spec(tmp_path / "four", 4))
        assert ranged.ok
        log = list(sb.stats.file_log)
    files = tree(tmp_path / "four")
    assert files == tree(tmp_path / "one")
    assert len(files) == 2 * 2  # tokens x monthly windows
    assert all(len(body) == FILE_SIZE for body in files.values())
    by_file: dict[str, list[Any]] = defaultdict(list)
    for request in log:
        by_file[request.path].append(request)
    assert len(by_file) == len(files)
    expected = {f"bytes={lo}-{hi - 1}" for lo, hi, _ in split(FILE_SIZE, 4)}
    for requests in by_file.values():
        assert all(r.range is not None for r in requests)  # the probe is a range too
        fetched = [r for r in requests if r.range in expected]
        assert {r.range for r in fetched} == expected
        assert len({r.peer for r in fetched}) >= 2  # concurrent ranges, own connections


# -- the CLI -------------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200", ENV_A: TOKEN_A})


def cli_spec(write_spec: Callable[..., Path], path: Path, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "date_from": "2024-01-01",
        "date_to": "2024-03-01",
        "reports": ["summary"],
        "tokens": [{"label": "a", "env": ENV_A}],
        "exports": {"kinds": [{"kind": "case_details"}], **extra},
    }
    return write_spec(path, data)


def test_dry_run_shows_the_connections(tmp_path: Path, write_spec: Callable[..., Path]) -> None:
    spec = cli_spec(write_spec, tmp_path / "spec.toml", connections=4)
    shown = invoke("backfill", str(spec), "--dry-run")
    assert shown.exit_code == 0, shown.output
    assert "Export downloads: 4 connections per file" in shown.output
    record = json.loads(
        invoke("backfill", str(spec), "--dry-run", "--json").output.splitlines()[-1]
    )
    assert record["export_connections"] == 4
    overridden = invoke("backfill", str(spec), "--dry-run", "--connections", "2")
    assert "Export downloads: 2 connections per file" in overridden.output
    plain = invoke("backfill", str(cli_spec(write_spec, tmp_path / "one.toml")), "--dry-run")
    assert "Export downloads: 1 connection per file" in plain.output


def test_bad_connections_are_usage_errors_before_any_request(
    tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    spec = cli_spec(write_spec, tmp_path / "spec.toml", connections=0)
    result = invoke("backfill", str(spec), "--dry-run")
    assert result.exit_code == 2
    assert "[exports] connections must be an integer from 1 to 32" in result.output
    flag = invoke(
        "backfill", str(cli_spec(write_spec, tmp_path / "ok.toml")), "--connections", "33"
    )
    assert flag.exit_code == 2
    assert "--connections" in flag.output
