"""Backfill failures stay contained: a unit whose file cannot be written (a full disk, a
read-only folder) fails alone and the others go on; an unusable output root or checkpoint
(read-only, full, corrupt, deleted mid-run) stops the run with a typed error before or
without spending more requests; no ``.part`` file is left behind. Also: an export's
intent is recorded before its job is started.

Full and read-only folders are real tmpfs mounts (the tests run as root in CI). Where
mounting is not permitted the same tests run against a fault-injecting writer instead:
they never skip.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN_A, TOKEN_B
from test_backfill import ENV_A, ENV_B, make_spec, states, token_env  # noqa: F401

from lexer_activity_async import LimiterRegistry
from lexer_activity_async import durable as durable_module
from lexer_activity_async import exports as exports_module
from lexer_activity_async.backfill import (
    CHECKPOINT_NAME,
    BackfillEvent,
    ExportSpec,
    TokenSource,
    UnitFinished,
    plan,
    run_backfill,
)
from lexer_activity_async.backfill import writer as writer_module
from lexer_activity_async.checkpoint import (
    DONE,
    FAILED,
    PENDING,
    STARTING,
    Checkpoint,
    CheckpointError,
)
from lexer_activity_async.exceptions import LexerError, OutputError
from lexer_activity_async.reports import ExportKind
from lexer_activity_async.sandbox import Sandbox

UTC = timezone.utc
EXPORT_BYTES = 100_000
"""Each export CSV's size here: more than a whole 64 KiB folder holds."""


def parts(root: Path) -> list[Path]:
    return sorted(root.rglob("*.part"))


# -- full and read-only folders: tmpfs, or a fault injector ------------------------------


class _QuotaFile(io.RawIOBase):
    """A writable file that runs out of space after the folder's quota (ENOSPC)."""

    def __init__(self, handle: Any, quota: list[int]) -> None:
        self._handle = handle
        self._quota = quota

    def write(self, data: Any) -> int:
        if len(data) > self._quota[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._quota[0] -= len(data)
        written: int = self._handle.write(data)
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def close(self) -> None:
        self._handle.close()
        super().close()

    def fileno(self) -> int:
        number: int = self._handle.fileno()
        return number


class BrokenFolders:
    """Makes folders full (64 KiB) or read-only: tmpfs mounts where the system permits,
    else an injector on the backfill's and the export writer's ``open``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self._mounts: list[Path] = []
        self._faults: dict[Path, tuple[str, list[int]]] = {}
        self.mode = "tmpfs" if self._can_mount() else "injected"

    @staticmethod
    def _can_mount() -> bool:
        if os.environ.get("LEXER_TEST_NO_MOUNT"):  # to run the fallback on purpose
            return False
        return hasattr(os, "geteuid") and os.geteuid() == 0

    def _mount(self, folder: Path, options: str) -> bool:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True,
            check=False,
        )
        if done.returncode == 0:
            self._mounts.append(folder)
        return done.returncode == 0

    def full(self, folder: Path) -> None:
        if self.mode == "tmpfs" and self._mount(folder, "size=64k"):
            return
        self._inject(folder, "full", 64 * 1024)

    def read_only(self, folder: Path) -> None:
        if self.mode == "tmpfs" and self._mount(folder, "ro,size=64k"):
            return
        self._inject(folder, "read-only", 0)

    def _inject(self, folder: Path, kind: str, quota: int) -> None:
        self.mode = "injected"
        folder.mkdir(parents=True, exist_ok=True)
        self._faults[folder] = (kind, [quota])
        if len(self._faults) > 1:
            return
        real_open = open
        real_connect = sqlite3.connect

        def fault_for(path: str | os.PathLike[str]) -> tuple[str, list[int]] | None:
            target = Path(os.fspath(path))
            return next(
                (f for root, f in self._faults.items() if target.is_relative_to(root)), None
            )

        def faulty_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            fault = fault_for(file)
            if fault is None or not any(c in mode for c in "wa+"):
                return real_open(file, mode, *args, **kwargs)
            kind, quota = fault
            if kind == "read-only":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return _QuotaFile(real_open(file, mode, *args, **kwargs), quota)

        def faulty_connect(database: Any, *args: Any, **kwargs: Any) -> Any:
            fault = fault_for(database)
            if fault is not None and fault[0] == "read-only":
                raise sqlite3.OperationalError("unable to open database file")
            return real_connect(database, *args, **kwargs)

        for module in (writer_module, durable_module):
            self._monkeypatch.setattr(module, "open", faulty_open, raising=False)
        self._monkeypatch.setattr(sqlite3, "connect", faulty_connect)

    def release(self, folder: Path) -> None:
        """Make ``folder`` usable again (unmount it, or stop injecting faults there)."""
        self._faults.pop(folder, None)
        if folder in self._mounts:
            self._mounts.remove(folder)
            subprocess.run(["umount", str(folder)], check=True)

    def close(self) -> None:
        for folder in reversed(self._mounts):
            subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokenFolders]:
    folders = BrokenFolders(monkeypatch)
    try:
        yield folders
    finally:
        folders.close()


# -- a unit fails alone -------------------------------------------------------------------


@pytest.mark.usefixtures("token_env")
async def test_a_read_only_label_folder_fails_that_tokens_units_alone(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry, broken: BrokenFolders
) -> None:
    spec = make_spec(sandbox, tmp_path / "out")
    broken.read_only(spec.output / "b")
    summary = await run_backfill(spec, registry=registry)

    assert summary.done == {"a": 8, "b": 0}
    assert len(summary.failed["b"]) == 8
    for unit_id, error in summary.failed["b"]:
        assert error.startswith("OutputError: "), (broken.mode, error)
        assert "Read-only file system" in error
        assert unit_id in error.replace(os.sep, "/")  # the path names the unit's file
    recorded = states(spec.output)
    assert {recorded[u][0] for u, _ in summary.failed["b"]} == {FAILED}
    assert not parts(spec.output)
    assert all(u.path(spec.output).is_file() for u in plan(spec).units if u.label == "a")

    broken.release(spec.output / "b")
    fixed = await run_backfill(spec, retry_failed=True, registry=registry)
    assert fixed.ok
    assert fixed.done == {"a": 0, "b": 8}
    assert {s for s, _, _ in states(spec.output).values()} == {DONE}


@pytest.mark.usefixtures("token_env")
async def test_a_full_disk_fails_the_units_that_do_not_fit_and_leaves_no_part(
    sandbox_factory: Callable[..., Any],
    tmp_path: Path,
    registry: LimiterRegistry,
    broken: BrokenFolders,
) -> None:
    sb = await sandbox_factory(export_size_bytes=EXPORT_BYTES)
    spec = make_spec(sb, tmp_path / "out")
    broken.full(spec.output / "b")
    summary = await run_backfill(spec, registry=registry)

    assert summary.done["a"] == 8
    the_plan = plan(spec)
    b_exports = {u.id for u in the_plan.units if u.label == "b" and u.is_export}
    failed = dict(summary.failed["b"])
    assert b_exports <= set(failed), broken.mode  # each alone is bigger than the disk
    for unit in the_plan.units_of("b"):
        if unit.id in failed:
            assert failed[unit.id].startswith("OutputError: ")
            assert "No space left on device" in failed[unit.id]
            assert not unit.path(spec.output).exists()
        else:  # a report that fitted is complete
            json.loads(unit.path(spec.output).read_bytes())
    assert summary.done["b"] == 8 - len(failed)
    assert not parts(spec.output)


# -- the output as a whole is unusable: the run stops --------------------------------------


@pytest.mark.usefixtures("token_env")
async def test_a_read_only_output_root_stops_the_run_before_any_request(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry, broken: BrokenFolders
) -> None:
    spec = make_spec(sandbox, tmp_path / "out")
    broken.read_only(spec.output)
    with pytest.raises(CheckpointError) as info:
        await run_backfill(spec, registry=registry)
    assert info.value.path == str(spec.output / CHECKPOINT_NAME)
    assert "cannot use the checkpoint" in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert sum(sandbox.stats.requests.values()) == 0


class _FillingConnection:
    """An SQLite connection whose writes fail with SQLITE_FULL once ``full`` is set."""

    def __init__(self, real: sqlite3.Connection, full: list[bool]) -> None:
        self._real = real
        self._full = full

    def execute(self, sql: str, *args: Any) -> Any:
        if self._full[0] and sql.startswith(("INSERT", "COMMIT", "BEGIN")):
            raise sqlite3.OperationalError("database or disk is full")
        return self._real.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        return self.execute(sql) if self._full[0] else self._real.executemany(sql, *args)

    def close(self) -> None:
        self._real.close()


@pytest.mark.usefixtures("token_env")
async def test_a_checkpoint_that_cannot_be_written_stops_the_run_cleanly(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk hits the checkpoint at an unpredictable commit; the injector picks one.
    full = [False]
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        real = real_connect(*args, **kwargs)
        # Only the run's own connection (the test reads the file with its own).
        return _FillingConnection(real, full) if "check_same_thread" in kwargs else real

    monkeypatch.setattr(sqlite3, "connect", connect)
    spec = make_spec(sandbox, tmp_path / "out", per_token_concurrency=2)
    finished: list[str] = []

    def fill_after_three(event: BackfillEvent) -> None:
        if isinstance(event, UnitFinished) and event.state == DONE:
            finished.append(event.unit.id)
            full[0] = len(finished) >= 3

    with pytest.raises(CheckpointError) as info:
        await run_backfill(spec, on_event=fill_after_three, registry=registry)
    assert info.value.path == str(spec.output / CHECKPOINT_NAME)
    assert "database or disk is full" in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert TOKEN_A not in str(info.value)
    assert not parts(spec.output)
    assert 3 <= len(finished) < len(plan(spec).units)
    assert {u for u, (s, _, _) in states(spec.output).items() if s == DONE} <= set(finished)


@pytest.mark.usefixtures("token_env")
async def test_a_full_output_disk_ends_in_failed_units_or_a_typed_stop(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry, broken: BrokenFolders
) -> None:
    """Files and checkpoint on one 64 KiB disk: whichever fills first, nothing escapes
    untyped and nothing half-written stays."""
    spec = make_spec(
        sandbox,
        tmp_path / "out",
        exports=(),
        reports=("summary", "user_volume"),
        date_to=datetime(2026, 1, 1, tzinfo=UTC),
    )  # ~80 KB of reports
    broken.full(spec.output)
    stopped: LexerError | None = None
    try:
        summary = await run_backfill(spec, registry=registry)
    except LexerError as error:
        stopped = error
    if stopped is not None:
        assert isinstance(stopped, OutputError), broken.mode
        assert "full" in str(stopped) or "No space left" in str(stopped)
    else:
        assert not summary.ok
        assert all(
            "No space left on device" in e for errs in summary.failed.values() for _, e in errs
        )
    assert not parts(spec.output)


# -- the checkpoint defends itself ---------------------------------------------------------


def _filled_checkpoint(path: Path) -> tuple[bytes, bytes]:
    """A checkpoint of 3000 units as a crash leaves it: its db and WAL bytes."""
    checkpoint = Checkpoint(path)
    for i in range(3000):
        checkpoint.mark_done(f"a/reports/summary/{i:05d}", i)
    db, wal = path.read_bytes(), Path(f"{path}-wal").read_bytes()
    checkpoint.close()
    return db, wal


def _damage(path: Path, damage: str) -> None:
    path.parent.mkdir()
    if damage == "other-table":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE units (id TEXT)")
        db.close()
    elif damage == "not-a-database":
        path.write_bytes(b"these are not the pages you are looking for\n" * 100)
    else:
        db_bytes, wal = _filled_checkpoint(path)
        path.write_bytes(db_bytes[: len(db_bytes) // 2])
        if damage == "db-and-wal-truncated":
            Path(f"{path}-wal").write_bytes(wal[: len(wal) // 2])


@pytest.mark.parametrize(
    "damage",
    ["db-and-wal-truncated", "db-truncated", "not-a-database", "other-table"],
)
@pytest.mark.usefixtures("token_env")
async def test_a_corrupt_checkpoint_is_a_clear_typed_error_before_any_request(
    sandbox: Sandbox, tmp_path: Path, registry: LimiterRegistry, damage: str
) -> None:
    spec = make_spec(sandbox, tmp_path / "out")
    path = spec.output / CHECKPOINT_NAME
    _damage(path, damage)

    with pytest.raises(CheckpointError) as info:
        await run_backfill(spec, registry=registry)
    message = str(info.value)
    assert info.value.path == str(path)
    assert message.startswith(f"{path}: ")
    if damage == "other-table":
        assert "not a backfill checkpoint" in message
    else:
        assert "the checkpoint is corrupt" in message
        assert "move it and any -wal and -shm files beside it aside and rerun" in message
    assert "\n" not in message
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert sum(sandbox.stats.requests.values()) == 0


@pytest.mark.parametrize("how", ["deleted", "replaced"])
@pytest.mark.usefixtures("token_env")
async def test_a_checkpoint_deleted_or_replaced_mid_run_stops_it(
    sandbox_factory: Callable[..., Any], tmp_path: Path, registry: LimiterRegistry, how: str
) -> None:
    sb = await sandbox_factory(latency=0.005)
    spec = make_spec(sb, tmp_path / "out", per_token_concurrency=1)
    path = spec.output / CHECKPOINT_NAME
    finished: list[str] = []

    def remove_after_first(event: BackfillEvent) -> None:
        if isinstance(event, UnitFinished) and event.state == DONE:
            finished.append(event.unit.id)
            if len(finished) == 1:
                for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                    name.unlink(missing_ok=True)
                if how == "replaced":
                    with sqlite3.connect(path) as other:
                        other.execute("CREATE TABLE t (x)")
                    other.close()

    with pytest.raises(CheckpointError) as info:
        await run_backfill(spec, on_event=remove_after_first, registry=registry)
    assert "deleted or replaced while the backfill was using it" in str(info.value)
    assert info.value.path == str(path)
    assert len(finished) < len(plan(spec).units)
    assert not parts(spec.output)


# -- an export's intent is recorded before its job starts ---------------------------------


@pytest.mark.usefixtures("token_env")
async def test_the_intent_is_recorded_before_the_job_and_the_token_right_after(
    sandbox: Sandbox,
    tmp_path: Path,
    registry: LimiterRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = make_spec(
        sandbox,
        tmp_path / "out",
        tokens=(TokenSource("a", env=ENV_A),),
        reports=(),
        exports=(ExportSpec(ExportKind.CASE_DETAILS),),
        date_to=datetime(2024, 2, 1, tzinfo=UTC),
    )
    [unit] = plan(spec).units
    seen: list[tuple[str, str | None]] = []
    real_start = exports_module.start_export

    async def watched_start(*args: Any, **kwargs: Any) -> Any:
        seen.append(states(spec.output)[unit.id][:2])
        job = await real_start(*args, **kwargs)
        seen.append(("answered", job.token))
        return job

    monkeypatch.setattr(exports_module, "start_export", watched_start)
    real_record = Checkpoint.record_job

    def watched_record(self: Checkpoint, unit_id: str, report_token: str) -> None:
        real_record(self, unit_id, report_token)
        seen.append(states(spec.output)[unit_id][:2])

    monkeypatch.setattr(Checkpoint, "record_job", watched_record)

    # The last run stopped between its intent and the job's token: warn, start afresh.
    with Checkpoint(spec.output / CHECKPOINT_NAME) as checkpoint:
        checkpoint.record_intent(unit.id)
    with caplog.at_level(logging.WARNING, logger="lexer_activity_async"):
        summary = await run_backfill(spec, registry=registry)

    assert summary.ok
    token = seen[1][1]
    assert seen == [(STARTING, None), ("answered", token), (PENDING, token)]
    assert sandbox.stats.exports_started == 1
    assert states(spec.output)[unit.id][0] == DONE
    [warning] = [r for r in caplog.records if "may exist unrecorded" in r.getMessage()]
    assert unit.id in warning.getMessage()
    assert TOKEN_A not in caplog.text
    assert TOKEN_B not in caplog.text


def test_the_cli_reports_a_corrupt_checkpoint_in_one_line_without_a_traceback(
    tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    from click.testing import CliRunner

    from lexer_activity_async.cli import main

    spec_path = write_spec(
        tmp_path / "spec.toml",
        {
            "date_from": "2024-01-01",
            "date_to": "2024-02-01",
            "reports": ["summary"],
            "output": "out",
            "api_url": "http://127.0.0.1:9/v1",  # nothing listens: nothing may be sent
            "tokens": [{"label": "a", "env": ENV_A}],
        },
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / CHECKPOINT_NAME).write_bytes(b"\0garbage" * 512)
    result = CliRunner().invoke(
        main, ["backfill", str(spec_path)], env={"COLUMNS": "200", ENV_A: TOKEN_A}
    )
    assert result.exit_code == 1
    text = " ".join(result.output.split())  # the console wraps long lines
    assert "Error: checkpoint " in text
    assert "the checkpoint is corrupt (file is not a database)" in text
    assert "move it and any -wal and -shm files beside it aside and rerun" in text
    assert "Traceback" not in result.output
    assert TOKEN_A not in result.output
