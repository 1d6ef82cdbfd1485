"""OpenTelemetry for the client (extra ``[otel]``: only ``opentelemetry-api`` is needed;
the application brings the SDK and exporters): an `instrumentation.Instrumentation`
making a span per HTTP attempt and the package's metrics.

Spans (tracer ``lexer_activity_async``, kind CLIENT, child of the caller's current span),
named ``<method> <endpoint>``: attributes ``lexer.token_label``, ``lexer.request_id``,
``lexer.report_type``, ``lexer.endpoint``, ``lexer.origin``, ``lexer.attempt`` (1-based),
``http.request.method``, ``http.response.status_code``, ``error.type``; events
``rate_limit_wait`` (``lexer.wait.seconds``) and ``retry`` (``lexer.retry.reason``,
``lexer.retry.delay``). An export file download is one span, ``GET export-file``, resumes
included. Never the token, nor a URL's query, nor a file's signed URL.

Metrics (meter ``lexer_activity_async``), all counters: ``lexer.requests`` (by label,
endpoint, report type, status or error type), ``lexer.rate_limited`` (429s),
``lexer.retries`` (by reason; 429s included as ``RateLimitedError``),
``lexer.rate_limit.wait`` (seconds), ``lexer.export.bytes`` (by label and kind),
``lexer.backfill.units`` (by label, report and state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ._version import __version__

if TYPE_CHECKING:  # `instrumentation` imports this module (lazily): no cycle at run time
    from .instrumentation import RequestDetails

__all__ = ["OpenTelemetry", "configured"]

SCOPE = "lexer_activity_async"


class OpenTelemetry:
    """Spans and metrics through OpenTelemetry, from the given providers or else the
    global ones (set by the application, or by ``opentelemetry-instrument``). Make one
    and pass it to every client: its instruments are created once."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(SCOPE, __version__, meter_provider=meter_provider)
        self.requests = meter.create_counter(
            "lexer.requests", unit="{request}", description="HTTP attempts to the API hosts"
        )
        self.rate_limited = meter.create_counter(
            "lexer.rate_limited", unit="{response}", description="HTTP 429 answers"
        )
        self.retries = meter.create_counter(
            "lexer.retries", unit="{retry}", description="Attempts repeated after a failure"
        )
        self.wait = meter.create_counter(
            "lexer.rate_limit.wait", unit="s", description="Time spent waiting on the rate limit"
        )
        self.bytes = meter.create_counter(
            "lexer.export.bytes", unit="By", description="Export file bytes downloaded"
        )
        self.units = meter.create_counter(
            "lexer.backfill.units", unit="{unit}", description="Backfill units by final state"
        )

    def request(self, details: RequestDetails) -> _Call:
        return _Call(self, details)

    def downloaded(self, label: str, kind: str, size: int) -> None:
        self.bytes.add(size, {"lexer.token_label": label, "lexer.export_kind": kind})

    def unit_finished(self, label: str, report: str, state: str) -> None:
        self.units.add(
            1, {"lexer.token_label": label, "lexer.report_type": report, "lexer.state": state}
        )


class _Call:
    """One call: a span per attempt, ended when the attempt's outcome is known."""

    __slots__ = ("_details", "_errored", "_labels", "_otel", "_span")

    def __init__(self, otel: OpenTelemetry, details: RequestDetails) -> None:
        self._otel = otel
        self._details = details
        labels = {"lexer.token_label": details.label, "lexer.endpoint": details.endpoint}
        if details.report_type is not None:
            labels["lexer.report_type"] = details.report_type
        self._labels = labels  # low-cardinality: the metrics' attributes
        self._span: Span | None = None
        self._errored = False

    def attempt(self, number: int) -> None:
        self._end()
        self._errored = False
        details = self._details
        self._span = self._otel.tracer.start_span(
            f"{details.method} {details.endpoint}",
            kind=SpanKind.CLIENT,
            attributes={
                **self._labels,
                "lexer.request_id": details.request_id,
                "lexer.origin": details.origin,
                "lexer.attempt": number,
                "http.request.method": details.method,
            },
        )

    def rate_limit_wait(self, seconds: float) -> None:
        if self._span is not None:
            self._span.add_event("rate_limit_wait", {"lexer.wait.seconds": seconds})
        self._otel.wait.add(seconds, self._labels)

    def response(self, status: int) -> None:
        if self._span is not None:
            self._span.set_attribute("http.response.status_code", status)
            if status >= 400:
                self._error(str(status), f"HTTP {status}")
        self._otel.requests.add(1, {**self._labels, "http.response.status_code": status})
        if status == 429:
            self._otel.rate_limited.add(1, self._labels)

    def failed(self, error: BaseException) -> None:
        name = type(error).__name__
        self._error(name, name)
        self._otel.requests.add(1, {**self._labels, "error.type": name})

    def retrying(self, delay: float, reason: str) -> None:
        if self._span is not None:
            self._span.add_event(
                "retry", {"lexer.retry.reason": reason, "lexer.retry.delay": delay}
            )
        self._otel.retries.add(1, {**self._labels, "lexer.retry.reason": reason})
        self._end()

    def finished(self, error: BaseException | None) -> None:
        if error is not None and not self._errored:
            # e.g. an answer that would not decode, or the call's deadline
            self._error(type(error).__name__, type(error).__name__)
        self._end()

    def _error(self, kind: str, description: str) -> None:
        if self._span is not None:
            self._span.set_attribute("error.type", kind)
            self._span.set_status(Status(StatusCode.ERROR, description))
        self._errored = True

    def _end(self) -> None:
        span, self._span = self._span, None
        if span is not None:
            span.end()


_configured: tuple[object, object, OpenTelemetry] | None = None


def configured() -> OpenTelemetry | None:
    """`OpenTelemetry` over the global providers if the application set one (a tracer or
    a meter provider from outside the API package, e.g. the SDK's), else None. The same
    instance while the providers stay the same."""
    global _configured
    tracers, meters = trace.get_tracer_provider(), metrics.get_meter_provider()
    if _api_default(tracers) and _api_default(meters):
        return None
    if _configured is None or _configured[0] is not tracers or _configured[1] is not meters:
        _configured = (tracers, meters, OpenTelemetry())
    return _configured[2]


def _api_default(provider: object) -> bool:
    """Whether ``provider`` is the API's own placeholder (proxy or no-op), not one set."""
    module = type(provider).__module__
    return module.startswith(("opentelemetry.trace", "opentelemetry.metrics"))
