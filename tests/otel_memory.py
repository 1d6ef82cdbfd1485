"""`Telemetry`: OpenTelemetry's SDK keeping every span and metric in memory, for tests."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lexer_activity_async.otel import OpenTelemetry


class Telemetry:
    """An `OpenTelemetry` over SDK providers that keep everything in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracers = tracers = TracerProvider()
        tracers.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        meters = MeterProvider(metric_readers=[self.reader])
        self.hooks = OpenTelemetry(tracer_provider=tracers, meter_provider=meters)

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def points(self, name: str) -> list[tuple[dict[str, Any], float]]:
        """(attributes, value) of every data point of the metric ``name``."""
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            assert isinstance(point, NumberDataPoint)  # counters only
                            found.append((dict(point.attributes or {}), point.value))
        return found

    def total(self, name: str, **match: object) -> float:
        return sum(
            value
            for attributes, value in self.points(name)
            if all(attributes.get(k) == v for k, v in match.items())
        )

    def texts(self) -> list[str]:
        """Every string the spans and metrics carry (names, attributes, events)."""
        texts: list[str] = []
        for span in self.spans:
            texts += [span.name, repr(dict(span.attributes or {}))]
            texts += [f"{e.name} {dict(e.attributes or {})}" for e in span.events]
        data = self.reader.get_metrics_data()
        texts.append(data.to_json() if data is not None else "")
        return texts
