"""Light spans: the SDK's ``ReadableSpan`` built directly, for the SDK's own span processors.

An SDK span costs 40-55 us to start and end (its sampler result, a lock, bounded attribute,
event and link containers, a check of every attribute, a second object at end), about as much
as a no-op task's whole hop. :class:`LightTracer` starts the same spans for
``TracingInterceptor`` for a tenth of that: the sampling decision first (attributes are built
only for a span it records), the attributes the interceptor built (plain strings and
integers, which the SDK's checks would pass unchanged), and at end one ``ReadableSpan`` with
the tracer's resource and scope handed to the provider's processors, which is all an exporter
ever sees.

It applies only where skipping the SDK span changes nothing anyone can observe, checked on the
provider's own state (the SDK has no public accessor for it): every processor is the SDK's
``BatchSpanProcessor`` or ``SimpleSpanProcessor`` (whose ``on_start`` does nothing), the
sampler is built from the SDK's ``ParentBased``, ``ALWAYS_ON``/``ALWAYS_OFF`` and
``TraceIdRatioBased`` (none reads the attributes), attribute values are not truncated, and the
tracer is enabled without the SDK's own span metrics. Anything else (a processor of your own,
another sampler, an SDK whose internals differ) and the interceptor starts SDK spans as before.

A light span can be current (an attempt's span while the task runs): the task's code may set
attributes, add events and links, set its status or record an exception on it, as on an SDK
span, and its own spans are children of it.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanLimits,
    SynchronousMultiSpanProcessor,
    Tracer,
)
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TracerProvider,
)
from opentelemetry.util.types import AnyValue, Attributes

__all__ = ["LightSpan", "LightTracer"]

_logger = logging.getLogger(__name__)

#: Processors whose ``on_start`` and ``_on_ending`` do nothing: they see only ended spans.
_ENDED_ONLY = (BatchSpanProcessor, SimpleSpanProcessor)
#: W3C trace flags level 2 (SDK 1.39+): the trace id is random. Older SDKs leave it out.
_RANDOM: int = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
_SAMPLED: int = TraceFlags.SAMPLED
#: Every flags value a span of ours can have, built once.
_FLAGS = tuple(TraceFlags(value) for value in range(4))
_PRIMITIVE = (str, bool, int, float)
_UNSET = Status(StatusCode.UNSET)
#: Attributes an interceptor's span carries at most (the fast path needs room for them).
_ATTRIBUTES_NEEDED = 16


class LightTracer:
    """Starts spans for one SDK tracer without the SDK's per-span machinery.

    Build it with :meth:`of`, which returns None where the provider does not allow it; even
    then check :meth:`active` before each span (a processor may be added later).
    """

    def __init__(self, tracer: Tracer, provider: SdkTracerProvider, max_links: int) -> None:
        self._sampler: Sampler = tracer.sampler
        self._ids = tracer.id_generator
        self._random_roots = _RANDOM if tracer.id_generator.is_trace_id_random() else 0
        self._resource = tracer.resource
        self._info = tracer.instrumentation_info
        self._scope = getattr(tracer, "_instrumentation_scope", None)
        self._limits: SpanLimits = tracer._span_limits
        self._multi = provider._active_span_processor
        self._checked: tuple[object, ...] | None = None
        self._on_end: Callable[[ReadableSpan], None] = self._multi.on_end
        self._max_links = max_links

    @classmethod
    def of(cls, provider: TracerProvider, tracer: Any, max_links: int) -> LightTracer | None:
        """A light tracer for ``tracer`` (from ``provider``), or None where an SDK span would
        do something a light one skips."""
        if not isinstance(provider, SdkTracerProvider) or type(tracer) is not Tracer:
            return None
        try:
            limits = tracer._span_limits
            metrics = (
                type(tracer._tracer_metrics).__name__
                if hasattr(tracer, "_tracer_metrics")
                else "NoOpTracerMetrics"
            )
            enabled = tracer._is_enabled() if hasattr(tracer, "_is_enabled") else True
            multi = provider._active_span_processor
        except AttributeError:  # another SDK version's internals: keep the SDK's spans
            return None
        if (
            not enabled
            or metrics != "NoOpTracerMetrics"
            or type(multi) is not SynchronousMultiSpanProcessor
            or not _known_sampler(tracer.sampler)
            or limits.max_span_attribute_length is not None
            or (limits.max_span_attributes or 0) < _ATTRIBUTES_NEEDED
            or (limits.max_links is not None and limits.max_links < max_links)
        ):
            return None
        return cls(tracer, provider, max_links)

    def active(self) -> bool:
        """Whether every processor the provider has now only looks at ended spans."""
        processors = self._multi._span_processors
        if processors is not self._checked:
            if not all(type(p) in _ENDED_ONLY for p in processors):
                return False
            self._checked = processors
        return True

    def start(
        self, name: str, parent: SpanContext | None, kind: SpanKind
    ) -> LightSpan | NonRecordingSpan:
        """A span named ``name``, child of ``parent`` (None: a root), started now: a
        :class:`LightSpan` if the sampler records it (give it its attributes with
        :meth:`LightSpan.adopt`), else a non-recording span with the context the SDK would
        have given it."""
        if parent is None:
            trace_id = self._ids.generate_trace_id()
            flags = self._random_roots
            trace_state = None
        else:
            trace_id = parent.trace_id
            flags = int(parent.trace_flags) & _RANDOM
            trace_state = parent.trace_state
        sampled = _sampled(self._sampler, parent, trace_id)
        context = SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=_FLAGS[flags | _SAMPLED if sampled else flags],
            trace_state=trace_state,
        )
        if not sampled:
            return NonRecordingSpan(context)
        return LightSpan(self, name, context, parent, kind)

    def _export(self, span: LightSpan, end_time: int) -> None:
        attributes: Attributes = span._attributes
        if span._dropped:
            bounded = BoundedAttributes(self._limits.max_span_attributes, attributes)
            bounded.dropped = span._dropped
            attributes = bounded
        self._on_end(
            # By name: the SDK's positional order is not a promise.
            ReadableSpan(
                name=span._name,
                context=span._context,
                parent=span._parent,
                resource=self._resource,
                attributes=attributes,
                events=span._events if span._events is not None else (),
                links=span._links if span._links is not None else (),
                kind=span._kind,
                instrumentation_info=self._info,
                status=span._status,
                start_time=span._start_time,
                end_time=end_time,
                instrumentation_scope=self._scope,
            )
        )


def _known_sampler(sampler: Sampler) -> bool:
    if type(sampler) is ParentBased:
        return all(
            _known_sampler(getattr(sampler, name, None))  # type: ignore[arg-type]
            for name in (
                "_root",
                "_remote_parent_sampled",
                "_remote_parent_not_sampled",
                "_local_parent_sampled",
                "_local_parent_not_sampled",
            )
        )
    return type(sampler) in (StaticSampler, TraceIdRatioBased)


def _sampled(sampler: Sampler, parent: SpanContext | None, trace_id: int) -> bool:
    """The decision of a sampler :func:`_known_sampler` accepts, without the Context and the
    result objects its ``should_sample`` builds: ParentBased picks its delegate by the parent,
    a static one says its decision, the ratio sampler compares the trace id."""
    while type(sampler) is ParentBased:
        if parent is None:
            sampler = sampler._root
        elif parent.is_remote:
            sampler = (
                sampler._remote_parent_sampled
                if parent.trace_flags.sampled
                else sampler._remote_parent_not_sampled
            )
        else:
            sampler = (
                sampler._local_parent_sampled
                if parent.trace_flags.sampled
                else sampler._local_parent_not_sampled
            )
    if type(sampler) is StaticSampler:
        return sampler._decision is Decision.RECORD_AND_SAMPLE
    # TraceIdRatioBased's own rule, on its public bound (its should_sample also builds a
    # result and looks up the current span's trace state, for the same answer).
    assert isinstance(sampler, TraceIdRatioBased)
    return trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < sampler.bound


class LightSpan(trace_api.Span):
    """A recording span a :class:`LightTracer` started; one ``ReadableSpan`` when it ends."""

    # What most spans keep unchanged, as class defaults: fewer stores per span.
    _dropped = 0
    _events: BoundedList[Event] | None = None
    _links: BoundedList[Link] | None = None
    _status = _UNSET
    _end_time: int | None = None

    def __init__(
        self,
        tracer: LightTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes: dict[str, AnyValue] = {}
        self._start_time = time.time_ns()

    def adopt(self, attributes: dict[str, AnyValue]) -> None:
        """Take ``attributes`` as they are: a new dict of valid values (strings, integers),
        fewer than the limit, that nobody else changes (the SDK's checks would pass them)."""
        self._attributes = attributes

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attributes(self, attributes: Mapping[str, AnyValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: AnyValue) -> None:
        if self._end_time is not None:
            _logger.warning("Setting attribute on ended span.")
            return
        if type(value) not in _PRIMITIVE or not key or not isinstance(key, str):
            # Sequences and bad values: the SDK's own checks (and warnings) decide.
            cleaned = BoundedAttributes(None, {key: value})
            if key not in cleaned:
                return
            value = cleaned[key]
        attributes = self._attributes
        attributes.pop(key, None)
        limit = self._tracer._limits.max_span_attributes
        if limit is not None and len(attributes) >= limit:
            # As the SDK does: the oldest attribute makes room.
            del attributes[next(iter(attributes))]
            self._dropped += 1
        attributes[key] = value

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is not None:
            _logger.warning("Calling add_event on an ended span.")
            return
        limits = self._tracer._limits
        if self._events is None:
            self._events = BoundedList(limits.max_events)
        self._events.append(
            Event(name, _frozen(limits, limits.max_event_attributes, attributes), timestamp)
        )

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self._end_time is not None:
            _logger.warning("Calling add_link on an ended span.")
            return
        if not context.is_valid and not attributes:
            return
        limits = self._tracer._limits
        if self._links is None:
            self._links = BoundedList(limits.max_links)
        self._links.append(Link(context, _frozen(limits, limits.max_link_attributes, attributes)))

    def link_all(self, links: Sequence[Link]) -> None:
        """Links without attributes, known valid (built from parsed record headers)."""
        if self._links is None:
            self._links = BoundedList(self._tracer._limits.max_links)
        self._links.extend(links)

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: OK is final, UNSET changes nothing.
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event: dict[str, AnyValue] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            _logger.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time = end_time if end_time is not None else time.time_ns()
        self._tracer._export(self, end_time)


def _frozen(limits: SpanLimits, most: int | None, attributes: Attributes) -> BoundedAttributes:
    """An event's or a link's attributes, bounded and frozen as the SDK keeps them."""
    return BoundedAttributes(
        most, attributes, immutable=True, max_value_len=limits.max_attribute_length
    )
