"""The transport: the one way a request reaches a host, below the client and the exports.

A `Transport` carries one HTTP exchange and raises only typed `TransportError`s
(`AiohttpTransport` over aiohttp; `MockTransport` answers in memory, for tests). A
`Channel` sends API and status requests through it: the token's limiter, the in-flight
cap, retries with backoff, the token added and any echo of it redacted, errors mapped.
Export files go through a second, credential-free transport of the same channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import urllib.request
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
)
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import NoReturn, Protocol, TypeVar

import aiohttp
import anyio
import attrs
import orjson
from aiohttp.http_exceptions import HttpProcessingError

from . import exceptions as exc
from . import wire
from ._version import __version__
from .events import Event, RateLimited, RateLimitWait, RequestSent, Retrying
from .instrumentation import Instrumentation, RequestDetails, RequestObserver
from .limits import Lease, Limiter, Priority, SlidingWindowLimiter, check_priority
from .logs import fields as log_fields
from .logs import new_request_id
from .network import Network
from .retry import RetryPolicy, is_retryable

__all__ = [
    "Secret",
    "raise_detached",
    "Timeouts",
    "HttpRequest",
    "HttpResponse",
    "Transport",
    "AiohttpTransport",
    "MockTransport",
    "Channel",
    "ChannelOwner",
    "Decoder",
    "api_session",
    "files_session",
    "DEFAULT_TIMEOUT",
    "LEASE_MARGIN",
    "RENEW_AFTER",
]

log = logging.getLogger("lexer_activity_async")

RENEW_AFTER = 1.0
"""Seconds a request may wait for the in-flight cap before its slot's lease is renewed.
Shared backends' leases outlast the request timeout by `LEASE_MARGIN`, well over this,
so a shorter wait needs no renewal (and no extra round trip to Redis or the store)."""

LEASE_MARGIN = 5.0
"""Seconds by which a shared backend's lease outlasts the client's request timeout."""

_call_priority: contextvars.ContextVar[Priority | None] = contextvars.ContextVar(
    "lexer_call_priority", default=None
)

DEFAULT_TIMEOUT = 60.0
REDACTED_TEXT = "<redacted>"
REDACTED = REDACTED_TEXT.encode()

T = TypeVar("T")
Decoder = Callable[[int, bytes], T]
"""Turns a 2xx answer (status, body) into a result, or raises a typed error."""


class Secret:
    """Holds the API token; its repr and str never show it, and `redact` removes it from
    whatever a server sends back (a body or header that echoes it)."""

    __slots__ = ("_forms", "_sent", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        raw = value.encode()
        escaped = json.dumps(value)[1:-1].encode()  # as it appears inside a JSON string
        self._forms = (raw,) if escaped == raw else (raw, escaped)
        # The headers of each request shape with the token added, made once: they are
        # kept here, the one place the token lives, never on a transport or a frame.
        self._sent: dict[tuple[int, str], tuple[Mapping[str, str], Mapping[str, str]]] = {}

    def reveal(self) -> str:
        return self._value

    def with_header(self, headers: Mapping[str, str], name: str) -> Mapping[str, str]:
        """``headers`` plus this secret as header ``name``, read-only, made once per
        ``headers`` mapping (by identity) and kept with the secret."""
        key = (id(headers), name)
        found = self._sent.get(key)
        if found is not None and found[0] is headers:
            return found[1]
        merged = MappingProxyType({**headers, name: self._value})
        if len(self._sent) >= 16:
            self._sent.clear()
        self._sent[key] = (headers, merged)  # holding ``headers`` keeps its id unique
        return merged

    def redact(self, data: bytes) -> bytes:
        """``data`` with every occurrence of the token replaced by ``<redacted>``."""
        for form in self._forms:
            if form in data:
                data = data.replace(form, REDACTED)
        return data

    def redact_text(self, text: str) -> str:
        return text.replace(self._value, REDACTED_TEXT) if self._value in text else text

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


# -- one exchange ------------------------------------------------------------------------


@attrs.frozen
class Timeouts:
    """Deadlines of one exchange in seconds (None: unbounded): ``total``, ``connect`` for
    the TCP and TLS handshakes, ``read`` of silence while the answer arrives."""

    total: float | None = DEFAULT_TIMEOUT
    connect: float | None = None
    read: float | None = None


@attrs.frozen
class HttpRequest:
    """One HTTP request as a transport sends it. ``secret_headers`` are revealed only as
    the request goes out; ``stream`` asks for the body to be read as it is iterated
    rather than before `Transport.handle` returns; ``origin`` names the host in errors."""

    method: str
    url: str
    headers: Mapping[str, str] = attrs.field(factory=dict)
    secret_headers: Mapping[str, Secret] = attrs.field(factory=dict)
    body: bytes | None = None
    params: Mapping[str, str] | None = None
    timeout: Timeouts = Timeouts()
    stream: bool = False
    origin: str = "api"

    def redact(self, data: bytes) -> bytes:
        """``data`` with every echo of a secret header's value cut out."""
        for secret in self.secret_headers.values():
            data = secret.redact(data)
        return data

    def redact_text(self, text: str) -> str:
        for secret in self.secret_headers.values():
            text = secret.redact_text(text)
        return text


def redact_headers(headers: Mapping[str, str], request: HttpRequest) -> dict[str, str]:
    """``headers`` as a dict, every echo of a secret header's value cut out. One join and
    one search when nothing is echoed (every answer but a hostile one)."""
    copied = dict(headers)
    if request.secret_headers:
        joined = "\n".join(copied.values())
        if any(secret.reveal() in joined for secret in request.secret_headers.values()):
            return {key: request.redact_text(value) for key, value in copied.items()}
    return copied


class HttpResponse:
    """An answer: ``status``, ``headers`` and a body, given whole (``content``) or as a
    stream of chunks. `read` returns the whole body; `aiter_bytes` yields it once;
    `aclose` releases the connection (idempotent)."""

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str] | None = None,
        content: bytes | AsyncIterable[bytes] = b"",
        *,
        on_close: Callable[[], object] | None = None,
    ) -> None:
        self.status = status
        self._headers: dict[str, str] | None = dict(headers or {})
        self._unredacted: Mapping[str, str] | None = None
        self._request: HttpRequest | None = None
        self._content = content
        self._on_close = on_close

    @classmethod
    def redacting(
        cls,
        status: int,
        headers: Mapping[str, str],
        request: HttpRequest,
        content: bytes | AsyncIterable[bytes] = b"",
        *,
        on_close: Callable[[], object] | None = None,
    ) -> HttpResponse:
        """An answer to ``request`` whose `headers` are ``headers`` with every echo of
        its secret headers cut out (`redact_headers`), done when they are first read:
        a successful answer's headers are seldom read at all."""
        response = cls(status, None, content, on_close=on_close)
        response._headers, response._unredacted, response._request = None, headers, request
        return response

    @property
    def headers(self) -> dict[str, str]:
        headers = self._headers
        if headers is None:
            assert self._unredacted is not None
            assert self._request is not None
            headers = self._headers = redact_headers(self._unredacted, self._request)
            self._unredacted = self._request = None
        return headers

    @headers.setter
    def headers(self, value: Mapping[str, str]) -> None:
        self._headers, self._unredacted, self._request = dict(value), None, None

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        if isinstance(self._content, bytes):
            if self._content:
                yield self._content
            return
        async for chunk in self._content:
            yield chunk

    def loaded(self) -> bytes | None:
        """The body when it is already in memory (read without an await), else None."""
        content = self._content
        return content if type(content) is bytes else None

    async def read(self) -> bytes:
        if isinstance(self._content, bytes):
            return self._content
        body = b"".join([chunk async for chunk in self.aiter_bytes()])
        self._content = body
        return body

    async def aclose(self) -> None:
        close, self._on_close = self._on_close, None
        if close is not None:
            done = close()
            if inspect.isawaitable(done):
                await done

    def __repr__(self) -> str:
        return f"<HttpResponse {self.status}>"


class Transport(Protocol):
    """Carries one exchange. `handle` returns once the headers are in (with the body read
    too unless ``request.stream``) and raises only `TransportError`s: `LexerTimeoutError`,
    `LexerConnectionError` (``request_sent=False`` when no connection was made),
    `MalformedResponseError`. Iterating a streamed body raises only those too."""

    async def handle(self, request: HttpRequest) -> HttpResponse: ...

    async def aclose(self) -> None: ...


# -- aiohttp -----------------------------------------------------------------------------


def api_session(
    *, connections: int = 100, timeout: float = DEFAULT_TIMEOUT, network: Network | None = None
) -> aiohttp.ClientSession:
    """A session for the API and status hosts, as a client makes for itself: up to
    ``connections`` kept-alive connections, no cookies (the token authenticates each
    request, so nothing of one token's should ride along with another's), and
    aiohttp's silent resend of a GET switched off. Pass one to many clients
    (``session=``) to share connections between tokens, as backfills do. ``network``
    sets its proxy and TLS (`network.network`)."""
    network = network or Network()
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout),
        connector=aiohttp.TCPConnector(
            limit=connections, ttl_dns_cache=300, ssl=network.connector_ssl
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": f"lexer-activity-async/{__version__}"},
        proxy=network.proxy,
        trust_env=_reads_env(network),
    )
    no_silent_resend(session)
    return session


def files_session(network: Network | None = None) -> aiohttp.ClientSession:
    """The session for export files, which live on a storage host: no default headers, no
    cookies (per-request deadlines come from the request's `Timeouts`), the same proxy
    and TLS as the API's (``network``). It never carries the token, so neither the
    storage host nor a proxy on the way sees it."""
    network = network or Network()
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=network.connector_ssl),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
        proxy=network.proxy,
        trust_env=_reads_env(network),
    )


def _reads_env(network: Network) -> bool:
    """Whether the session should look up proxy variables. aiohttp does so in a worker
    thread on every request (a third of a small request's CPU), so a session is made
    without ``trust_env`` when an explicit proxy wins anyway or, as the environment
    stands when the session is made, no proxy variable is set."""
    if not network.trust_env or network.proxy is not None:
        return False
    return any(scheme in ("http", "https") for scheme in urllib.request.getproxies())


def no_silent_resend(session: aiohttp.ClientSession) -> None:
    """Switch off aiohttp's silent resend of a GET after a kept-alive connection drops (the
    server would see two requests for one limiter slot). Its only switch is private, so a
    release without it is refused rather than run without the guarantee."""
    if not isinstance(session, aiohttp.ClientSession):
        return  # a stand-in for aiohttp's session: it has no resend of its own
    if not hasattr(session, "_retry_connection"):
        raise exc.ConfigurationError(
            f"aiohttp {aiohttp.__version__} has no switch for its silent resend of a"
            " request on a dropped connection, so the rate limit could not be kept;"
            " install aiohttp>=3.11"
        )
    session._retry_connection = False


class AiohttpTransport:
    """`Transport` over an aiohttp session. Redirects are never followed (the caller
    decides, hop by hop), so a secret header never travels to another host. aiohttp's
    errors hold the request's headers (``request_info``), so none is kept as a cause or
    context of the typed error: it is raised outside the handler, from a frame that holds
    neither the request's headers nor the response."""

    def __init__(self, session: aiohttp.ClientSession, *, owns_session: bool = True) -> None:
        self.session = session
        self._owns = owns_session

    async def aclose(self) -> None:
        if self._owns:
            await self.session.close()

    async def handle(self, request: HttpRequest) -> HttpResponse:
        failure: exc.TransportError
        try:
            response = await self._exchange(request)
        except asyncio.TimeoutError:  # aiohttp's connect/read timeouts included
            failure = exc.LexerTimeoutError(_timed_out(request))
        except aiohttp.ClientProxyConnectionError as error:
            failure = exc.ProxyError(
                f"cannot connect to the proxy for the {request.origin} host: "
                + request.redact_text(str(error.os_error or type(error).__name__))
            )
        except aiohttp.ClientHttpProxyError as error:
            failure = exc.ProxyError(
                f"the proxy refused the tunnel (CONNECT) to the {request.origin} host:"
                f" HTTP {error.status} {request.redact_text(error.message or '')}".rstrip(),
                status=error.status,
            )
        except aiohttp.ClientConnectorCertificateError as error:
            failure = exc.TLSError(
                f"TLS certificate verification failed for the {request.origin} host: "
                + request.redact_text(_certificate_complaint(error.certificate_error))
                + " (pass ca_bundle= or ssl= to trust a private CA)"
            )
        except aiohttp.ClientSSLError as error:
            failure = exc.TLSError(
                f"TLS handshake with the {request.origin} host failed: "
                + request.redact_text(_certificate_complaint(error.os_error))
            )
        except aiohttp.ClientConnectorError as error:
            failure = exc.LexerConnectionError(
                f"cannot connect to {request.origin} host: "
                + request.redact_text(str(error.os_error or error)),
                request_sent=False,
            )
        except (aiohttp.ClientResponseError, HttpProcessingError) as error:
            failure = _malformed(request, error)
        except (aiohttp.ClientError, OSError) as error:
            failure = _dropped(request, error)
        else:
            refusal = _proxy_refusal(request, response)
            if refusal is None:
                return response
            await response.aclose()
            failure = refusal
        raise_detached(failure)

    async def _exchange(self, request: HttpRequest) -> HttpResponse:
        # The headers with the secrets revealed are never a local of this frame (an error's
        # traceback keeps its frames): made in the argument list, or kept by the secret.
        opening = self.session.request(
            request.method,
            request.url,
            data=request.body,
            params=request.params,
            headers=_outgoing_headers(request),
            allow_redirects=False,
            timeout=_client_timeout(request.timeout),
        )
        if not request.stream:
            async with opening as response:
                body = await response.read()
                return HttpResponse.redacting(
                    response.status, response.headers, request, request.redact(body)
                )
        response = await opening.__aenter__()
        headers = redact_headers(response.headers, request)
        return HttpResponse(
            response.status,
            headers,
            _chunks(response.content, request),
            on_close=lambda: opening.__aexit__(None, None, None),
        )


def _outgoing_headers(request: HttpRequest) -> Mapping[str, str]:
    """``request``'s headers with its secret headers revealed."""
    secrets = request.secret_headers
    if len(secrets) == 1:
        ((name, secret),) = secrets.items()
        return secret.with_header(request.headers, name)
    return {**request.headers, **{key: secret.reveal() for key, secret in secrets.items()}}


@functools.lru_cache(maxsize=64)
def _client_timeout(timeout: Timeouts) -> aiohttp.ClientTimeout:
    """aiohttp's form of ``timeout``, made once per distinct deadline set."""
    return aiohttp.ClientTimeout(
        total=timeout.total, sock_connect=timeout.connect, sock_read=timeout.read
    )


async def _chunks(content: aiohttp.StreamReader, request: HttpRequest) -> AsyncIterator[bytes]:
    """A streamed body's chunks as they arrive, its failures typed like `handle`'s."""
    while True:
        failure: exc.TransportError
        try:
            chunk = await content.readany()
        except asyncio.TimeoutError:
            failure = exc.LexerTimeoutError(_timed_out(request))
        except (aiohttp.ClientResponseError, HttpProcessingError) as error:
            failure = _malformed(request, error)
        except (aiohttp.ClientError, OSError) as error:
            failure = _dropped(request, error)
        else:
            if not chunk:
                return
            yield request.redact(chunk)
            continue
        raise_detached(failure)


def raise_detached(error: exc.LexerError) -> NoReturn:
    """Raise ``error`` with no foreign exception (aiohttp's, asyncio's) in its chain. It
    is raised after the handler that made it, yet Python 3.10 can still attach the
    exception an awaiting coroutine was handling as its context, and aiohttp's errors and
    their frames hold the request's headers, token included."""
    try:
        raise error
    finally:
        _detach(error)


def _detach(error: BaseException) -> None:
    _cut_links(error, lambda link: not isinstance(link, exc.LexerError))


def _cut_links(error: BaseException, foreign: Callable[[BaseException], bool]) -> bool:
    """Set to None every ``__cause__``/``__context__`` in ``error``'s chain that
    ``foreign`` picks; True when one was cut."""
    cut = False
    link: BaseException | None = error
    seen: list[BaseException] = []
    while link is not None and not any(link is s for s in seen):
        seen.append(link)
        for attr in ("__cause__", "__context__"):
            value = getattr(link, attr)
            if value is not None and foreign(value):
                setattr(link, attr, None)
                cut = True
        link = link.__cause__ or link.__context__
    return cut


def _timed_out(request: HttpRequest) -> str:
    limit = request.timeout.total
    within = f" within {limit:g}s" if limit is not None else " in time"
    return f"no complete answer from the {request.origin} host{within}"


def _malformed(request: HttpRequest, error: BaseException) -> exc.MalformedResponseError:
    return exc.MalformedResponseError(
        f"malformed HTTP response from the {request.origin} host: "
        + request.redact_text(_parser_complaint(error))
    )


def _dropped(request: HttpRequest, error: BaseException) -> exc.LexerConnectionError:
    return exc.LexerConnectionError(
        f"connection to the {request.origin} host failed: {type(error).__name__}"
    )


def _proxy_refusal(request: HttpRequest, response: HttpResponse) -> exc.ProxyError | None:
    """A forward proxy's own error answer in place of the host's: a 407 (no origin server
    sends one), or an error status with an RFC 9209 ``Proxy-Status`` error."""
    if response.status < 400:
        return None  # neither: its headers need not be read (nor redacted) here
    proxy_status = next((v for k, v in response.headers.items() if k.lower() == "proxy-status"), "")
    if response.status == 407:
        return exc.ProxyError(
            f"the proxy on the way to the {request.origin} host requires authentication"
            " (HTTP 407): put its credentials in the proxy URL",
            status=407,
        )
    if response.status >= 400 and "error=" in proxy_status:
        error = proxy_status.partition("error=")[2].split(";")[0].split(",")[0].strip()
        return exc.ProxyError(
            f"the proxy on the way to the {request.origin} host answered HTTP"
            f" {response.status} ({request.redact_text(error[:60])})",
            status=response.status,
            request_sent=True,  # it may have forwarded the request before failing
        )
    return None


def _certificate_complaint(error: BaseException | None) -> str:
    """OpenSSL's reason ("certificate verify failed: self-signed certificate", ...)."""
    if error is None:
        return "unknown TLS error"
    reason = getattr(error, "verify_message", None) or getattr(error, "reason", None)
    return str(reason or type(error).__name__)[:200]


def _parser_complaint(error: BaseException) -> str:
    """What aiohttp's parser objected to ("Bad status line", "Invalid character in
    Content-Length", ...): the text before its quote of the offending bytes."""
    message = getattr(error, "message", None)
    text = message if isinstance(message, str) and message else type(error).__name__
    return text.splitlines()[0].partition(":")[0].strip()[:100] or type(error).__name__


def cut_transport_context(error: BaseException) -> bool:
    """Detach any aiohttp error (it holds the request's headers) from ``error``'s chain;
    True when there was one."""
    return _cut_links(
        error, lambda link: isinstance(link, (aiohttp.ClientError, HttpProcessingError))
    )


# -- in memory ---------------------------------------------------------------------------


Handler = Callable[[HttpRequest], "HttpResponse | Awaitable[HttpResponse]"]


class MockTransport:
    """A `Transport` that answers in memory: ``handler(request)`` (plain or async)
    returns the `HttpResponse`, or raises a `TransportError` to play a failed exchange.
    Secret headers are redacted from the answer as the aiohttp transport does. No socket
    is opened, so a test of client behaviour needs no server."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.closed = False

    async def handle(self, request: HttpRequest) -> HttpResponse:
        answer = self.handler(request)
        response = await answer if inspect.isawaitable(answer) else answer
        assert isinstance(response, HttpResponse), "a MockTransport handler returns HttpResponse"
        if request.stream:
            headers = redact_headers(response.headers, request)
            return HttpResponse(
                response.status, headers, _redacted(response, request), on_close=response.aclose
            )
        body = request.redact(await response.read())
        await response.aclose()
        return HttpResponse.redacting(response.status, response.headers, request, body)

    async def aclose(self) -> None:
        self.closed = True


async def _redacted(response: HttpResponse, request: HttpRequest) -> AsyncIterator[bytes]:
    async for chunk in response.aiter_bytes():
        yield request.redact(chunk)


# -- the channel: limiter, retries, errors -----------------------------------------------

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_GET_HEADERS: Mapping[str, str] = MappingProxyType({"Accept": "application/json"})
_JSON_HEADERS: Mapping[str, str] = MappingProxyType(
    {"Accept": "application/json", "Content-Type": "application/json"}
)


def _dumps(body: Mapping[str, object]) -> bytes:
    """A request body as JSON: orjson, or the standard library for what orjson refuses
    (integers over 64 bits, non-string keys); bodies are checked as strict JSON before.
    Copied to its own size: orjson's bytes keep a 4 KiB buffer, and a backfill holds a
    body for each request waiting for a slot or the wire."""
    try:
        return bytes(memoryview(orjson.dumps(body)))
    except TypeError:
        return json.dumps(body).encode()


class ChannelOwner(Protocol):
    """Anything that sends through a `Channel` (a `LexerClient`, or the channel itself)."""

    @property
    def channel(self) -> Channel: ...


class Channel:
    """Sends one token's requests: each attempt takes a slot of the token's limiter (a
    `RequestSent` event once taken), then the in-flight cap, then one exchange on the
    transport; 429s penalise the limiter, retryable failures back off and retry, error
    statuses become typed `LexerError`s. It is also what exports receive: the token's
    ``label``, the event hook (`emit`), the clock (`now`) and the file transport.

    ``opener`` is awaited before a request when the channel is not yet bound to its
    transports (`bind`): a client opens itself lazily on first use."""

    def __init__(
        self,
        *,
        token: Secret,
        label: str,
        api_url: str,
        status_url: str,
        timeout: float,
        retry: RetryPolicy,
        window: float,
        priority: Priority = "interactive",
        on_event: Callable[[Event], None] | None = None,
        now: Callable[[], datetime] | None = None,
        in_flight: contextlib.AbstractAsyncContextManager[object] | None = None,
        opener: Callable[[], Awaitable[None]] | None = None,
        instrumentation: Instrumentation | None = None,
    ) -> None:
        self._token = token
        self.label = label
        self.api_url = api_url
        self.status_url = status_url
        self.timeout = timeout
        self.retry = retry
        self.window = window
        self.priority = priority
        self.on_event = on_event
        self._now = now or (lambda: datetime.now(timezone.utc))
        # Taken after the rate-limit slot, so waiting on the rate limit never holds one.
        self._in_flight = in_flight
        self._opener = opener
        self._timeouts = Timeouts(total=timeout)
        self._secret_headers = {wire.TOKEN_HEADER: token}
        self._api: Transport | None = None
        self._files: Transport | None = None
        self._limiter: Limiter | None = None
        self._quick: SlidingWindowLimiter | None = None
        self._last_http: tuple[wire.Request, str, str, HttpRequest] | None = None
        self._redacting = False
        self.closed = False
        self._warned_retry_after = False
        self.instrumentation = instrumentation
        """Hears of each call (`instrumentation`); None: no hook runs."""

    def __repr__(self) -> str:
        return f"Channel(label={self.label!r}, api_url={self.api_url!r}, token=<redacted>)"

    @property
    def channel(self) -> Channel:
        return self

    # -- binding ---------------------------------------------------------------------

    def bind(self, api: Transport, files: Transport, limiter: Limiter) -> None:
        """Attach the transports and the token's limiter (done by `LexerClient.open`)."""
        self._api, self._files, self._limiter = api, files, limiter
        # The package's own transports redact every answer already; another may not.
        self._redacting = type(api) in (AiohttpTransport, MockTransport)
        # The in-process limiter grants a free slot without a coroutine (`_attempt`).
        self._quick = limiter if type(limiter) is SlidingWindowLimiter else None

    def close(self) -> None:
        """Refuse further requests (`ClientClosedError`)."""
        self.closed = True
        self._api = self._files = self._limiter = self._quick = None

    @property
    def bound(self) -> bool:
        return self._limiter is not None

    def _closed_error(self) -> exc.ClientClosedError:
        if self.closed:
            return exc.ClientClosedError("this LexerClient is closed; create a new one")
        return exc.ClientClosedError("this LexerClient is not open; use `async with`")

    @property
    def limiter(self) -> Limiter:
        if self._limiter is None:
            raise self._closed_error()
        return self._limiter

    @property
    def api(self) -> Transport:
        """The transport to the API and status hosts."""
        if self._api is None:
            raise self._closed_error()
        return self._api

    @property
    def files(self) -> Transport:
        """The credential-free transport to the export file host."""
        if self._files is None:
            raise self._closed_error()
        return self._files

    # -- what exports receive ----------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Pass ``event`` to the client's ``on_event`` hook, if any."""
        if self.on_event is not None:
            self.on_event(event)

    def now(self) -> datetime:
        """The client's wall clock (it validates that a range does not start in the future)."""
        return self._now()

    @property
    def max_retry_after(self) -> float:
        """The longest pause a 429's Retry-After may impose (`RetryPolicy.max_retry_after`,
        else the window)."""
        limit = self.retry.max_retry_after
        return self.window if limit is None else limit

    # -- sending -----------------------------------------------------------------------

    async def ensure_open(self) -> None:
        if self.closed:
            raise self._closed_error()
        if not self.bound and self._opener is not None:
            await self._opener()

    @contextlib.contextmanager
    def prioritized(self, priority: Priority | None) -> Iterator[None]:
        """Within the block (this task and the tasks it starts), requests sent without a
        priority of their own use ``priority`` (None: the channel's)."""
        if priority is None:
            yield
            return
        reset = _call_priority.set(check_priority(priority))
        try:
            yield
        finally:
            _call_priority.reset(reset)

    async def send(
        self,
        request: wire.Request,
        decode: Decoder[T],
        *,
        idempotent: bool = True,
        max_retries: int | None = None,
        deadline: float | None = None,
        priority: Priority | None = None,
    ) -> T:
        """Send ``request`` under the limiter with retries, and decode its answer.

        ``max_retries`` and ``deadline`` override the `RetryPolicy` for this call,
        ``priority`` the channel's (and any `prioritized` block's)."""
        if priority is not None:
            check_priority(priority)
        if self._limiter is None or self.closed:
            await self.ensure_open()
        priority = priority or _call_priority.get() or self.priority
        if self.instrumentation is None:
            policy = self.retry
            if deadline is None and policy.deadline is None:  # no cancel scope needed
                retries = policy.max_retries if max_retries is None else max_retries
                return await self._send_with_retries(
                    request, decode, idempotent, retries, None, priority
                )
            return await self._send(
                request, decode, idempotent, max_retries, deadline, new_request_id(), priority
            )
        request_id = new_request_id()
        observer = self.instrumentation.request(
            RequestDetails(
                self.label,
                request_id,
                request.method,
                request.path,
                request.origin,
                request.report_type,
            )
        )
        try:
            result = await self._send(
                request, decode, idempotent, max_retries, deadline, request_id, priority, observer
            )
        except BaseException as error:
            observer.finished(error)
            raise
        observer.finished(None)
        return result

    async def _send(
        self,
        request: wire.Request,
        decode: Decoder[T],
        idempotent: bool,
        max_retries: int | None,
        deadline: float | None,
        request_id: str,
        priority: Priority,
        observer: RequestObserver | None = None,
    ) -> T:
        policy = self.retry
        retries = policy.max_retries if max_retries is None else max_retries
        limit = policy.deadline if deadline is None else deadline
        if limit is None:  # no deadline: skip the cancel scope (it costs ~10% per call)
            return await self._send_with_retries(
                request, decode, idempotent, retries, request_id, priority, observer
            )
        try:
            with anyio.fail_after(limit):
                return await self._send_with_retries(
                    request, decode, idempotent, retries, request_id, priority, observer
                )
        except TimeoutError:
            pass
        # Raised outside the handler: the cancelled attempt is no part of its context.
        raise_detached(
            exc.LexerTimeoutError(
                f"call exceeded its deadline of {limit:g}s", report_type=request.report_type
            )
        )

    def _on_wait(self, seconds: float) -> None:
        until = datetime.now(timezone.utc) + timedelta(seconds=seconds)
        self.emit(RateLimitWait(self.label, seconds, until))

    @contextlib.asynccontextmanager
    async def _slot(
        self, priority: Priority, observer: RequestObserver | None = None
    ) -> AsyncIterator[Lease]:
        """A rate-limit slot; a `RequestSent` event once it is taken. An ``observer`` is
        told how long the attempt waited for it, if it had to."""
        if observer is None:
            async with self.limiter.slot(self._on_wait, priority=priority) as lease:
                self._sent()
                yield lease
            return
        started, waited = anyio.current_time(), False

        def on_wait(seconds: float) -> None:
            nonlocal waited
            waited = True
            self._on_wait(seconds)

        async with self.limiter.slot(on_wait, priority=priority) as lease:
            if waited:
                observer.rate_limit_wait(anyio.current_time() - started)
            self._sent()
            yield lease

    def _sent(self) -> None:
        """Emit `RequestSent`, built only when a hook listens (a hot path)."""
        if self.on_event is not None:
            self.on_event(RequestSent(self.label))

    def _http_request(self, request: wire.Request) -> HttpRequest:
        last = self._last_http  # calls repeat one request (concurrently, or polling)
        if (
            last is not None
            and last[0] is request
            and last[1] is self.api_url
            and last[2] is self.status_url
        ):
            return last[3]
        base = self.api_url if request.origin == "api" else self.status_url
        http = HttpRequest(
            request.method,
            base + request.path,
            headers=_GET_HEADERS if request.json is None else _JSON_HEADERS,
            secret_headers=self._secret_headers,
            body=None if request.json is None else _dumps(request.json),
            params=request.params,
            timeout=self._timeouts,
            origin=request.origin,
        )
        self._last_http = (request, self.api_url, self.status_url, http)
        return http

    async def _exchange(
        self, request: wire.Request, priority: Priority, observer: RequestObserver | None = None
    ) -> tuple[HttpResponse, bytes]:
        """One exchange inside a limiter slot; the answer is read whole before the slot
        is released, and redacted here too, so a caller's own `Transport` that does not
        redact still never lets an echoed token reach an error or a log.

        The slot is renewed when the in-flight cap held the request more than
        `RENEW_AFTER` seconds: a wait there must not outlast a shared backend's lease
        (the slot could free before the request even reached the server). A slot lost
        meanwhile is taken anew (the lost one's release still holds it a window:
        wasteful, safe, and rare)."""
        while True:
            async with self._slot(priority, observer) as lease:
                http = self._http_request(request)
                if self._in_flight is None:
                    response = await self.api.handle(http)
                    body = await response.read()
                else:
                    granted = anyio.current_time()
                    async with self._in_flight:
                        late = anyio.current_time() - granted > RENEW_AFTER
                        if late and not await self.limiter.renew(lease):
                            continue
                        response = await self.api.handle(http)
                        body = await response.read()
            break
        return self._redacted(response, body, http)

    def _redacted(
        self, response: HttpResponse, body: bytes, http: HttpRequest
    ) -> tuple[HttpResponse, bytes]:
        if self._redacting:
            return response, body
        body = http.redact(body)
        return HttpResponse.redacting(response.status, response.headers, http, body), body

    async def _attempt(
        self, request: wire.Request, priority: Priority, observer: RequestObserver | None = None
    ) -> tuple[HttpResponse, bytes]:
        """`_exchange`; a transport error carries the request's report type. With the
        in-process limiter and a slot free, the slot is taken and released right here,
        with no coroutine of its own: the same grant, a third of the cost."""
        try:
            limiter = self._quick
            lease = None if limiter is None else limiter.try_acquire(priority)
            if limiter is None or lease is None:
                return await self._exchange(request, priority, observer)
            try:
                self._sent()
                http = self._http_request(request)
                if self._in_flight is None:  # (in-process slots need no renewal)
                    response = await self.api.handle(http)
                    loaded = response.loaded()
                    body = await response.read() if loaded is None else loaded
                else:
                    async with self._in_flight:
                        response = await self.api.handle(http)
                        body = await response.read()
            finally:
                limiter.release_now(lease)
            return self._redacted(response, body, http)
        except exc.TransportError as error:
            if observer is not None:
                observer.failed(error)
            error.report_type = error.report_type or request.report_type
            cut_transport_context(error)  # Python 3.10 may have attached one on the way up
            raise
        except exc.LexerError as error:  # e.g. the limiter's backend failed meanwhile
            if cut_transport_context(error):
                # The frames it passed (the slot's exit) hold the aiohttp error too.
                raise error.with_traceback(None)  # noqa: B904 - the cause is cut on purpose
            raise

    async def _send_with_retries(
        self,
        request: wire.Request,
        decode: Decoder[T],
        idempotent: bool,
        retries: int,
        request_id: str | None,
        priority: Priority,
        observer: RequestObserver | None = None,
    ) -> T:
        """``request_id`` None: one is made when a log record first needs it."""
        attempt = rate_limited = 0
        while True:
            error: exc.LexerError
            headers: Mapping[str, str] = _NO_HEADERS
            if observer is not None:
                observer.attempt(attempt + rate_limited + 1)
            try:
                response, body = await self._attempt(request, priority, observer)
            except (exc.LexerConnectionError, exc.LexerTimeoutError) as transport_error:
                error = transport_error
            else:
                status = response.status
                if not 200 <= status < 300:
                    headers = response.headers
                # A success's headers are never read, so never redacted: no frame of a
                # decoding error may keep them.
                del response
                if observer is not None:
                    observer.response(status)
                if 200 <= status < 300:
                    return decode(status, body)
                error = wire.map_error(
                    status,
                    body,
                    headers,
                    report_type=request.report_type,
                    now=self._now,
                    max_retry_after=self.max_retry_after,
                )
            if isinstance(error, exc.NotFoundError):  # a wrong base URL shows as a 404
                error.origin = request.origin
                error.url = self.api_url if request.origin == "api" else self.status_url
            if request_id is None:
                request_id = new_request_id()
            if isinstance(error, exc.RateLimitedError):
                self._check_retry_after(error, headers, request_id, request.report_type)
                await self.limiter.penalize(error.retry_after)
                self.limiter.stats.rate_limited += 1
                log.warning(
                    "HTTP 429 for %s: holding its requests %s",
                    self.label,
                    f"{error.retry_after:g}s (Retry-After)"
                    if error.retry_after is not None
                    else f"{self.window:g}s (a full window)",
                    extra=log_fields(self.label, request_id, request.report_type),
                )
                self.emit(RateLimited(self.label, error.retry_after))
                rate_limited += 1
                if rate_limited > self.retry.max_rate_limited:
                    raise_detached(error)
                if observer is not None:
                    penalty = error.retry_after
                    observer.retrying(
                        self.window if penalty is None else penalty, type(error).__name__
                    )
                continue
            if attempt >= retries or not is_retryable(error, idempotent=idempotent):
                raise_detached(error)
            attempt += 1
            self.limiter.stats.retries += 1
            delay = self.retry.backoff(attempt)
            log.info(
                "retrying %s for token %s after %s (attempt %d, in %.2fs)",
                request.report_type or request.path,
                self.label,
                type(error).__name__,
                attempt,
                delay,
                extra=log_fields(self.label, request_id, request.report_type),
            )
            if observer is not None:
                observer.retrying(delay, type(error).__name__)
            self.emit(Retrying(self.label, attempt, delay, type(error).__name__))
            await anyio.sleep(delay)

    def _check_retry_after(
        self,
        error: exc.RateLimitedError,
        headers: Mapping[str, str],
        request_id: str | None = None,
        report_type: str | None = None,
    ) -> None:
        """Warn, once per channel, of a Retry-After that was sent but is unusable."""
        unusable = error.retry_after is None and wire.retry_after_header(headers) is not None
        if unusable and not self._warned_retry_after:
            self._warned_retry_after = True
            log.warning(
                "429 for token %s came with an unusable Retry-After (not a delay in "
                "seconds or an HTTP date); treating it as absent",
                self.label,
                extra=log_fields(self.label, request_id, report_type),
            )
