"""A faithful local simulator of Lexer's Activity API, for tests, demos and benchmarks.

Three loopback origins, like the real service: the API (``/v1/...``), the export status
host (``/api/public/v1/activity/reports/status``) and a file host serving finished export
CSVs at unguessable URLs (it refuses any request carrying the API token). Rate limit,
documented errors and fault injection are described in `Sandbox`, `SandboxConfig` and
`Faults`; the data, one deterministic world of events per token from which every report
and export row is computed, in `_world` and `_data`.

    async with Sandbox(max_requests=5) as sb:
        ...  # point a client at sb.api_url / sb.status_url

``lexer-activity sandbox --port N`` (see `run` and `config_for_port`) serves the API on
port N, the status host on N+1 and the file host on N+2.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import attrs

from ._server import Sandbox
from ._state import Faults, SandboxConfig, SandboxStats

__all__ = [
    "Sandbox",
    "SandboxConfig",
    "SandboxStats",
    "Faults",
    "config_for_port",
    "serve_forever",
    "run",
]


def config_for_port(
    port: int, config: SandboxConfig | None = None, **overrides: Any
) -> SandboxConfig:
    """A config serving the API on ``port``, status on ``port + 1``, files on ``port + 2``
    (``port=0``: three free ports)."""
    base = config if config is not None else SandboxConfig()
    ports = (port, port + 1, port + 2) if port else (0, 0, 0)
    return attrs.evolve(
        base, api_port=ports[0], status_port=ports[1], files_port=ports[2], **overrides
    )


async def serve_forever(config: SandboxConfig | None = None) -> None:
    """Start a sandbox, print its three URLs, and serve until cancelled."""
    async with Sandbox(config) as sandbox:
        print(f"API:    {sandbox.api_url}", flush=True)
        print(f"Status: {sandbox.status_url}", flush=True)
        print(f"Files:  {sandbox.files_url}", flush=True)
        await asyncio.Event().wait()


def run(config: SandboxConfig | None = None) -> None:
    """Serve until Ctrl-C (blocking); the CLI's ``sandbox`` command calls this."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(config))
