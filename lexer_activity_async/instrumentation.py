"""Instrumentation hooks: what the client tells an observer about each call, export
download and backfill unit, at fixed points of the request path.

An `Instrumentation` (`otel.OpenTelemetry` is one) is given to `LexerClient` or
`run_backfill` as ``instrumentation=``. For each API or status call the channel asks it
for a `RequestObserver` and reports to that the call's attempts, rate-limit waits,
answers, retries and its end. Without one (``None``, or ``"auto"`` when OpenTelemetry
is not configured) nothing here runs: the channel checks for None and goes on, and
``opentelemetry`` is never imported.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Literal, Protocol

import attrs

from .exceptions import ConfigurationError
from .logs import new_request_id

__all__ = [
    "RequestDetails",
    "RequestObserver",
    "Instrumentation",
    "InstrumentationOption",
    "resolve",
    "observe_download",
    "FILE_ENDPOINT",
]

FILE_ENDPOINT = "export-file"
"""The `RequestDetails.endpoint` of an export file download (its URL is signed: never shown)."""


@attrs.frozen
class RequestDetails:
    """One call (all its attempts): the token's ``label`` (never the token), a
    ``request_id`` unique in the process and across processes, the HTTP ``method``, the
    ``endpoint`` path (no query: the status poll's query holds a job's report token), the
    ``origin`` (``api`` or ``status``) and the ``report_type`` where there is one."""

    label: str
    request_id: str
    method: str
    endpoint: str
    origin: str
    report_type: str | None


class RequestObserver(Protocol):
    """Hears about one call as it happens. Methods run inline and must not block."""

    def attempt(self, number: int) -> None:
        """Attempt ``number`` (1-based) begins: it waits for a rate-limit slot, then sends."""

    def rate_limit_wait(self, seconds: float) -> None:
        """The current attempt got its rate-limit slot after waiting ``seconds`` (on the
        event loop's clock) for it; not called when a slot was free at once."""

    def response(self, status: int) -> None:
        """The current attempt got an HTTP answer with ``status``."""

    def failed(self, error: BaseException) -> None:
        """The current attempt got no HTTP answer (connection failure, timeout)."""

    def retrying(self, delay: float, reason: str) -> None:
        """Another attempt follows in ``delay`` seconds because of ``reason`` (an error
        class name, ``RateLimitedError`` for a 429)."""

    def finished(self, error: BaseException | None) -> None:
        """The call is over: succeeded (None), raised ``error``, or was cancelled."""


class Instrumentation(Protocol):
    """Receives the client's hooks (see the module docstring)."""

    def request(self, details: RequestDetails) -> RequestObserver:
        """A call begins; return what observes it."""
        ...

    def downloaded(self, label: str, kind: str, size: int) -> None:
        """``size`` more bytes of a ``kind`` export file of token ``label`` arrived."""

    def unit_finished(self, label: str, report: str, state: str) -> None:
        """A backfill unit of token ``label`` ended in ``state`` (done, provisional,
        failed or skipped)."""


_METHODS = ("request", "downloaded", "unit_finished")

InstrumentationOption = Instrumentation | Literal["auto"] | None
"""``instrumentation=``: an `Instrumentation`, None (off) or ``"auto"``."""


def resolve(option: InstrumentationOption) -> Instrumentation | None:
    """The instrumentation ``option`` stands for. ``"auto"``: OpenTelemetry's global
    providers when the application has imported OpenTelemetry and set a tracer or meter
    provider, else none (so a program without OpenTelemetry never imports it). Anything
    else is a `ConfigurationError`."""
    if isinstance(option, str) and option != "auto":
        raise ConfigurationError(f'instrumentation must be "auto", None or hooks, got {option!r}')
    if not isinstance(option, str):
        missing = [m for m in _METHODS if not callable(getattr(option, m, None))]
        if option is not None and missing:
            raise ConfigurationError(
                f"instrumentation {type(option).__name__} lacks {', '.join(missing)} "
                "(see lexer_activity_async.instrumentation.Instrumentation)"
            )
        return option
    if "opentelemetry" not in sys.modules:
        return None
    from .otel import configured  # the application has OpenTelemetry: so may we

    return configured()


def observe_download(
    instrumentation: Instrumentation | None,
    label: str,
    kind: str,
    chunks: AsyncIterator[bytes],
) -> AsyncIterator[bytes]:
    """``chunks`` of a ``kind`` export file, told to ``instrumentation``: the download is
    one call of its own (one attempt, whatever its resumes; origin ``file``) and each
    chunk's size goes to `Instrumentation.downloaded`. Without one, ``chunks`` itself."""
    if instrumentation is None:
        return chunks
    return _observed(instrumentation, label, kind, chunks)


async def _observed(
    instrumentation: Instrumentation,
    label: str,
    kind: str,
    chunks: AsyncIterator[bytes],
) -> AsyncIterator[bytes]:
    details = RequestDetails(label, new_request_id(), "GET", FILE_ENDPOINT, "file", kind)
    observer = instrumentation.request(details)
    observer.attempt(1)
    error: BaseException | None = None
    try:
        async for chunk in chunks:
            instrumentation.downloaded(label, kind, len(chunk))
            yield chunk
    except GeneratorExit:  # the reader stopped early: no failure of the download
        raise
    except BaseException as failure:
        error = failure
        raise
    finally:
        close = getattr(chunks, "aclose", None)  # an async generator's, now, not at GC
        if close is not None:
            await close()
        observer.finished(error)
