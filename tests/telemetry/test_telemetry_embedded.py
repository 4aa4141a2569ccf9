"""Tracing and metrics on the embedded default, with the SDK's in-memory exporter and reader."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace import SpanKind, StatusCode

from qtasks_stream import Interceptor, QueueTasks, StepInput, current
from qtasks_stream.events import TRACEPARENT_HEADER, TaskEvent
from qtasks_stream.telemetry import MetricsInterceptor, TracingInterceptor, trace_id_of
from qtasks_stream.telemetry.metrics import COUNTED_KINDS
from qtasks_stream.telemetry.propagation import parse_traceparent

LIMIT = 10.0


class Flaky(Exception):
    pass


class WatchesStarts(SpanProcessor):
    """A processor of the app's own that sees spans start: the interceptor then starts SDK
    spans, not light ones (qtasks_stream.telemetry.spans)."""

    def __init__(self) -> None:
        self.started = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started += 1


@pytest.fixture(params=["light spans", "sdk spans"])
async def traced(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[QueueTasks, InMemorySpanExporter, InMemoryMetricReader]]:
    # Every test of the trace's shape runs on both paths: they must export the same spans.
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    if request.param == "sdk spans":
        tracer_provider.add_span_processor(WatchesStarts())
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    app = QueueTasks("otel", partitions=2, concurrency=4)
    app.add_interceptor(TracingInterceptor(tracer_provider, messaging_system="qtasks.memory"))
    app.add_interceptor(MetricsInterceptor(meter_provider, lag_interval=0.0))

    @app.task(retry=2, retry_on_exc=[Flaky], retry_backoff=0.01)
    async def flaky(n: int) -> int:
        if current().attempt == 1:
            raise Flaky("first attempt fails")
        return n + 1

    @app.task
    async def boom() -> None:
        raise RuntimeError("always")

    @app.task
    def plain(n: int) -> int:
        return n

    try:
        yield app, spans, reader
    finally:
        async with asyncio.timeout(LIMIT):
            await app.close()
        tracer_provider.shutdown()
        meter_provider.shutdown()


def _span_id(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"{ctx.span_id:016x}"


def _trace_id(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"{ctx.trace_id:032x}"


async def test_a_retried_task_is_one_trace_from_submit_to_completion(
    traced: tuple[QueueTasks, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    app, exporter, _ = traced
    async with app:
        task = await app.add_task("flaky", 41, timeout=LIMIT)
        assert task is not None and task.status == "success"
        history = await app.history(task.uuid)

    kinds = [e.kind for e in history]
    assert kinds.count("Started") == 2 and "RetryScheduled" in kinds and "Succeeded" in kinds
    trace_ids = {trace_id_of(e.traceparent) for e in history}
    assert len(trace_ids) == 1 and None not in trace_ids
    trace_id = trace_ids.pop()

    spans = [s for s in exporter.get_finished_spans() if _trace_id(s) == trace_id]
    by_id = {_span_id(s): s for s in spans}
    submit = [s for s in spans if s.name == "submit flaky"]
    assert len(submit) == 1 and submit[0].parent is None
    assert submit[0].kind is SpanKind.PRODUCER
    assert submit[0].attributes is not None
    assert submit[0].attributes["messaging.destination.name"] == app.topology.events
    assert submit[0].attributes["qtasks.task.id"] == task.uuid

    attempts = sorted(
        (s for s in spans if s.name == "execute flaky"),
        key=lambda s: (s.attributes or {})["qtasks.task.attempt"],
    )
    assert [(s.attributes or {})["qtasks.task.attempt"] for s in attempts] == [1, 2]
    first, second = attempts
    lane = app.topology.lane(app.topology.lane_for(0))
    assert first.status.status_code is StatusCode.ERROR
    assert second.status.status_code is StatusCode.UNSET
    for attempt in attempts:
        attributes = attempt.attributes or {}
        assert attempt.kind is SpanKind.CONSUMER
        assert attributes["messaging.system"] == "qtasks.memory"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == lane
        assert attributes["messaging.consumer.group.name"] == app.topology.group("worker")
        assert isinstance(attributes["messaging.kafka.offset"], int)
        assert attributes["messaging.destination.partition.id"] in ("0", "1")
        assert attributes["qtasks.task.name"] == "flaky"
        assert attributes["qtasks.task.id"] == task.uuid
        # Both attempts hang off the task's trace, under its submit.
        assert attempt.parent is not None
        assert by_id[f"{attempt.parent.span_id:016x}"].name in ("submit flaky",)

    # One span per hop: each outcome points at the attempt that delivered it, which has no
    # child spans; Started keeps the work item's context (the submit's), and so does the
    # Scheduled the client wrote in the submit's transaction.
    outcomes = {e.kind: e for e in history if e.kind in ("RetryScheduled", "Succeeded")}
    for kind, attempt in (("RetryScheduled", first), ("Succeeded", second)):
        assert _event_span(outcomes[kind]) == _span_id(attempt)
    for event in history:
        if event.kind in ("Started", "Scheduled"):
            assert _event_span(event) == _span_id(submit[0])
    assert "Scheduled" in kinds
    assert not [
        s
        for s in spans
        if s.kind is SpanKind.PRODUCER
        and s.name.endswith(
            ("Scheduled flaky", "Started flaky", "RetryScheduled flaky", "Succeeded flaky")
        )
    ]
    assert (second.attributes or {})["qtasks.task.status"] == "success"
    # The first event is the submit's; every later one points at a span of the trace.
    assert _event_span(history[0]) == _span_id(submit[0])
    assert {_event_span(e) for e in history} <= set(by_id)


def _event_span(event: TaskEvent) -> str:
    span_context = parse_traceparent(event.traceparent)
    assert span_context is not None
    return f"{span_context.span_id:016x}"


async def test_step_spans_link_the_records_of_their_batch(
    traced: tuple[QueueTasks, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    app, exporter, _ = traced
    task_traces: set[str | None] = set()
    async with app:
        tasks = [await app.add_task("plain", i) for i in range(20)]
        for t in tasks:
            assert t is not None
            done = await app.wait(t.uuid, timeout=LIMIT)
            assert done is not None and done.status == "success"
            task_traces.update(trace_id_of(e.traceparent) for e in await app.history(t.uuid))
    assert len(task_traces) == 20 and None not in task_traces
    steps = [s for s in exporter.get_finished_spans() if s.name.startswith("process ")]
    stages = {(s.attributes or {})["qtasks.stage"] for s in steps}
    assert {"scheduler", "worker", "projector"} <= stages
    for step in steps:
        attributes = step.attributes or {}
        assert step.parent is None and step.kind is SpanKind.CONSUMER
        assert attributes["messaging.batch.message_count"] >= 1
        assert attributes["messaging.consumer.group.name"] == app.topology.group(
            str(attributes["qtasks.stage"])
        )
        assert len(step.links) >= 1
    linked = {f"{link.context.trace_id:032x}" for s in steps for link in s.links}
    assert task_traces <= linked
    # Batches are one span each, not one per record.
    worker_steps = [s for s in steps if (s.attributes or {})["qtasks.stage"] == "worker"]
    assert sum((s.attributes or {})["messaging.batch.message_count"] for s in worker_steps) == 20


async def test_records_carry_the_traceparent_header(
    traced: tuple[QueueTasks, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    app, _, _ = traced
    seen: list[tuple[str, str | None]] = []

    class Headers(Interceptor):
        async def step(self, input: StepInput, next: Any) -> None:
            for rec in input.records:
                value = dict(rec.headers).get(TRACEPARENT_HEADER)
                seen.append((rec.topic, value.decode() if value else None))
            await next(input)

    app.add_interceptor(Headers())
    async with app:
        task = await app.add_task("plain", 1, timeout=LIMIT)
        assert task is not None
        history = await app.history(task.uuid)
    topics = {topic for topic, value in seen if value is not None}
    assert app.topology.events in topics and app.topology.lane(app.topology.lane_for(0)) in topics
    assert all(value is not None for _, value in seen)
    assert {e.traceparent for e in history} <= {value for _, value in seen}


def _sums(reader: InMemoryMetricReader) -> dict[str, Counter[str]]:
    data = reader.get_metrics_data()
    assert data is not None
    sums: dict[str, Counter[str]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                counts = sums.setdefault(metric.name, Counter())
                for point in metric.data.data_points:  # type: ignore[union-attr]
                    name = str((point.attributes or {}).get("qtasks.task.name", ""))
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count  # type: ignore[union-attr]
                    counts[name] += value
    return sums


async def test_metric_counts_match_the_events_in_the_log(
    traced: tuple[QueueTasks, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    app, _, reader = traced
    async with app:
        submitted = [await app.add_task("flaky", i) for i in range(6)]
        submitted += [await app.add_task("boom") for _ in range(3)]
        submitted += [await app.add_task("plain", i) for i in range(5)]
        histories: list[TaskEvent] = []
        for t in submitted:
            assert t is not None
            done = await app.wait(t.uuid, timeout=LIMIT)
            assert done is not None and done.final
            histories += await app.history(t.uuid)
    sums = _sums(reader)
    expected: dict[str, Counter[str]] = {}
    for event in histories:
        counter = COUNTED_KINDS.get(event.kind)
        if counter is not None:
            expected.setdefault(f"qtasks.tasks.{counter}", Counter())[event.task_name] += 1
    assert expected["qtasks.tasks.submitted"] == Counter(flaky=6, boom=3, plain=5)
    assert expected["qtasks.tasks.retried"] == Counter(flaky=6)
    for name, counts in expected.items():
        assert sums[name] == counts, name
    attempts = Counter(e.task_name for e in histories if e.kind == "Started")
    assert sums["qtasks.task.duration"] == attempts
    assert sums["qtasks.task.queue_wait"] == attempts
    # Every attempt ended: nothing in flight.
    assert sum(sums["qtasks.worker.in_flight"].values()) == 0
    assert "qtasks.consumer.lag" in sums


async def test_without_interceptors_emits_take_the_direct_path() -> None:
    app = QueueTasks("plain")

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    async with app:
        task = await app.add_task("add", 1, 2, timeout=LIMIT)
        assert task is not None and task.status == "success"
        assert all(r.checkpoint._emit_chain is None for r in app.runners.values())
        history = await app.history(task.uuid)
    assert all(e.traceparent is None for e in history)


async def _unsampled_run(sampler: Sampler) -> tuple[list[ReadableSpan], list[str | None], bool]:
    """One task under ``sampler`` (whose root decision drops every trace): the spans
    exported, its events' traceparents, and whether a span its own code starts records."""
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = QueueTasks("unsampled", partitions=2, concurrency=2)
    app.add_interceptor(TracingInterceptor(provider, messaging_system="qtasks.memory"))
    inner: list[bool] = []

    @app.task
    async def work(n: int) -> int:
        with provider.get_tracer("user").start_as_current_span("inside") as span:
            inner.append(span.is_recording())
        return n

    try:
        async with app:
            # An idempotency key sends it through the scheduler, whose Scheduled has a span.
            task = await app.add_task("work", 1, timeout=LIMIT, idempotency_key="unsampled")
            assert task is not None and task.status == "success"
            history = await app.history(task.uuid)
    finally:
        provider.shutdown()
    return list(spans.get_finished_spans()), [e.traceparent for e in history], inner[0]


async def test_an_unsampled_task_starts_no_span_and_keeps_its_submit_traceparent() -> None:
    # The SDK's parent-based sampler drops children of an unsampled trace: no span is
    # started for them, every event carries the trace the submit began (unsampled), and the
    # task's own spans join it unrecorded.
    spans, traceparents, inner_recorded = await _unsampled_run(ParentBased(ALWAYS_OFF))
    assert spans == []
    assert len(set(traceparents)) == 1
    (value,) = set(traceparents)
    assert value is not None and int(value[-2:], 16) & 1 == 0  # not sampled
    assert not inner_recorded


async def test_a_sampler_recording_children_of_unsampled_traces_still_gets_their_spans() -> None:
    spans, traceparents, _ = await _unsampled_run(
        ParentBased(ALWAYS_OFF, remote_parent_not_sampled=ALWAYS_ON)
    )
    kinds = {span.kind for span in spans}
    assert SpanKind.PRODUCER in kinds and SpanKind.CONSUMER in kinds
    assert len(set(traceparents)) > 1
    assert all(
        span.attributes and "qtasks.task.id" in span.attributes
        for span in spans
        if span.kind == SpanKind.PRODUCER
    )


async def test_spans_name_the_task_id_once_not_again_as_the_record_key(
    traced: tuple[QueueTasks, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    # Every task's record is keyed by its task id: the key attribute would repeat
    # qtasks.task.id, and each attribute costs the SDK a check per span.
    app, exporter, _ = traced
    async with app:
        task = await app.add_task("plain", 1, timeout=LIMIT)
        assert task is not None and task.status == "success"
    task_spans = [
        s for s in exporter.get_finished_spans() if "qtasks.task.id" in (s.attributes or {})
    ]
    assert {s.kind for s in task_spans} == {SpanKind.PRODUCER, SpanKind.CONSUMER}
    assert all("messaging.kafka.message.key" not in (s.attributes or {}) for s in task_spans)


@pytest.mark.parametrize("path", ["light spans", "sdk spans"])
async def test_task_code_annotates_its_attempt_span_and_starts_children_of_it(path: str) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    watcher = WatchesStarts()
    if path == "sdk spans":
        provider.add_span_processor(watcher)
    app = QueueTasks("annotated", partitions=1, concurrency=2)
    app.add_interceptor(TracingInterceptor(provider, messaging_system="qtasks.memory"))

    @app.task
    async def work(n: int) -> int:
        attempt = trace.get_current_span()
        attempt.set_attribute("user.items", [n, n + 1])
        attempt.add_event("halfway", {"n": n})
        with provider.get_tracer("user").start_as_current_span("inner"):
            pass
        return n

    try:
        async with app:
            task = await app.add_task("work", 7, timeout=LIMIT)
            assert task is not None and task.status == "success"
    finally:
        provider.shutdown()
    finished = spans.get_finished_spans()
    (attempt,) = [s for s in finished if s.name == "execute work"]
    (inner,) = [s for s in finished if s.name == "inner"]
    attributes = attempt.attributes or {}
    assert attributes["user.items"] == (7, 8) and attributes["qtasks.task.status"] == "success"
    assert [(e.name, dict(e.attributes or {})) for e in attempt.events] == [("halfway", {"n": 7})]
    assert inner.parent is not None and inner.parent.span_id == _span_id_int(attempt)
    # The SDK path starts every span through the SDK, so a processor sees each start.
    assert watcher.started == (len(finished) if path == "sdk spans" else 0)


def _span_id_int(span: ReadableSpan) -> int:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.span_id


async def test_the_workers_emits_skip_the_tracing_interceptor() -> None:
    # The worker's events carry its attempt's context and get no span: its runner keeps
    # the direct emit path, with no input built per event; the scheduler's is wrapped.
    provider = TracerProvider()
    app = QueueTasks("direct", partitions=1)
    app.add_interceptor(TracingInterceptor(provider, messaging_system="qtasks.memory"))

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    try:
        async with app:
            task = await app.add_task("add", 1, 2, timeout=LIMIT)
            assert task is not None and task.status == "success"
            assert app.runners["worker"].checkpoint._emit_chain is None
            assert app.runners["scheduler"].checkpoint._emit_chain is not None
            history = await app.history(task.uuid)
    finally:
        provider.shutdown()
    # Its events still carry the trace.
    assert all(e.traceparent is not None for e in history)
