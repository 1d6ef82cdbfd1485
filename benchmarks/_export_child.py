"""One export in a fresh process, for `bench_exports.py`'s peak-RSS measurement.

Runs ``client.export`` (start, poll, stream to disk) against a sandbox that lives in
another process, then prints one JSON line: bytes written, seconds, and this process's
own peak RSS (``--connections N``: as N parallel ranges). With ``--idle`` it only opens
a client and makes one small request: the baseline RSS of the interpreter plus the
library. Not a benchmark itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from datetime import datetime
from pathlib import Path

from lexer_activity_async import LexerClient, LimiterRegistry
from lexer_activity_async.exports import DownloadPolicy


async def run(args: argparse.Namespace) -> dict[str, object]:
    async with LexerClient(
        args.token,
        api_url=args.api,
        status_url=args.status,
        max_requests=10**9,
        window=1.0,
        registry=LimiterRegistry(),
    ) as client:
        start = time.perf_counter()
        if args.idle:
            await client.users()
            size = 0
        else:
            result = await client.export(
                "case_details",
                datetime.fromisoformat(args.date_from),
                datetime.fromisoformat(args.date_to),
                Path(args.dest),
                policy=DownloadPolicy(connections=args.connections),
            )
            size = result.bytes
        return {"bytes": size, "seconds": time.perf_counter() - start}


def _vm(field: str) -> int | None:
    """A ``/proc/self/status`` memory field in bytes (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for row in text.splitlines():
        if row.startswith(field + ":"):
            return int(row.split()[1]) * 1024
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api", required=True)
    parser.add_argument("--status", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--dest", default="")
    parser.add_argument("--date-from", default="")
    parser.add_argument("--date-to", default="")
    parser.add_argument("--idle", action="store_true")
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    out = asyncio.run(run(args))
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["self_peak_rss"] = kib * (1 if sys.platform == "darwin" else 1024)
    out["rss_at_exit"] = _vm("VmRSS")
    out["vm_hwm"] = _vm("VmHWM")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
