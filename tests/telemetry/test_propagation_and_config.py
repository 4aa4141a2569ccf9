"""Trace context strings and headers; telemetry built from OTEL_* settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import SpanContext, TraceFlags

from qtasks_stream import QueueTasks
from qtasks_stream.cli.main import telemetry_from
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.events import TRACEPARENT_HEADER, Submitted, TaskEvent, WorkItem
from qtasks_stream.settings import Settings
from qtasks_stream.telemetry import MetricsInterceptor, TracingInterceptor
from qtasks_stream.telemetry.config import telemetry_from_env
from qtasks_stream.telemetry.propagation import (
    context_from_traceparent,
    format_traceparent,
    parse_traceparent,
    trace_id_of,
    traceparent_from_headers,
)

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_traceparent_round_trips() -> None:
    ctx = parse_traceparent(TP)
    assert ctx is not None and ctx.is_remote and ctx.is_valid
    assert ctx.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert ctx.span_id == 0xB7AD6B7169203331
    assert ctx.trace_flags == TraceFlags.SAMPLED
    assert format_traceparent(ctx) == TP
    assert trace_id_of(TP) == "0af7651916cd43dd8448eb211c80319c"
    assert context_from_traceparent(TP) is not None


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
        "00-0af7651916cd43dd8448eb211c80319-cb7ad6b7169203331-01",  # misplaced dash
    ],
)
def test_malformed_traceparents_are_ignored(value: str | None) -> None:
    assert parse_traceparent(value) is None
    assert trace_id_of(value) is None
    assert context_from_traceparent(value) is None


def test_an_invalid_span_context_formats_to_none() -> None:
    assert format_traceparent(SpanContext(0, 0, is_remote=False)) is None


def test_events_and_work_items_put_their_traceparent_in_headers() -> None:
    event = TaskEvent.new("t", "n", 0, "client", Submitted("[]", "{}", 0), traceparent=TP)
    assert traceparent_from_headers(event.record_headers()) == TP
    plain = TaskEvent.new("t", "n", 0, "client", Submitted("[]", "{}", 0))
    assert traceparent_from_headers(plain.record_headers()) is None
    item = WorkItem("t", "n", 1, "[]", "{}", 0, 0, traceparent=TP)
    assert item.record_headers() == ((TRACEPARENT_HEADER, TP.encode()),)
    assert WorkItem("t", "n", 1, "[]", "{}", 0, 0).record_headers() == ()


def test_nothing_set_means_no_telemetry() -> None:
    app = QueueTasks("cfg")
    assert telemetry_from(app, Settings.from_env({})) is None
    assert app.interceptors == []
    assert (
        telemetry_from_env(
            {"OTEL_TRACES_EXPORTER": "none"}, service_name="s", messaging_system="kafka"
        )
        is None
    )


def test_sdk_disabled_wins() -> None:
    env = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert telemetry_from_env(env, service_name="s", messaging_system="kafka") is None


def test_a_spans_file_installs_tracing_only(tmp_path: Path) -> None:
    app = QueueTasks("cfg")
    telemetry = telemetry_from(
        app, Settings.from_env({"QTASKS_OTEL_SPANS_FILE": str(tmp_path / "s-{pid}.jsonl")})
    )
    assert telemetry is not None
    try:
        assert [type(i) for i in app.interceptors] == [TracingInterceptor]
    finally:
        telemetry.shutdown()


def test_an_otlp_endpoint_installs_tracing_and_metrics() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        # Nothing is recorded here; a long interval keeps the reader from exporting.
        "OTEL_METRIC_EXPORT_INTERVAL": "600000",
    }
    telemetry = telemetry_from_env(env, service_name="s", messaging_system="kafka")
    assert telemetry is not None
    assert [type(i) for i in telemetry.interceptors] == [TracingInterceptor, MetricsInterceptor]


def test_unknown_exporters_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="zipkin"):
        telemetry_from_env(
            {"OTEL_TRACES_EXPORTER": "zipkin"}, service_name="s", messaging_system="kafka"
        )
    with pytest.raises(ConfigurationError, match="prometheus"):
        telemetry_from_env(
            {"OTEL_METRICS_EXPORTER": "prometheus"}, service_name="s", messaging_system="kafka"
        )


async def test_files_receive_spans_and_a_final_metrics_export(tmp_path: Path) -> None:
    app = QueueTasks("cfg")

    @app.task
    def double(n: int) -> int:
        return 2 * n

    env = {
        "QTASKS_OTEL_SPANS_FILE": str(tmp_path / "spans-{pid}.jsonl"),
        "QTASKS_OTEL_METRICS_FILE": str(tmp_path / "metrics-{pid}.jsonl"),
        "OTEL_SERVICE_NAME": "cfg-test",
    }
    telemetry = telemetry_from(app, Settings.from_env(env))
    assert telemetry is not None
    assert [type(i) for i in app.interceptors] == [TracingInterceptor, MetricsInterceptor]
    async with app:
        task = await app.add_task("double", 2, timeout=10)
        assert task is not None and task.status == "success"
    telemetry.shutdown()
    spans = _lines(tmp_path, "spans-*.jsonl")
    # Routed by the client: its Scheduled rides on the submit's span.
    assert {"submit double", "execute double"} <= {s["name"] for s in spans}
    assert {s["service"] for s in spans} == {"cfg-test"}
    last = _lines(tmp_path, "metrics-*.jsonl")[-1]
    assert [p["value"] for p in last["qtasks.tasks.succeeded"]] == [1]
    assert last["qtasks.tasks.succeeded"][0]["attributes"] == {"qtasks.task.name": "double"}


def _lines(folder: Path, pattern: str) -> list[dict[str, Any]]:
    (path,) = folder.glob(pattern)  # one process, one file
    return [json.loads(line) for line in path.read_text().splitlines()]
