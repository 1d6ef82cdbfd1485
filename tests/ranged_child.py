"""A ranged download in a child process, killed by `test_ranged` to play a crash.

    python ranged_child.py API_URL FILE_URL DEST CONNECTIONS

Progress is recorded every 64 KiB of a range (written 16 KiB at a time), so a kill after
some progress leaves a record behind."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from lexer_activity_async import LexerClient, LimiterRegistry, exports, ranged
from lexer_activity_async import models as m
from lexer_activity_async.exports import DownloadPolicy

TOKEN = "ranged-child-token-0123456789"


async def main(api_url: str, file_url: str, dest: str, connections: int) -> None:
    ranged.CHECKPOINT_BYTES = 64 << 10
    ranged.CHECKPOINT_SECONDS = 0.0
    ranged.RANGE_WRITE = 16 << 10
    async with LexerClient(TOKEN, api_url=api_url, registry=LimiterRegistry()) as client:
        job = m.ExportJob("complete", file_url, "child-report-token")
        await exports.download(
            client, job, Path(dest), policy=DownloadPolicy(connections=connections)
        )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
