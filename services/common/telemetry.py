"""OpenTelemetry traces and metrics for every service; trace context travels in Kafka headers."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.config import TelemetrySettings
from services.common.timing import elapsed_ms

KafkaHeaders = Sequence[tuple[str, bytes | str | None]] | dict[str, bytes | str | None] | None

_memory_exporter: InMemorySpanExporter | None = None
_memory_metrics: InMemoryMetricReader | None = None
_configured = False


def setup_telemetry(settings: TelemetrySettings, service_name: str) -> None:
    """Idempotent: the first call in a process wins, so tests and the CLI can both call it."""
    global _configured, _memory_exporter, _memory_metrics
    if _configured:
        return
    resource = Resource.create({"service.name": service_name})
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter | None = None
    if settings.exporter == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr)
    elif settings.exporter == "memory":
        _memory_exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(_memory_exporter))
    elif settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    readers: list[MetricReader] = []
    if settings.exporter == "memory":
        _memory_metrics = InMemoryMetricReader()
        readers.append(_memory_metrics)
    if settings.prometheus_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(settings.prometheus_port, addr=settings.prometheus_host)
        readers.append(PrometheusMetricReader())
    if settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(
            PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=settings.otlp_endpoint, insecure=True))
        )
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    _configured = True


def memory_exporter() -> InMemorySpanExporter | None:
    return _memory_exporter


def memory_metrics() -> InMemoryMetricReader | None:
    return _memory_metrics


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


def inject_headers(headers: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    """The current span's W3C trace context as Kafka headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    out = list(headers or [])
    out.extend((k, v.encode()) for k, v in carrier.items())
    return out


def extract_context(headers: KafkaHeaders) -> otel_context.Context:
    carrier: dict[str, str] = {}
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    for key, value in pairs:
        if value is None:
            continue
        carrier[key] = value.decode(errors="replace") if isinstance(value, bytes) else value
    return propagate.extract(carrier)


@contextmanager
def stage_timer(timings: dict[str, float], name: str) -> Iterator[None]:
    began = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = elapsed_ms(began)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, carrying the active trace and span ids so logs join traces."""

    def format(self, record: logging.LogRecord) -> str:
        span = trace.get_current_span().get_span_context()
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if span.is_valid:
            payload["trace_id"] = f"{span.trace_id:032x}"
            payload["span_id"] = f"{span.span_id:016x}"
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def setup_logging(level: str = "INFO", json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if json_logs else logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
