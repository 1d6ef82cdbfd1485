"""A small recording forward proxy on loopback, for tests that must see what a proxy sees.

tinyproxy logs request lines only; this one keeps every request head and body it is sent
(``seen``), forwards plain-http requests (absolute-form, one per upstream connection) and
tunnels CONNECT, and can refuse: answer every request with a fixed status (``answer``) or
demand credentials (``credentials``, answered 407 otherwise). Hand-written because no
packaged proxy both records raw requests and refuses on demand.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Sequence
from types import TracebackType
from urllib.parse import urlsplit

import anyio
import attrs

__all__ = ["ProxiedRequest", "RecordingProxy"]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "upgrade"}
)


@attrs.frozen
class ProxiedRequest:
    """One request the proxy was sent: its line, headers and the raw bytes (head and
    body; a tunnel's encrypted bytes are never included)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    raw: bytes

    def header_names(self) -> set[str]:
        return {name.lower() for name, _ in self.headers}

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class RecordingProxy:
    """``async with RecordingProxy() as proxy:`` then use ``proxy.url``; ``proxy.seen``."""

    def __init__(
        self,
        *,
        answer: int | None = None,
        reason: str = "Refused",
        answer_headers: Sequence[tuple[str, str]] = (),
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.answer = answer
        self.reason = reason
        self.answer_headers = tuple(answer_headers)
        self.credentials = credentials
        self.seen: list[ProxiedRequest] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""

    async def __aenter__(self) -> RecordingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        # Closing every connection ends each handler (its reads see EOF).
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers))
        await self._server.wait_closed()

    def targets(self, method: str | None = None) -> list[str]:
        return [s.target for s in self.seen if method is None or s.method == method]

    # -- serving -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while await self._one(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True to read another on the same connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        method, target, _ = line.split(" ", 2)
        headers = tuple(
            (name.strip(), value.strip())
            for name, _, value in (raw.partition(":") for raw in lines)
        )
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        body = await reader.readexactly(length) if length else b""
        request = ProxiedRequest(method, target, headers, head + body)
        self.seen.append(request)
        refusal = self._refusal(request)
        if refusal is not None:
            writer.write(refusal)
            await writer.drain()
            return method != "CONNECT"
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await self._upstream(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _relay(reader, writer, up_reader, up_writer)
            return False
        url = urlsplit(target)
        assert url.scheme == "http", target
        assert url.hostname, target
        up_reader, up_writer = await self._upstream(url.hostname, url.port or 80)
        forwarded = [f"{method} {url.path or '/'}{'?' + url.query if url.query else ''} HTTP/1.1"]
        forwarded += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_BY_HOP]
        forwarded += ["Connection: close", "", ""]
        up_writer.write("\r\n".join(forwarded).encode("latin-1") + body)
        await up_writer.drain()
        # The host closes after its answer (Connection: close), and so do we.
        await _copy(up_reader, writer)
        up_writer.close()
        self._writers.discard(up_writer)
        return False

    async def _upstream(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, port)
        self._writers.add(writer)
        return reader, writer

    def _refusal(self, request: ProxiedRequest) -> bytes | None:
        if self.answer is not None:
            return self._status(self.answer, self.reason, self.answer_headers)
        if self.credentials is not None:
            user, password = self.credentials
            expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if request.header("Proxy-Authorization") != expected:
                challenge = (("Proxy-Authenticate", 'Basic realm="test"'),)
                return self._status(407, "Proxy Authentication Required", challenge)
        return None

    @staticmethod
    def _status(status: int, reason: str, headers: Sequence[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}", "Content-Length: 0"]
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join([*lines, "", ""])).encode("latin-1")


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):  # either side may reset; the other then ends too
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Pipe a tunnel both ways until both sides have closed."""
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_copy, reader, up_writer)
            group.start_soon(_copy, up_reader, writer)
    finally:
        up_writer.close()
