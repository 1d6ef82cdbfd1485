"""Start a throwaway `redis-server` on a free loopback port (tests and benchmarks).

No persistence (``--save '' --appendonly no``), bound to 127.0.0.1 only. Readiness is
checked with a raw RESP ``PING`` so this helper needs no client library.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RedisServerUnavailable", "find_redis_server", "free_port", "redis_server"]


class RedisServerUnavailable(RuntimeError):
    """No `redis-server` binary, or it would not start."""


def find_redis_server() -> str | None:
    """Path of the `redis-server` binary, or None when it is not on PATH."""
    return shutil.which("redis-server")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the caller retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _start(binary: str, port: int, timeout: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RedisServerUnavailable(f"redis-server exited ({proc.returncode}): {err}")
        if _pings(port):
            return proc
        time.sleep(0.02)
    stop_server(proc)
    raise RedisServerUnavailable(f"redis-server did not answer PING within {timeout:g}s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a test server, killing it if it has not exited within 5 s."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


@contextmanager
def redis_server(*, attempts: int = 3, timeout: float = 10.0) -> Iterator[str]:
    """Run a redis-server for the duration of the block; yields its ``redis://`` URL."""
    binary = find_redis_server()
    if binary is None:
        raise RedisServerUnavailable("redis-server is not on PATH")
    error: RedisServerUnavailable | None = None
    for _ in range(attempts):  # another process may grab the free port first
        port = free_port()
        try:
            proc = _start(binary, port, timeout)
        except RedisServerUnavailable as exc:
            error = exc
            continue
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_server(proc)
        return
    assert error is not None
    raise error
