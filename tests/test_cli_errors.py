"""What a user can cause ends in one ``Error:`` line and click's status, never a traceback.

These run ``python -m lexer_activity_async`` as real processes (exit status, stderr,
signals, files left behind), against sandboxes on a loop in a background thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN_A

from lexer_activity_async.limits_sqlite import STORE_ENV
from lexer_activity_async.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
ENV_A = "LEXER_TEST_ERR_A"
WINDOW = ["--from", "2024-01-01", "--to", "2024-02-01"]


def env(**extra: str) -> dict[str, str]:
    # Keep the test's own limit store (STORE_ENV); drop every other LEXER_ variable.
    out = {k: v for k, v in os.environ.items() if not k.startswith("LEXER_") or k == STORE_ENV}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH")]))
    out.update(extra)
    return out


def cli(
    *args: str, launcher: list[str] | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    command = launcher or [sys.executable, "-m", "lexer_activity_async"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env=env(**extra),
        timeout=120,
        check=False,
    )


def one_error_line(done: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    """Assert ``status``, no traceback anywhere, and one ``Error:`` line holding ``needles``."""
    assert done.returncode == status, (done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder nothing can be written in, and the OS's reason: a read-only tmpfs when
    running as root (root ignores permission bits), else a folder without write permission."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, "Permission denied"
        folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        _mount_failed("a read-only tmpfs")
    try:
        yield folder, "Read-only file system"
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def bad_destinations(tmp_path: Path, read_only: tuple[Path, str]) -> list[tuple[Path, str]]:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    (tmp_path / "a-folder").mkdir()
    folder, reason = read_only
    return [
        (blocker / "out" / "cases.csv", "not a directory"),
        (tmp_path / "a-folder", "is a directory"),
        (folder / "sub" / "cases.csv", reason),
    ]


def test_export_to_a_path_that_cannot_be_written_fails_before_any_request(
    tmp_path: Path,
    sandbox_in_thread: Callable[..., Sandbox],
    read_only_dir: tuple[Path, str],
) -> None:
    sb = sandbox_in_thread()
    for dest, reason in bad_destinations(tmp_path, read_only_dir):
        before = all_files(tmp_path)
        done = cli(
            "export",
            "case_details",
            *WINDOW,
            "-o",
            str(dest),
            "--api-url",
            sb.api_url,
            "--status-url",
            sb.status_url,
            LEXER_API_TOKEN=TOKEN_A,
        )
        one_error_line(done, 2, f"cannot write {dest}", reason)
        assert all_files(tmp_path) == before  # nothing created, not even the folder
    # Not one request reached the sandbox: a bad path spends no rate budget.
    assert sb.stats.requests == {}
    assert sb.stats.exports_started == 0


def test_backfill_and_demo_with_an_output_that_cannot_be_written_exit_2(
    tmp_path: Path,
    sandbox_in_thread: Callable[..., Sandbox],
    write_spec: Callable[..., Path],
    read_only_dir: tuple[Path, str],
) -> None:
    sb = sandbox_in_thread()
    for dest, reason in bad_destinations(tmp_path, read_only_dir):
        if reason == "is a directory":
            continue  # a folder is what these commands want
        spec = write_spec(
            tmp_path / "spec.toml",
            {
                "date_from": "2024-01-01",
                "date_to": "2024-02-01",
                "reports": ["summary"],
                "tokens": [{"label": "a", "env": ENV_A}],
                "output": str(dest),
                "api_url": sb.api_url,
                "status_url": sb.status_url,
            },
        )
        before = all_files(tmp_path)
        one_error_line(
            cli("backfill", str(spec), launcher=None, **{ENV_A: TOKEN_A}),
            2,
            f"cannot write {dest}",
            reason,
        )
        one_error_line(
            cli("demo", "-o", str(dest), "--months", "1"), 2, f"cannot write {dest}", reason
        )
        assert all_files(tmp_path) == before
    assert sb.stats.requests == {}


def test_a_full_disk_during_an_export_leaves_nothing_half_written(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox]
) -> None:
    sb = sandbox_in_thread(export_rows=400)
    dest = tmp_path / "out" / "cases.csv"
    launcher = [sys.executable, str(REPO / "tests" / "fault_disk.py"), "2000"]
    done = cli(
        "export",
        "case_details",
        *WINDOW,
        "-o",
        str(dest),
        "--api-url",
        sb.api_url,
        "--status-url",
        sb.status_url,
        launcher=launcher,
        LEXER_API_TOKEN=TOKEN_A,
    )
    one_error_line(done, 1, f"cannot write {dest}", "No space left on device")
    assert sb.stats.exports_started == 1  # the failure came from the disk, mid-download
    assert list(dest.parent.iterdir()) == []  # no cases.csv, no cases.csv.part


def free_ports(n: int) -> int:
    """A port P with P .. P + n - 1 free just now."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
        if port + n - 1 > 65535:
            continue
        try:
            socks = []
            for offset in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return port
    raise RuntimeError("no free consecutive ports")


@pytest.mark.parametrize("taken", [0, 2], ids=["api-port", "file-port"])
def test_sandbox_on_a_port_in_use_names_the_port(taken: int) -> None:
    port = free_ports(3)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port + taken))
        holder.listen()
        done = cli("sandbox", "--port", str(port))
        one_error_line(
            done, 1, f"cannot listen on 127.0.0.1:{port + taken}", "Address already in use"
        )
        debug = cli("--debug", "sandbox", "--port", str(port))
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr
    assert "PortUnavailableError" in debug.stderr
    if taken:  # the ports bound before the failing one were released
        for offset in range(taken):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + offset))


@pytest.mark.parametrize("port", ["65534", "65535", "70000", "-1"])
def test_sandbox_port_range_leaves_room_for_three_ports(port: str) -> None:
    one_error_line(cli("sandbox", "--port", port), 2, port, "three ports", "1-65533")


def test_token_files_empty_or_blank_are_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("")
    (tmp_path / "blank").write_text("  \n\t\n")
    for name, words in (("empty", "is empty"), ("blank", "is empty but for whitespace")):
        done = cli(
            "report",
            "summary",
            *WINDOW,
            "--token-file",
            str(tmp_path / name),
            "--api-url",
            "http://127.0.0.1:9/v1",
        )
        one_error_line(done, 2, f"token file {tmp_path / name} {words}")


def read_json_lines(proc: subprocess.Popen[str], until: Callable[[dict[str, Any]], bool]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        if until(json.loads(raw)):
            return
    raise AssertionError(f"the process ended before the awaited line: {proc.communicate()}")


def interrupt(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


# A shell starts background jobs with SIGINT ignored, and Python keeps it ignored: the
# child first restores the handler a terminal's Ctrl-C meets, then runs the CLI.
_WITH_SIGINT = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'lexer-activity'; runpy.run_module('lexer_activity_async', run_name='__main__')"
)


@contextlib.contextmanager
def interruptible(args: list[str], child_env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """The CLI as a child process that Ctrl-C (SIGINT) reaches; killed if still running."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WITH_SIGINT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _mount_failed(what: str) -> None:
    """Where a tmpfs cannot be mounted: skip locally, fail under CI (root can mount there)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot mount {what} under CI")
    pytest.skip(f"cannot mount {what} here")


def test_ctrl_c_during_a_backfill_exits_130_with_one_line(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox], write_spec: Callable[..., Path]
) -> None:
    # Two requests per hour: the run is certainly waiting on the rate limit when stopped.
    sb = sandbox_in_thread(max_requests=2, window=3600)
    spec = write_spec(
        tmp_path / "spec.toml",
        {
            "date_from": "2024-01-01",
            "date_to": "2024-04-01",
            "reports": ["summary"],
            "exports": [{"kind": "case_details"}],
            "tokens": [{"label": "a", "env": ENV_A}],
            "output": str(tmp_path / "out"),
            "api_url": sb.api_url,
            "status_url": sb.status_url,
            "rate_limit": {"max_requests": 2, "window": 3600},
            "poll": {"first_delay": 0.05, "cap": 0.2},
        },
    )
    with interruptible(["backfill", str(spec), "--json"], env(**{ENV_A: TOKEN_A})) as proc:
        read_json_lines(proc, lambda line: line.get("event") == "RateLimitWait")
        status, stderr = interrupt(proc)
    assert status == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == ["interrupted"]
    assert not [p for p in (tmp_path / "out").rglob("*.part")]


def test_ctrl_c_during_an_export_leaves_no_file(
    tmp_path: Path, sandbox_in_thread: Callable[..., Sandbox]
) -> None:
    sb = sandbox_in_thread(export_pending_seconds=3600)
    dest = tmp_path / "cases.csv"
    args = ["export", "case_details", *WINDOW, "-o", str(dest)]
    args += ["--api-url", sb.api_url, "--status-url", sb.status_url]
    with interruptible(args, env(LEXER_API_TOKEN=TOKEN_A)) as proc:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # printed once the job is started
        assert first.strip() == "case_details: export pending"
        status, stderr = interrupt(proc)
    assert status == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == ["interrupted"]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 KiB tmpfs: a real full disk (needs root; skipped where it cannot be mounted,
    the export test above covers a full disk everywhere with a fault-injecting writer)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        _mount_failed("a tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_backfill_onto_a_full_disk_ends_in_one_line(tiny_disk: Path) -> None:
    done = cli(
        "demo", "-o", str(tiny_disk / "out"), "--tokens", "1", "--months", "3", "--window", "3"
    )
    line = one_error_line(done, 1)
    assert "disk is full" in line or "No space left on device" in line
    assert not list(tiny_disk.rglob("*.part"))
