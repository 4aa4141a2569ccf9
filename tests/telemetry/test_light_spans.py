"""Light spans (qtasks_stream.telemetry.spans): what they export is what the SDK's spans export,
they sample as the SDK does, and they are used only where the provider allows it."""

from __future__ import annotations

import random
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from qtasks_stream.telemetry.spans import LightSpan, LightTracer, _sampled

PARENT = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1))
OTHER = SpanContext(0x1AF7651916CD43DD8448EB211C80319C, 0xC7AD6B7169203331, True, TraceFlags(1))


def _provider(sampler: Sampler | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "light"}),
        **({} if sampler is None else {"sampler": sampler}),
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _annotate(span: Span) -> None:
    """What a task's code may do to its attempt's span."""
    span.set_attribute("user.count", 3)
    span.set_attribute("user.list", [1, 2])
    span.set_attribute("qtasks.task.attempt", 2)  # replaces one given at start
    span.set_attributes({"user.flag": True, "user.ratio": 0.5})
    span.add_event("progress", {"n": 1})
    span.record_exception(ValueError("boom"), escaped=True)
    span.set_status(Status(StatusCode.ERROR, "failed"))
    span.set_status(StatusCode.UNSET)  # changes nothing, as on an SDK span
    span.add_link(OTHER, {"why": "batch"})
    span.update_name("execute renamed")


def _shape(span: ReadableSpan) -> dict[str, Any]:
    context = span.context
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind,
        "parent": span.parent,
        "trace_id": context.trace_id,
        "flags": context.trace_flags,
        "remote": context.is_remote,
        "attributes": dict(span.attributes or {}),
        "attribute order": list(span.attributes or {}),
        "events": [(e.name, dict(e.attributes or {})) for e in span.events],
        "links": [(link.context, dict(link.attributes or {})) for link in span.links],
        "status": (span.status.status_code, span.status.description),
        "resource": span.resource.attributes,
        "scope": span.instrumentation_scope,
        "timed": span.start_time is not None
        and span.end_time is not None
        and span.start_time <= span.end_time,
    }


def test_a_light_span_exports_what_an_sdk_span_exports() -> None:
    attributes = {"messaging.system": "kafka", "qtasks.task.id": "t1", "qtasks.task.attempt": 1}
    sdk_provider, sdk_exporter = _provider()
    sdk_span = sdk_provider.get_tracer("qtasks_stream").start_span(
        "execute work",
        context=trace.set_span_in_context(NonRecordingSpan(PARENT)),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    )
    _annotate(sdk_span)
    sdk_span.end()

    provider, exporter = _provider()
    light = LightTracer.of(provider, provider.get_tracer("qtasks_stream"), 32)
    assert light is not None and light.active()
    span = light.start("execute work", PARENT, SpanKind.CONSUMER)
    assert isinstance(span, LightSpan)
    span.adopt(dict(attributes))
    _annotate(span)
    span.end()
    assert not span.is_recording()
    span.set_attribute("late", 1)  # ignored once ended, as on an SDK span

    (expected,) = sdk_exporter.get_finished_spans()
    (got,) = exporter.get_finished_spans()
    assert _shape(got) == _shape(expected)
    assert got.attributes is not None and got.attributes["user.list"] == (1, 2)


def test_light_spans_sample_as_the_sdk_samples() -> None:
    rng = random.Random(16)
    parents: list[SpanContext | None] = [None]
    for remote in (True, False):
        for flags in (0, 1, 2, 3):
            parents.append(SpanContext(PARENT.trace_id, PARENT.span_id, remote, TraceFlags(flags)))
    samplers: list[Sampler] = [
        ALWAYS_ON,
        ALWAYS_OFF,
        TraceIdRatioBased(0.25),
        ParentBased(TraceIdRatioBased(0.5)),
        ParentBased(ALWAYS_OFF, remote_parent_not_sampled=ALWAYS_ON),
        ParentBased(ALWAYS_ON, local_parent_sampled=ALWAYS_OFF),
    ]
    for sampler in samplers:
        for parent in parents:
            context = (
                None if parent is None else trace.set_span_in_context(NonRecordingSpan(parent))
            )
            for _ in range(50):
                trace_id = parent.trace_id if parent is not None else rng.getrandbits(128)
                expected = sampler.should_sample(context, trace_id, "x").decision.is_sampled()
                assert _sampled(sampler, parent, trace_id) is expected, (sampler, parent)


def test_an_unsampled_light_span_has_the_context_the_sdk_would_give_it() -> None:
    provider, exporter = _provider(ParentBased(ALWAYS_OFF))
    light = LightTracer.of(provider, provider.get_tracer("qtasks_stream"), 32)
    assert light is not None
    root = light.start("submit work", None, SpanKind.PRODUCER)
    assert not root.is_recording() and not isinstance(root, LightSpan)
    context = root.get_span_context()
    assert context.is_valid and not context.trace_flags.sampled
    sdk_root = provider.get_tracer("sdk").start_span("submit work")
    assert int(context.trace_flags) == int(sdk_root.get_span_context().trace_flags)
    child = light.start("execute work", context, SpanKind.CONSUMER)
    assert child.get_span_context().trace_id == context.trace_id
    assert exporter.get_finished_spans() == ()


class _WatchesStarts(SpanProcessor):
    def __init__(self) -> None:
        self.started = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started += 1


@pytest.mark.parametrize(
    ("build", "light"),
    [
        (lambda p: p.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter())), True),
        (lambda p: p.add_span_processor(BatchSpanProcessor(InMemorySpanExporter())), True),
        (lambda p: p.add_span_processor(_WatchesStarts()), False),
    ],
)
def test_light_spans_only_where_processors_see_nothing_but_ended_spans(
    build: Any, light: bool
) -> None:
    provider = TracerProvider()
    tracer = LightTracer.of(provider, provider.get_tracer("qtasks_stream"), 32)
    assert tracer is not None and tracer.active()
    build(provider)
    # A processor added after the interceptor was built counts too.
    assert tracer.active() is light
    provider.shutdown()


@pytest.mark.parametrize(
    "provider",
    [
        TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1))),
        TracerProvider(span_limits=SpanLimits(max_span_attribute_length=10)),
        TracerProvider(span_limits=SpanLimits(max_span_attributes=4)),
        TracerProvider(span_limits=SpanLimits(max_links=2)),
        TracerProvider(sampler=ParentBased(ALWAYS_ON, remote_parent_sampled=ALWAYS_ON)),
    ],
)
def test_light_spans_only_where_the_sdk_would_change_nothing(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("qtasks_stream")
    limits = provider._span_limits
    expected = limits.max_span_attribute_length is None and (limits.max_span_attributes or 0) >= 16
    expected = expected and (limits.max_links is None or limits.max_links >= 32)
    assert (LightTracer.of(provider, tracer, 32) is not None) is expected


def test_a_sampler_of_its_own_keeps_sdk_spans() -> None:
    class Mine(Sampler):
        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            return ALWAYS_ON.should_sample(*args, **kwargs)

        def get_description(self) -> str:
            return "mine"

    provider = TracerProvider(sampler=ParentBased(Mine()))
    assert LightTracer.of(provider, provider.get_tracer("qtasks_stream"), 32) is None
