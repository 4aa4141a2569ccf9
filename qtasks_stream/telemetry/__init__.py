"""OpenTelemetry for qtasks-stream: tracing and metrics interceptors, trace context helpers.

Install the interceptors on an app with providers you built::

    app.add_interceptor(TracingInterceptor(tracer_provider))
    app.add_interceptor(MetricsInterceptor(meter_provider))

The CLI builds them from ``OTEL_*`` settings (:mod:`qtasks_stream.telemetry.config`).
"""

from qtasks_stream.telemetry.metrics import MetricsInterceptor
from qtasks_stream.telemetry.propagation import trace_id_of
from qtasks_stream.telemetry.tracing import TracingInterceptor

__all__ = ["MetricsInterceptor", "TracingInterceptor", "trace_id_of"]
