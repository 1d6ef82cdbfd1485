"""A worker process for the multi-process tests: sends ``--count`` GET /users requests at
once through a `LexerClient` whose limit is shared through Redis (``--redis-url``) or a
local limit store (``--limit-store``), then prints how many 429s it received. The token
comes from ``LEXER_API_TOKEN``, never the command line."""

from __future__ import annotations

import argparse
import asyncio
import json

from lexer_activity_async import LexerClient


async def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--api-url", "--status-url"):
        parser.add_argument(name, required=True)
    shared = parser.add_mutually_exclusive_group(required=True)
    shared.add_argument("--redis-url")
    shared.add_argument("--limit-store")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--max-requests", type=int, required=True)
    parser.add_argument("--window", type=float, required=True)
    args = parser.parse_args()
    async with LexerClient(
        api_url=args.api_url,
        status_url=args.status_url,
        redis_url=args.redis_url,
        limit_store=args.limit_store,
        max_requests=args.max_requests,
        window=args.window,
    ) as client:
        await asyncio.gather(*(client.users() for _ in range(args.count)))
        stats = client.stats
    print(json.dumps({"requests": stats.requests, "rate_limited": stats.rate_limited}))


if __name__ == "__main__":
    asyncio.run(main())
