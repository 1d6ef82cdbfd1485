"""Run every benchmark script (``benchmarks/bench_*.py``) in turn, each in its own process.

    python benchmarks/run_all.py [--quick] [--only NAME ...]

``--quick`` is passed through to each script. Exits non-zero when any benchmark failed
(all of them are still run). ``nox -s bench`` calls this.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these (e.g. bench_reports)"
    )
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {name.removesuffix(".py") for name in args.only}
        scripts = [s for s in scripts if s.stem in wanted]
        missing = wanted - {s.stem for s in scripts}
        if missing:
            print(f"no such benchmark: {', '.join(sorted(missing))}", file=sys.stderr)
            return 2
    outcomes: list[tuple[str, int, float]] = []
    for script in scripts:
        cmd = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        print(f"\n=== {script.name} {' '.join(cmd[2:])}".rstrip(), flush=True)
        started = time.perf_counter()
        code = subprocess.run(cmd, cwd=HERE.parent).returncode
        outcomes.append((script.name, code, time.perf_counter() - started))
    print("\n=== summary")
    for name, code, seconds in outcomes:
        print(f"{name:32} {'ok' if code == 0 else f'FAILED ({code})':>12} {seconds:8.1f}s")
    failed = [name for name, code, _ in outcomes if code != 0]
    if failed:
        print(f"{len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
