"""What instrumentation costs per call: `LexerClient` calls through a `MockTransport` (no
socket, so only the client's own work is measured), with

- ``none``: ``instrumentation=None``, what a program without OpenTelemetry gets (and
  ``"auto"`` while OpenTelemetry is not configured): the baseline;
- ``no-op hooks``: an `Instrumentation` whose methods do nothing (the hooks' own calls);
- ``otel api``: `otel.OpenTelemetry` over the API's no-op providers (no SDK installed);
- ``otel sdk``: over the SDK's providers (spans made and ended, no exporter; counters
  aggregated by an in-memory reader).

Each run times ``--calls`` sequential ``users()`` calls per variant, variants alternating;
the table shows CPU µs per call (median of runs, spread) and the ratio to ``none``. Also
timed: `logs.new_request_id`, the one cost every call pays for structured logs.

    python benchmarks/bench_instrumentation.py [--quick] [--runs N] [--calls N]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import _common as c
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from lexer_activity_async import HttpRequest, HttpResponse, LexerClient, MockTransport
from lexer_activity_async.instrumentation import Instrumentation, RequestDetails
from lexer_activity_async.limits import LimiterRegistry
from lexer_activity_async.logs import new_request_id
from lexer_activity_async.otel import OpenTelemetry

TOKEN = "bench-instrumentation-token-0123456789"


class _Quiet:
    """A `RequestObserver` and `Instrumentation` that does nothing."""

    def request(self, details: RequestDetails) -> _Quiet:
        return self

    def attempt(self, number: int) -> None: ...
    def rate_limit_wait(self, seconds: float) -> None: ...
    def response(self, status: int) -> None: ...
    def failed(self, error: BaseException) -> None: ...
    def retrying(self, delay: float, reason: str) -> None: ...
    def finished(self, error: BaseException | None) -> None: ...
    def downloaded(self, label: str, kind: str, size: int) -> None: ...
    def unit_finished(self, label: str, report: str, state: str) -> None: ...


def variants() -> dict[str, Callable[[], Instrumentation | None]]:
    return {
        "none": lambda: None,
        "no-op hooks": _Quiet,
        "otel api": lambda: OpenTelemetry(
            tracer_provider=trace.NoOpTracerProvider(), meter_provider=metrics.NoOpMeterProvider()
        ),
        "otel sdk": lambda: OpenTelemetry(
            tracer_provider=TracerProvider(),
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
        ),
    }


def _answer(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, {"Content-Type": "application/json"}, b"[]")


async def per_call_us(hooks: Instrumentation | None, calls: int) -> float:
    """CPU µs per ``users()`` call of a fresh client with ``hooks``, after a warm-up."""
    async with LexerClient(
        TOKEN,
        transport=MockTransport(_answer),
        registry=LimiterRegistry(),
        max_requests=10**9,
        instrumentation=hooks,
    ) as client:
        for _ in range(min(calls, 200)):
            await client.users()
        start = time.process_time()
        for _ in range(calls):
            await client.users()
        return (time.process_time() - start) / calls * 1e6


def request_id_us(n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        new_request_id()
    return (time.process_time() - start) / n * 1e6


async def main_async(runs: int, calls: int) -> dict[str, Any]:
    made = variants()
    samples: dict[str, list[float]] = {name: [] for name in made}
    for run in range(runs):
        names = list(made) if run % 2 == 0 else list(reversed(made))
        for name in names:
            samples[name].append(await per_call_us(made[name](), calls))
    ids = [request_id_us(calls * 10) for _ in range(runs)]
    return {"runs": runs, "calls": calls, "per_call_us": samples, "request_id_us": ids}


def report(results: dict[str, Any]) -> None:
    samples: dict[str, list[float]] = results["per_call_us"]
    base = c.median(samples["none"])
    rows = []
    for name, values in samples.items():
        low, high = c.spread(values)
        rows.append(
            [name, c.median(values), f"{low:.1f}-{high:.1f}", c.ratio(c.median(values), base)]
        )
    c.print_table(
        f"CPU per call through a MockTransport ({results['runs']} runs x {results['calls']} calls)",
        ["instrumentation", "µs/call (median)", "spread", "x none"],
        rows,
    )
    print(f"\nlogs.new_request_id: {c.median(results['request_id_us']):.3f} µs per call")


def main() -> None:
    parser = c.base_parser(__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=None, help="calls per run and variant")
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 7)
    calls = args.calls or (500 if args.quick else 5000)
    results = asyncio.run(main_async(runs, calls))
    report(results)
    c.write_results("bench_instrumentation", results)


if __name__ == "__main__":
    main()
