"""Shared helpers for the benchmark scripts: medians, timing, tables, JSON results, a
sandbox in a separate process, and the peak RSS of a child process.

Not a benchmark itself (``run_all.py`` runs only ``bench_*.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
SANDBOX_SCRIPT = HERE / "_sandbox_server.py"

MB = 1_000_000
MiB = 1 << 20
GiB = 1 << 30

# -- statistics and timing --------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (NaN for none)."""
    data = list(values)
    return statistics.median(data) if data else float("nan")


def spread(values: Iterable[float]) -> tuple[float, float]:
    """(min, max) of ``values`` (NaNs for none)."""
    data = list(values)
    return (min(data), max(data)) if data else (float("nan"), float("nan"))


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


@dataclass
class Timer:
    """Wall (perf_counter) and CPU (process_time) seconds of a ``with timer():`` block."""

    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def timed() -> Iterator[Timer]:
    """``with timed() as t: ...`` then ``t.wall`` / ``t.cpu`` in seconds."""
    timer = Timer()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield timer
    finally:
        timer.wall = time.perf_counter() - wall
        timer.cpu = time.process_time() - cpu


# -- output -------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant-ish decimals, the rest as str."""
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned plain-text table (first column left-aligned, others right)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(values)
        )

    print()
    print(title)
    print(line(list(headers)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    sys.stdout.flush()


def environment() -> dict[str, Any]:
    """Where and when a result was measured."""
    import aiohttp

    from lexer_activity_async import __version__

    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "aiohttp": aiohttp.__version__,
        "lexer_activity_async": __version__,
        "argv": sys.argv,
        # Other work on the machine skews wall-clock numbers; ratios are measured
        # alternately in the same run to cancel most of it.
        "loadavg_1_5_15": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write ``results`` (plus `environment`) to ``benchmarks/results/<name>.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "environment": environment(), **results}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    print(f"\nresults written to {path}")
    return path


def base_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick``, ``--runs``, ``--no-pin``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the benchmark to CPU 0 and the sandbox to CPU 1",
    )
    return parser


# -- CPU pinning --------------------------------------------------------------------------


def cpu_plan(no_pin: bool) -> tuple[int | None, int | None]:
    """(client CPU, server CPU): 0 and 1 on a machine with 2+ CPUs, else no pinning."""
    if no_pin or not hasattr(os, "sched_setaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def pin_self(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


# -- a sandbox in another process -------------------------------------------------------


class SandboxProcess:
    """A sandbox served by ``_sandbox_server.py`` in a child process.

    ``with SandboxProcess(max_requests=100, window=5.0, cpu=1) as sb:`` then ``sb.api_url``,
    ``sb.status_url``, ``sb.files_url``; ``sb.stats(window)`` reads its counters over HTTP
    (blocking: call it between measurements). Config fields must be JSON values.
    """

    def __init__(
        self, *, cpu: int | None = None, day_cache: int | None = None, **config: Any
    ) -> None:
        self.config = config
        self.cpu = cpu
        self.day_cache = day_cache
        self._proc: subprocess.Popen[str] | None = None
        self.api_url = self.status_url = self.files_url = self.control_url = ""
        self.pid = 0

    def __enter__(self) -> SandboxProcess:
        cmd = [sys.executable, str(SANDBOX_SCRIPT), "--config", json.dumps(self.config)]
        if self.cpu is not None:
            cmd += ["--cpu", str(self.cpu)]
        if self.day_cache is not None:
            cmd += ["--day-cache", str(self.day_cache)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise RuntimeError(f"sandbox process exited with status {self._proc.returncode}")
        info = json.loads(line)
        self.api_url, self.status_url = info["api_url"], info["status_url"]
        self.files_url, self.control_url = info["files_url"], info["control_url"]
        self.pid = int(info["pid"])
        return self

    def __exit__(self, *exc_info: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()  # SIGTERM: the server closes the sandbox and deletes its files
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def stats(self, window: float | None = None) -> dict[str, Any]:
        """The sandbox's counters; ``max_in_window`` per token key uses ``window``."""
        url = self.control_url + "/stats" + (f"?window={window}" if window is not None else "")
        with urllib.request.urlopen(url, timeout=60) as answer:
            payload: dict[str, Any] = json.loads(answer.read())
        return payload

    def warm(self, keys: Sequence[str], date_from: datetime, date_to: datetime) -> dict[str, Any]:
        """Generate the world days that requests over [date_from, date_to] read, for the
        tokens with these ``limits.token_key`` keys, before a measurement (blocking)."""
        body = {
            "keys": list(keys),
            "date_from": date_from.isoformat(),
            "date_to": date_to.isoformat(),
        }
        request = urllib.request.Request(
            self.control_url + "/warm",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=600) as answer:
            payload: dict[str, Any] = json.loads(answer.read())
        return payload

    def peak_rss(self) -> int | None:
        """The server process's peak RSS so far (bytes, from /proc), or None."""
        return proc_peak_rss(self.pid)


# -- memory -------------------------------------------------------------------------------


def proc_peak_rss(pid: int) -> int | None:
    """A live process's peak RSS in bytes from ``/proc/<pid>/status`` (VmHWM), or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for row in text.splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) * 1024
    return None


@dataclass
class ChildRun:
    returncode: int
    peak_rss: int
    """Bytes: ``ru_maxrss`` of exactly this child (``os.wait4``), not of all children."""
    wall: float
    stdout: str
    stderr: str


def run_child(
    cmd: Sequence[str], *, timeout: float = 600.0, env: Mapping[str, str] | None = None
) -> ChildRun:
    """Run ``cmd`` to completion and return its own peak RSS.

    ``resource.getrusage(RUSAGE_CHILDREN)`` reports the maximum over *every* child waited
    for so far (the sandbox, curl, ...), so the child is reaped with ``os.wait4``, whose
    rusage is this child's alone. Output goes through temp files (no pipe to drain).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, text=True, env=env)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return ChildRun(proc.returncode, maxrss, wall, out.read(), err.read())


def self_peak_rss() -> int:
    """This process's peak RSS in bytes."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage * (1 if sys.platform == "darwin" else 1024)


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a live process has used so far (``/proc/<pid>/stat``)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
