"""``TracingInterceptor``: one trace per task, across stages, processes and restarts.

The client's submit span starts the task's trace; its context goes into the ``Submitted``
event and the record's ``traceparent`` header. The scheduler copies it into every decision
and work item. One span per hop of the task: each event the client or the scheduler emits
gets a short producer span ("create", in the messaging conventions), a child of the task's
trace, and the event keeps that span's context; each attempt is one consumer span, and the
events the worker emits for it (``Started``, the outcome) carry the attempt's context (or,
``Started``, the work item's) instead of a span each: a span costs the SDK about as much as
a no-op task's whole hop. Likewise the ``Scheduled`` a client writes in its submit's
transaction (a task due now, routed straight to its lane) keeps the submit's context.
Retries keep the task's trace. A stage step handles a batch of
many tasks: its span starts a trace of its own and links to the records' contexts instead
of joining one of them.

Spans are light (:mod:`qtasks_stream.telemetry.spans`: the sampler decides first, then the
exporters' ``ReadableSpan`` is built directly at end) where the provider's processors look
only at ended spans, as the SDK's batch and simple processors do; otherwise they are the
SDK's, with the same names, parents, links and attributes. Attributes and links are built
only for spans the sampler records. With the SDK's parent-based sampler (its default) a task
whose trace was not sampled at submit costs no span at all downstream: its events keep the
submit's ``traceparent`` (flags unsampled), and an attempt runs in that context, so spans
the task's own code starts are not recorded either.

The tracer provider is passed in; nothing here touches the global providers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TracerProvider,
)

from qtasks_stream.events import Progress, TaskEvent
from qtasks_stream.interceptors import (
    EmitInput,
    EmitNext,
    ExecuteInput,
    ExecuteNext,
    Interceptor,
    StepInput,
    StepNext,
)
from qtasks_stream.telemetry.propagation import (
    format_traceparent,
    is_unsampled,
    parse_traceparent,
    traceparent_from_headers,
    unsampled_context,
)
from qtasks_stream.telemetry.spans import LightSpan, LightTracer

__all__ = ["TracingInterceptor"]

_SCOPE = "qtasks_stream"
#: The stage whose events get no span of their own: its attempt span is its hop's span.
_WORKER = "worker"

#: The task status an event leaves behind (as ``Task.status`` reports it).
STATUS_AFTER = {
    "Submitted": "new",
    "Scheduled": "scheduled",
    "Released": "scheduled",
    "Started": "process",
    "Succeeded": "success",
    "Failed": "error",
    "RetryScheduled": "retry",
    "CancelRequested": "cancel_requested",
    "Cancelled": "cancel",
    "TimedOut": "timeout",
    "DeadLettered": "dead_letter",
}
_ERROR_KINDS = frozenset({"Failed", "TimedOut", "DeadLettered"})


class TracingInterceptor(Interceptor):
    """Spans for submits, events, attempts and stage steps.

    Args:
        tracer_provider: where spans go (an SDK ``TracerProvider`` with your exporters).
        messaging_system: ``messaging.system`` on every span; ``kafka`` for the Kafka logs.
        max_links: links per step span at most (32: each costs the SDK a few microseconds,
            and a batch under load holds hundreds of records; the SDK keeps 128 at most).
    """

    #: The worker's events ride on its attempt's span (or the work item's context): its
    #: emits skip this interceptor (no input built for them).
    passes_emits_of = frozenset({_WORKER})

    def __init__(
        self,
        tracer_provider: TracerProvider,
        *,
        messaging_system: str = "kafka",
        max_links: int = 32,
    ) -> None:
        self._tracer = tracer_provider.get_tracer(_SCOPE)
        self._system = messaging_system
        self._max_links = max_links
        self._skip_unsampled = _drops_unsampled_children(tracer_provider)
        # Spans built as the SDK's exporters read them, where the provider allows it.
        self._light = LightTracer.of(tracer_provider, self._tracer, max_links)

    async def execute(self, input: ExecuteInput, next: ExecuteNext) -> Any:
        item = input.item
        unsampled = unsampled_context(item.traceparent) if self._skip_unsampled else None
        if unsampled is not None:
            # The sampler would drop this span: run in the task's (unsampled) context.
            input.ctx.traceparent = item.traceparent
            token = otel_context.attach(unsampled)
            try:
                return await next(input)
            finally:
                otel_context.detach(token)
        span = self._start(
            f"execute {item.task_name}",
            _parent(item.traceparent),
            SpanKind.CONSUMER,
            self._execute_attributes,
            input,
        )
        # Current while the task runs: the spans its code starts are children of it.
        token = otel_context.attach(trace.set_span_in_context(span))
        recording = span.is_recording()
        # The outcome event (and progress) carry this attempt's context.
        input.ctx.traceparent = format_traceparent(span.get_span_context())
        try:
            result = await next(input)
        except asyncio.CancelledError:
            if recording:
                span.set_attribute("qtasks.task.status", "cancel")
            raise
        except BaseException as exc:
            if recording:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_attribute("qtasks.task.status", "error")
            raise
        else:
            if recording:
                span.set_attribute("qtasks.task.status", "success")
            return result
        finally:
            otel_context.detach(token)
            span.end()

    def _start(
        self,
        name: str,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Callable[..., dict[str, Any]],
        *args: Any,
    ) -> Span:
        """A span that is not yet current, child of ``parent`` (None: a root): a light one
        where the provider allows it, its attributes built only if it records; else the SDK's,
        its attributes given at start in one dict (the SDK checks them in one pass there; a
        set_attributes call afterwards takes a lock per attribute, about 1.5x the cost).
        ``attributes(*args)`` builds them (a method and its arguments: no closure per span)."""
        light = self._light
        if light is not None and light.active():
            span = light.start(name, parent, kind)
            if type(span) is LightSpan:
                span.adopt(attributes(*args))
            return span
        return self._tracer.start_span(
            name,
            context=otel_context.Context()
            if parent is None
            else trace.set_span_in_context(NonRecordingSpan(parent)),
            kind=kind,
            attributes=attributes(*args),
            record_exception=False,
            set_status_on_exception=False,
        )

    def _execute_attributes(self, input: ExecuteInput) -> dict[str, Any]:
        item = input.item
        attributes: dict[str, Any] = {
            "messaging.system": self._system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "execute",
            "messaging.consumer.group.name": input.group,
            # A work item's key is its task id: qtasks.task.id says it once.
            "qtasks.task.id": item.task_id,
            "qtasks.task.name": item.task_name,
            "qtasks.task.attempt": item.attempt,
            "qtasks.worker.id": input.worker_id,
        }
        rec = input.record
        if rec is not None:
            attributes["messaging.destination.name"] = rec.topic
            attributes["messaging.destination.partition.id"] = str(rec.partition)
            attributes["messaging.kafka.offset"] = rec.offset
        return attributes

    async def step(self, input: StepInput, next: StepNext) -> None:
        records = input.records
        topics = sorted({rec.topic for rec in records})
        name = f"process {topics[0]}" if len(topics) == 1 else f"process {input.stage}"
        # A batch belongs to no one task: a new trace, linked to each record's.
        span = self._start(name, None, SpanKind.CONSUMER, self._step_attributes, input, topics)
        if span.is_recording():
            # Links after the sampler's decision: parsing a batch's headers is skipped for a
            # span nobody records.
            links = self._links(records)
            if isinstance(span, LightSpan):
                span.link_all(links)
            else:
                for link in links:
                    span.add_link(link.context)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            await next(input)
        finally:
            otel_context.detach(token)
            span.end()

    def _step_attributes(self, input: StepInput, topics: list[str]) -> dict[str, Any]:
        records = input.records
        attributes: dict[str, Any] = {
            "messaging.system": self._system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.consumer.group.name": input.group,
            "messaging.batch.message_count": len(records),
            "qtasks.stage": input.stage,
        }
        if len(topics) == 1:
            attributes["messaging.destination.name"] = topics[0]
            partitions = {rec.partition for rec in records}
            if len(partitions) == 1:
                attributes["messaging.destination.partition.id"] = str(partitions.pop())
        return attributes

    def _links(self, records: Any) -> list[Link]:
        links: list[Link] = []
        seen: set[str] = set()
        for rec in records:
            if len(links) >= self._max_links:
                break
            value = traceparent_from_headers(rec.headers)
            if value is None or value in seen:
                continue
            seen.add(value)
            span_context = parse_traceparent(value)
            if span_context is not None:
                links.append(Link(span_context))
        return links

    def emit(self, input: EmitInput, next: EmitNext) -> None:
        event = input.value
        stage = input.stage
        if (
            not isinstance(event, TaskEvent)
            or isinstance(event.payload, Progress)
            or (stage == "client" and event.kind == "Scheduled")
        ):
            # (The worker's events never get here: see passes_emits_of.) A task the client
            # routes straight to its lane has its Scheduled written in the submit's
            # transaction, and it keeps the submit span's context; work items and commands
            # keep the task's context.
            next(input)
            return
        if self._skip_unsampled and is_unsampled(event.traceparent):
            # The sampler would drop this span: the event keeps the task's traceparent.
            next(input)
            return
        kind = event.kind
        client = stage == "client"
        name = f"{'submit' if client and kind == 'Submitted' else kind} {event.task_name}"
        # The task's trace if the event has one; a client's submit joins the caller's span.
        span = self._start(
            name.rstrip(),
            _parent(event.traceparent),
            SpanKind.PRODUCER,
            self._emit_attributes,
            input,
            event,
            client,
        )
        try:
            if kind in _ERROR_KINDS and span.is_recording():
                span.set_status(Status(StatusCode.ERROR, _reason(event)))
            # Built directly: dataclasses.replace costs several times more, per event.
            stamped = TaskEvent(
                event.task_id,
                event.task_name,
                event.attempt,
                event.source,
                event.payload,
                event.at_us,
                event.event_id,
                format_traceparent(span.get_span_context()),
            )
            next(EmitInput(input.stage, input.topic, input.key, stamped, input.origin))
        finally:
            span.end()

    def _emit_attributes(self, input: EmitInput, event: TaskEvent, client: bool) -> dict[str, Any]:
        kind = event.kind
        attributes: dict[str, Any] = {
            "messaging.system": self._system,
            "messaging.operation.type": "create",
            "messaging.operation.name": ("submit" if kind == "Submitted" else "cancel")
            if client
            else kind,
            "messaging.destination.name": input.topic,
            "qtasks.stage": input.stage,
            "qtasks.task.id": event.task_id,
            "qtasks.task.name": event.task_name,
            "qtasks.task.attempt": event.attempt,
            "qtasks.task.status": STATUS_AFTER.get(kind, ""),
        }
        if input.key != event.task_id:
            # An event's key is its task id (qtasks.task.id) but on a topic keyed otherwise.
            attributes["messaging.kafka.message.key"] = input.key
        origin = input.origin
        if origin is not None:
            # The record this event answers (a work item for an outcome).
            attributes["qtasks.origin"] = f"{origin.topic}/{origin.partition}/{origin.offset}"
        return attributes


def _parent(traceparent: str | None) -> SpanContext | None:
    """The span a new span is a child of: the one ``traceparent`` names, else the current
    span (a caller's, around a submit), else None (a root)."""
    parent = parse_traceparent(traceparent)
    if parent is None:
        parent = trace.get_current_span().get_span_context()
        if not parent.is_valid:
            return None
    return parent


def _drops_unsampled_children(provider: TracerProvider) -> bool:
    """Whether ``provider``'s sampler drops every span whose remote parent is unsampled
    (the SDK's ParentBased, its default, does): then such spans need not be started."""
    sampler = getattr(provider, "sampler", None)
    if not isinstance(sampler, ParentBased):
        return False
    # No public accessor: the SDK keeps ParentBased's delegates in these attributes.
    child = getattr(sampler, "_remote_parent_not_sampled", None)
    return isinstance(child, StaticSampler) and getattr(child, "_decision", None) is Decision.DROP


def _reason(event: TaskEvent) -> str:
    payload = event.payload
    for name in ("message", "reason"):
        value = getattr(payload, name, None)
        if isinstance(value, str) and value:
            return value[:200]
    return event.kind
