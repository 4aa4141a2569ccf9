"""W3C trace context in events and record headers, without the global propagator.

Events keep the ``traceparent`` of the span that emitted them and records carry it as a
header; both are the plain W3C string (``00-<trace id>-<span id>-<flags>``). Parsing here is
one regular-expression match, cheap enough to run for every record of a traced batch.
"""

from __future__ import annotations

import re

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from qtasks_stream.events import TRACEPARENT_HEADER
from qtasks_stream.records import Headers

__all__ = [
    "context_from_traceparent",
    "format_traceparent",
    "is_unsampled",
    "parse_traceparent",
    "trace_id_of",
    "traceparent_from_headers",
    "unsampled_context",
]

#: A W3C ``traceparent``: version, trace id, span id, flags (lowercase hex), and whatever a
#: later version appends after another dash. One C-level match instead of a split and checks.
_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?", re.S
)
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The remote span context a ``traceparent`` names, or None if absent or malformed."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex = match.groups()
    if version == "ff" or trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
        return None
    return SpanContext(
        int(trace_hex, 16),
        int(span_hex, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags_hex, 16)),
    )


def is_unsampled(value: str | None) -> bool:
    """Whether ``value`` is a well-formed ``traceparent`` whose sampled flag is off (a
    trace nobody records). A string test, run per event before any span work."""
    if value is None or len(value) != 55 or value[-1] not in "02468ace":
        return False
    match = _TRACEPARENT.fullmatch(value)
    return (
        match is not None
        and match[1] != "ff"
        and match[2] != _ZERO_TRACE
        and match[3] != _ZERO_SPAN
    )


def unsampled_context(value: str | None) -> Context | None:
    """The context of a well-formed ``traceparent`` whose sampled flag is off, else None:
    :func:`is_unsampled` and :func:`context_from_traceparent` with one parse."""
    if value is None or len(value) != 55 or value[-1] not in "02468ace":
        return None
    span_context = parse_traceparent(value)
    if span_context is None:
        return None
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def format_traceparent(ctx: SpanContext) -> str | None:
    """``ctx`` as a ``traceparent``; None for an invalid context (tracing off)."""
    # One unpacking instead of four properties (the API's SpanContext is a tuple of these),
    # and %-formatting of plain ints: half the cost of an f-string with three format specs.
    trace_id, span_id, _, flags, _, valid = ctx
    if not valid:
        return None
    return "00-%032x-%016x-%02x" % (trace_id, span_id, int(flags))  # noqa: UP031


def context_from_traceparent(value: str | None) -> Context | None:
    """A context whose current span is the remote one ``value`` names (None: no parent)."""
    span_context = parse_traceparent(value)
    if span_context is None:
        return None
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def traceparent_from_headers(headers: Headers) -> str | None:
    for name, value in headers:
        if name == TRACEPARENT_HEADER:
            return value.decode("ascii", errors="replace")
    return None


def trace_id_of(traceparent: str | None) -> str | None:
    """The 32-hex-digit trace id of a ``traceparent`` (what trace viewers search by)."""
    span_context = parse_traceparent(traceparent)
    return None if span_context is None else f"{span_context.trace_id:032x}"
