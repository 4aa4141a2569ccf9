"""Telemetry from ``OTEL_*`` settings, for the composition root (the CLI) to call.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter, or when an OTLP endpoint is
set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or the ``_TRACES_`` one; exporter ``otlp``); metrics
likewise with ``OTEL_METRICS_EXPORTER``. ``OTEL_SDK_DISABLED=true`` turns both off.
Exporters: ``otlp`` (``OTEL_EXPORTER_OTLP_PROTOCOL`` http/protobuf, or grpc when its
package is installed; the exporter reads its own ``OTEL_EXPORTER_OTLP_*`` settings),
``console`` and ``none``. ``QTASKS_OTEL_SPANS_FILE`` and ``QTASKS_OTEL_METRICS_FILE`` also
write spans and metrics as JSON lines to that path (``{pid}`` in it becomes the process
id). Providers are built here and handed to the interceptors; the global ones are never set.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.interceptors import Interceptor

__all__ = ["Telemetry", "telemetry_from_env"]


@dataclass
class Telemetry:
    """The interceptors to install and what to shut down (flushing exporters) at exit."""

    interceptors: list[Interceptor] = field(default_factory=list)
    _shutdowns: list[Callable[[], Any]] = field(default_factory=list)

    def shutdown(self) -> None:
        for shutdown in self._shutdowns:
            shutdown()
        self._shutdowns.clear()


def _names(env: Mapping[str, str], variable: str, signal: str) -> list[str]:
    raw = env.get(variable, "")
    if not raw:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    return [n.strip() for n in raw.split(",") if n.strip() and n.strip() != "none"]


def _resource(env: Mapping[str, str], default_service: str) -> Any:
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, Any] = {}
    for pair in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = value.strip()
    attributes["service.name"] = env.get("OTEL_SERVICE_NAME") or attributes.get(
        "service.name", default_service
    )
    return Resource.create(attributes)


def _protocol(env: Mapping[str, str], signal: str) -> str:
    return (
        env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )


def _otlp(env: Mapping[str, str], signal: str, module: str, cls: str) -> Any:
    protocol = _protocol(env, signal)
    transport = "grpc" if protocol == "grpc" else "http"
    try:
        exporter = importlib.import_module(
            f"opentelemetry.exporter.otlp.proto.{transport}.{module}"
        )
    except ImportError as exc:
        raise ConfigurationError(
            f"the OTLP exporter ({protocol}) is not installed: pip install 'qtasks-stream[otel]'"
        ) from exc
    # It reads its own OTEL_EXPORTER_OTLP_* settings (endpoint, headers, timeout, TLS).
    return getattr(exporter, cls)()


def _span_exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigurationError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}")
    return _otlp(env, "TRACES", "trace_exporter", "OTLPSpanExporter")


def _metric_exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if name != "otlp":
        raise ConfigurationError(f"OTEL_METRICS_EXPORTER: unknown exporter {name!r}")
    return _otlp(env, "METRICS", "metric_exporter", "OTLPMetricExporter")


def telemetry_from_env(
    env: Mapping[str, str], *, service_name: str, messaging_system: str
) -> Telemetry | None:
    """Tracing and metrics interceptors as ``env`` configures them; None when nothing is on."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    span_exporters = [_span_exporter(n, env) for n in _names(env, "OTEL_TRACES_EXPORTER", "TRACES")]
    spans_file = env.get("QTASKS_OTEL_SPANS_FILE", "")
    metric_exporters = [
        _metric_exporter(n, env) for n in _names(env, "OTEL_METRICS_EXPORTER", "METRICS")
    ]
    metrics_file = env.get("QTASKS_OTEL_METRICS_FILE", "")
    if not span_exporters and not spans_file and not metric_exporters and not metrics_file:
        return None
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigurationError(
            "OTEL_* settings need the OpenTelemetry SDK: pip install 'qtasks-stream[otel]'"
        ) from exc
    from qtasks_stream.telemetry.metrics import MetricsInterceptor
    from qtasks_stream.telemetry.tracing import TracingInterceptor

    resource = _resource(env, service_name)
    telemetry = Telemetry()
    if spans_file:
        from qtasks_stream.telemetry.export import JsonLinesSpanExporter

        path = spans_file.replace("{pid}", str(os.getpid()))
        span_exporters.append(JsonLinesSpanExporter(path))
    if span_exporters:
        tracer_provider = TracerProvider(resource=resource)
        for exporter in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        telemetry.interceptors.append(
            TracingInterceptor(tracer_provider, messaging_system=messaging_system)
        )
        telemetry._shutdowns.append(tracer_provider.shutdown)
    if metrics_file:
        from qtasks_stream.telemetry.export import JsonLinesMetricExporter

        path = metrics_file.replace("{pid}", str(os.getpid()))
        metric_exporters.append(JsonLinesMetricExporter(path))
    if metric_exporters:
        readers = [PeriodicExportingMetricReader(e) for e in metric_exporters]
        meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        telemetry.interceptors.append(MetricsInterceptor(meter_provider))
        telemetry._shutdowns.append(meter_provider.shutdown)
    return telemetry
