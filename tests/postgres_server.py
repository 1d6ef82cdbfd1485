"""Start a throwaway PostgreSQL cluster on a free loopback port (tests and benchmarks).

The cluster lives in a temporary folder: ``initdb`` with a password-protected superuser
(so wrong credentials can be tested), then ``postgres`` bound to 127.0.0.1 only, with
fsync off (a test cluster need not survive a power cut). PostgreSQL refuses to run as
root: as root, the folder is handed to the ``postgres`` user and the binaries run as it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from redis_server import free_port

__all__ = ["PostgresUnavailable", "find_postgres", "postgres_server", "USER", "PASSWORD"]

USER = "lexer"
PASSWORD = "test-password-3141"
_SEARCH = ("/usr/lib/postgresql/*/bin",)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries, or the cluster would not start."""


def find_postgres() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``, or None when PostgreSQL is absent."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).resolve().parent
    found = sorted(Path("/").glob(_SEARCH[0].lstrip("/")), reverse=True)
    return next((folder for folder in found if (folder / "initdb").exists()), None)


def _as_owner(argv: list[str]) -> list[str]:
    """``argv`` run as the ``postgres`` user when this process is root."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


def _stop(proc: subprocess.Popen[bytes], data: Path) -> None:
    """PostgreSQL's fast shutdown (SIGINT: clients disconnected, no wait for them), sent
    to the postmaster itself (``runuser`` passes on SIGTERM only)."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGINT)
    except (OSError, ValueError, IndexError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


def _ready(bin_dir: Path, port: int) -> bool:
    probe = subprocess.run(
        [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"], check=False
    )
    return probe.returncode == 0


@contextmanager
def postgres_server(*, attempts: int = 3, timeout: float = 30.0) -> Iterator[str]:
    """Run a PostgreSQL cluster for the duration of the block; yields a
    ``postgresql://`` URL of its ``postgres`` database as the superuser `USER`."""
    bin_dir = find_postgres()
    if bin_dir is None:
        raise PostgresUnavailable("PostgreSQL (initdb) is not installed")
    with tempfile.TemporaryDirectory(prefix="lexer-pg-") as tmp:
        root = Path(tmp)
        data, sockets = root / "data", root / "sockets"
        sockets.mkdir()
        pwfile = root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
            shutil.chown(sockets, "postgres")
            shutil.chown(pwfile, "postgres")
        init = subprocess.run(
            _as_owner(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    USER,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            capture_output=True,
            check=False,
        )
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {init.stderr.decode(errors='replace')}")
        error: PostgresUnavailable | None = None
        for _ in range(attempts):  # another process may take the free port first
            port = free_port()
            proc = subprocess.Popen(
                _as_owner(
                    [
                        str(bin_dir / "postgres"),
                        "-D",
                        str(data),
                        "-p",
                        str(port),
                        "-h",
                        "127.0.0.1",
                        "-k",
                        str(sockets),
                        "-c",
                        "fsync=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "max_connections=200",
                    ]
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if _ready(bin_dir, port):
                    break
                time.sleep(0.05)
            if proc.poll() is not None or not _ready(bin_dir, port):
                stderr = proc.stderr.read() if proc.poll() is not None and proc.stderr else b""
                message = stderr.decode(errors="replace")
                _stop(proc, data)
                error = PostgresUnavailable(f"postgres did not start: {message}")
                continue
            try:
                yield f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/postgres"
            finally:
                _stop(proc, data)
            return
        assert error is not None
        raise error
