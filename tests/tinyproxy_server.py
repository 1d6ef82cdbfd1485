"""Start a throwaway tinyproxy forward proxy on a free loopback port, with its own log."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from redis_server import free_port, stop_server

__all__ = ["TinyproxyUnavailable", "find_tinyproxy", "tinyproxy"]


class TinyproxyUnavailable(RuntimeError):
    """No `tinyproxy` binary, or it would not start."""


def find_tinyproxy() -> str | None:
    return shutil.which("tinyproxy")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def tinyproxy(directory: Path, *, timeout: float = 10.0) -> Iterator[tuple[str, Path]]:
    """Run tinyproxy (loopback clients only) for the block; yields its URL and log path."""
    binary = find_tinyproxy()
    if binary is None:
        raise TinyproxyUnavailable("tinyproxy is not on PATH")
    port = free_port()
    log = directory / "tinyproxy.log"
    config = directory / "tinyproxy.conf"
    config.write_text(
        f'Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile "{log}"\nLogLevel Info\n'
        "MaxClients 50\nAllow 127.0.0.1\n"
    )
    proc = subprocess.Popen(
        [binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + timeout
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TinyproxyUnavailable(f"tinyproxy did not start on port {port}")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", log
    finally:
        stop_server(proc)
