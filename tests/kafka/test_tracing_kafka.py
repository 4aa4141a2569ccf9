"""One trace per task across processes, on the real broker.

A task fails its first attempt in one ``qtasks-stream worker`` process; that process is
stopped during the retry's backoff and a second one runs attempt 2. Each worker writes its
spans to its own JSON-lines file (``QTASKS_OTEL_SPANS_FILE``, wired by the CLI); the test
process submits with an in-memory exporter and merges everything: one trace holds the
submit, both attempts in their two processes, the retry and the completion.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from qtasks_stream.settings import Settings
from qtasks_stream.telemetry import MetricsInterceptor, TracingInterceptor, trace_id_of
from qtasks_stream.telemetry.export import metrics_to_dict, span_to_dict
from qtasks_stream.telemetry.propagation import parse_traceparent
from tests.apps.otel_app import build
from tests.processes import stop_processes

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
APP = "tests.apps.otel_app:app"


def _env(kind: str, bootstrap: str, prefix: str, spans: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QTASKS_", "OTEL_"))}
    env.update(
        QTASKS_BOOTSTRAP_SERVERS=bootstrap,
        QTASKS_EVENT_LOG=kind,
        QTASKS_TOPIC_PREFIX=prefix,
        QTASKS_TRANSACTION_TIMEOUT_MS="10000",
        QTASKS_OTEL_SPANS_FILE=str(spans / "spans-{pid}.jsonl"),
        QTASKS_OTEL_METRICS_FILE=str(spans / "metrics-{pid}.jsonl"),
        OTEL_SERVICE_NAME="otel-test-worker",
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    registry = os.environ.get("QTASKS_TEST_SCHEMA_REGISTRY_URL")
    if registry:
        env["QTASKS_SCHEMA_REGISTRY_URL"] = registry
    return env


def _spawn(env: dict[str, str], logs: Path, n: int) -> subprocess.Popen[bytes]:
    with open(logs / f"worker-{n}.log", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qtasks_stream", "-v", "worker", "-A", APP],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _metric_totals(folder: Path, client: InMemoryMetricReader) -> Counter[str]:
    """Sum of every counter and of every histogram's count, over the client and workers."""
    exports = []
    for path in folder.glob("metrics-*.jsonl"):
        lines = [line for line in path.read_text().splitlines() if line]
        exports.append(json.loads(lines[-1]))  # cumulative: the last export is the total
    data = client.get_metrics_data()
    assert data is not None
    exports.append(metrics_to_dict(data))
    totals: Counter[str] = Counter()
    for export in exports:
        for name, points in export.items():
            for point in points:
                totals[name] += point["count"] if "count" in point else point["value"]
    return totals


def _file_spans(folder: Path) -> dict[int, list[dict[str, Any]]]:
    """Spans per worker process id, from the files the workers wrote."""
    spans: dict[int, list[dict[str, Any]]] = {}
    for path in folder.glob("spans-*.jsonl"):
        pid = int(path.stem.split("-")[1])
        spans[pid] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return spans


@pytest.mark.parametrize("kind", ["confluent", "aiokafka"])
async def test_a_retried_task_is_one_trace_and_counted_once_across_two_worker_processes(
    kind: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = f"otel{uuid.uuid4().hex[:8]}."
    env = _env(kind, kafka_bootstrap, prefix, tmp_path)
    client_spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(client_spans))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    client = build().configure(Settings.from_env(env))
    client.add_interceptor(TracingInterceptor(provider))
    client.add_interceptor(MetricsInterceptor(meters))

    first = _spawn(env, tmp_path, 1)
    second: subprocess.Popen[bytes] | None = None
    try:
        submitted = await client.add_task("flaky", 41)
        assert submitted is not None
        task_id = submitted.uuid
        # Attempt 1 fails in the first worker; stop it while the retry waits its backoff.
        deadline = time.monotonic() + 90
        while not any(e.kind == "RetryScheduled" for e in await client.history(task_id)):
            assert time.monotonic() < deadline, "attempt 1 never failed"
            assert first.poll() is None, (tmp_path / "worker-1.log").read_text()[-3000:]
            await asyncio.sleep(0.2)
        stop_processes([first])
        second = _spawn(env, tmp_path, 2)
        done = await client.wait(task_id, timeout=90)
        assert done is not None and done.status == "success", done
        history = await client.history(task_id)
        command = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "qtasks_stream", "history", task_id, "-A", APP],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, _ = await command.communicate()
        assert command.returncode == 0
        printed = out.decode()
    finally:
        stop_processes([first])
        if second is not None:
            stop_processes([second])
        await client.close()
        provider.shutdown()

    totals = _metric_totals(tmp_path, reader)
    meters.shutdown()
    kinds = Counter(e.kind for e in history)
    assert kinds["Started"] == 2
    assert totals["qtasks.tasks.submitted"] == kinds["Submitted"] == 1
    assert totals["qtasks.tasks.retried"] == kinds["RetryScheduled"] == 1
    assert totals["qtasks.tasks.succeeded"] == kinds["Succeeded"] == 1
    assert totals["qtasks.tasks.failed"] == kinds["Failed"] + kinds["TimedOut"] == 0
    assert totals["qtasks.task.duration"] == totals["qtasks.task.queue_wait"] == 2
    assert totals["qtasks.worker.in_flight"] == 0

    trace_ids = {trace_id_of(e.traceparent) for e in history}
    assert len(trace_ids) == 1 and None not in trace_ids, history
    trace_id = trace_ids.pop()
    assert f"trace {trace_id}" in printed.splitlines()[0]

    per_pid = _file_spans(tmp_path)
    assert set(per_pid) == {first.pid, second.pid}, sorted(per_pid)
    spans = [span_to_dict(s) for s in client_spans.get_finished_spans()]
    for pid_spans in per_pid.values():
        spans += pid_spans
    in_trace = [s for s in spans if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in in_trace}

    (submit,) = [s for s in in_trace if s["name"] == "submit flaky"]
    assert submit["parent_span_id"] is None and submit["kind"] == "PRODUCER"
    assert submit["attributes"]["messaging.system"] == "kafka"
    assert submit["attributes"]["messaging.destination.name"] == client.topology.events

    attempts = {
        s["attributes"]["qtasks.task.attempt"]: s for s in in_trace if s["name"] == "execute flaky"
    }
    assert sorted(attempts) == [1, 2]
    lane = client.topology.lane(client.topology.lane_for(0))
    for number, pid in ((1, first.pid), (2, second.pid)):
        span = attempts[number]
        attributes = span["attributes"]
        assert span in per_pid[pid], f"attempt {number} not traced by worker {pid}"
        assert span["kind"] == "CONSUMER" and span["service"] == "otel-test-worker"
        assert attributes["messaging.system"] == "kafka"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == lane
        assert attributes["messaging.destination.partition.id"] in ("0", "1")
        assert isinstance(attributes["messaging.kafka.offset"], int)
        assert attributes["messaging.consumer.group.name"] == client.topology.group("worker")
        assert attributes["qtasks.task.id"] == task_id
        assert attributes["qtasks.task.name"] == "flaky"
        assert f"-{pid}-" in attributes["qtasks.worker.id"]
        assert span["parent_span_id"] == submit["span_id"]
    assert (
        attempts[1]["status"] == "ERROR"
        and attempts[1]["attributes"]["qtasks.task.status"] == "error"
    )
    assert attempts[2]["attributes"]["qtasks.task.status"] == "success"

    # Every event points at a span of the trace; outcomes at spans under their attempt.
    for event in history:
        span_context = parse_traceparent(event.traceparent)
        assert span_context is not None
        assert f"{span_context.span_id:016x}" in by_id, event
    outcomes = {e.kind: e for e in history if e.kind in ("RetryScheduled", "Succeeded")}
    for kind_, number in (("RetryScheduled", 1), ("Succeeded", 2)):
        # One span per hop: the outcome points at the attempt that delivered it.
        span_context = parse_traceparent(outcomes[kind_].traceparent)
        assert span_context is not None
        assert f"{span_context.span_id:016x}" == attempts[number]["span_id"]
    released = [s for s in in_trace if s["name"] == "Released flaky"]
    assert len(released) == 1 and released[0] in per_pid[second.pid]
