"""Audit: one task's history attempt by attempt, and its state at a past moment, both from
the events it has in the log (never from a view).

The JSON document :func:`history_document` builds is what ``qtasks-stream history --json``
prints; its fields are documented in ``docs/events.md`` ("Auditing a task").
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.events import (
    TERMINAL_KINDS,
    Failed,
    RetryScheduled,
    Started,
    TaskEvent,
    TimedOut,
)
from qtasks_stream.state import TaskState, fold
from qtasks_stream.telemetry.propagation import trace_id_of

__all__ = [
    "HISTORY_FORMAT",
    "format_history",
    "history_document",
    "parse_time_us",
    "state_as_of",
]

#: Version of the ``history --json`` document; bumped only on incompatible changes.
HISTORY_FORMAT = 1
#: Payload fields left out of the text listing (long, and in the JSON document anyway).
_LONG_FIELDS = frozenset({"traceback", "args", "kwargs"})
#: Kinds that end an attempt (RetryScheduled ends it and announces the next).
_ATTEMPT_ENDS = TERMINAL_KINDS | {"RetryScheduled"}


def parse_time_us(text: str) -> int:
    """ISO 8601 (``2026-11-27T21:00:00Z``; no zone means UTC) or epoch seconds → µs."""
    value = text.strip()
    try:
        return int(float(value) * 1_000_000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ConfigurationError(
            f"time must be ISO 8601 (2026-11-27T21:00:00Z) or epoch seconds, not {text!r}"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def as_of_us(as_of: datetime | float | str) -> int:
    """A moment given as an aware datetime, epoch seconds, or text → µs since the epoch."""
    if isinstance(as_of, datetime):
        if as_of.tzinfo is None:
            raise ConfigurationError("as_of must be timezone-aware (e.g. datetime.now(UTC))")
        return int(as_of.timestamp() * 1_000_000)
    if isinstance(as_of, str):
        return parse_time_us(as_of)
    return int(as_of * 1_000_000)


def state_as_of(events: Sequence[TaskEvent], at_us: int | None = None) -> TaskState | None:
    """The fold of ``events`` (one task's, in log order) that happened at or before ``at_us``
    (all of them when None); None when there were none yet."""
    state: TaskState | None = None
    for event in events:
        if at_us is None or event.at_us <= at_us:
            state = fold(state, event)
    return state


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC).isoformat(timespec="microseconds")


#: Decodes a typed Avro payload (wire-format bytes) to plain values; ``what`` names it.
BytesDecoder = Callable[[bytes, str], Any]


def _plain(name: str, value: Any, decode: BytesDecoder | None) -> Any:
    if not isinstance(value, bytes):
        return value
    if decode is None:
        return base64.b64encode(value).decode()
    return decode(value, name)


def _payload(event: TaskEvent, decode: BytesDecoder | None) -> dict[str, Any]:
    payload = event.payload
    body = {f.name: _plain(f.name, getattr(payload, f.name), decode) for f in fields(payload)}
    if "tags" in body:
        body["tags"] = list(body["tags"])
    return body


def _event_doc(event: TaskEvent, decode: BytesDecoder | None) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "kind": event.kind,
        "attempt": event.attempt,
        "at": _iso(event.at_us),
        "at_us": event.at_us,
        "source": event.source,
        "trace_id": trace_id_of(event.traceparent),
        "payload": _payload(event, decode),
    }


def _attempt_doc(
    number: int, events: Sequence[TaskEvent], decode: BytesDecoder | None
) -> dict[str, Any]:
    starts = [e for e in events if isinstance(e.payload, Started)]
    end = next((e for e in reversed(events) if e.kind in _ATTEMPT_ENDS), None)
    started_us = starts[0].at_us if starts else None
    duration_ms: float | None = None
    error: dict[str, str] | None = None
    if end is not None:
        duration_ms = getattr(end.payload, "duration_ms", None)
        if duration_ms is None and started_us is not None:
            duration_ms = (end.at_us - started_us) / 1000
        payload = end.payload
        if isinstance(payload, Failed | RetryScheduled):
            error = {"type": payload.error_type, "message": payload.message}
        elif isinstance(payload, TimedOut):
            error = {"type": "TaskTimeout", "message": f"exceeded max_time={payload.max_time}s"}
    last_start = starts[-1].payload if starts else None
    return {
        "attempt": number,
        "started_at": _iso(started_us) if started_us is not None else None,
        "ended_at": _iso(end.at_us) if end is not None else None,
        "duration_ms": duration_ms,
        "worker_id": last_start.worker_id if isinstance(last_start, Started) else None,
        # More than one: the attempt's work item was redelivered (a worker died mid-attempt).
        "starts": len(starts),
        "outcome": end.kind if end is not None else None,
        "error": error,
        "trace_id": next((t for e in events if (t := trace_id_of(e.traceparent))), None),
        "events": [_event_doc(e, decode) for e in events],
    }


def history_document(
    task_id: str,
    topic: str,
    events: Sequence[TaskEvent],
    as_of: int | None = None,
    decode: BytesDecoder | None = None,
) -> dict[str, Any]:
    """One task's history as one JSON-ready document (see ``docs/events.md``).

    Typed Avro arguments and results are shown decoded by ``decode`` (plain values, as any
    Avro consumer sees them), or as base64 text without it.
    """
    shown = [e for e in events if as_of is None or e.at_us <= as_of]
    state = state_as_of(shown)
    by_attempt: dict[int, list[TaskEvent]] = {}
    for event in shown:
        by_attempt.setdefault(event.attempt, []).append(event)
    return {
        "format": HISTORY_FORMAT,
        "task_id": task_id,
        "task_name": state.task_name if state is not None else None,
        "events_topic": topic,
        "as_of": _iso(as_of) if as_of is not None else None,
        "status": state.status if state is not None else None,
        "attempt": state.attempt if state is not None else None,
        # The task's trace: every event of it, retries and restarts included, is in this one.
        "trace_id": next((t for e in shown if (t := trace_id_of(e.traceparent))), None),
        "state": {f.name: _plain(f.name, getattr(state, f.name), decode) for f in fields(TaskState)}
        if state is not None
        else None,
        "attempts": [_attempt_doc(n, evs, decode) for n, evs in sorted(by_attempt.items())],
    }


def format_history(document: dict[str, Any]) -> list[str]:
    """The text listing of a :func:`history_document`: attempt headers, then its events."""
    lines = [
        f"task {document['task_id']} ({document['task_name']}): {document['status']}, "
        f"attempt {document['attempt']}"
        + (f", trace {document['trace_id']}" if document["trace_id"] else "")
        + (f", as of {document['as_of']}" if document["as_of"] else "")
    ]
    first = next((a["events"][0]["at_us"] for a in document["attempts"] if a["events"]), 0)
    for attempt in document["attempts"]:
        if attempt["attempt"] == 0:
            lines.append("attempt 0 (before the first attempt, client requests)")
        else:
            parts = [f"attempt {attempt['attempt']}"]
            if attempt["worker_id"]:
                parts.append(f"on {attempt['worker_id']}")
            if attempt["outcome"]:
                parts.append(f"→ {attempt['outcome']}")
            if attempt["duration_ms"] is not None:
                parts.append(f"in {attempt['duration_ms']:.1f} ms")
            if attempt["error"]:
                parts.append(f"{attempt['error']['type']}: {attempt['error']['message']}")
            if attempt["starts"] > 1:
                parts.append(f"(started {attempt['starts']} times)")
            if attempt["trace_id"]:
                parts.append(f"trace {attempt['trace_id']}")
            lines.append("  ".join(parts))
        for event in attempt["events"]:
            body = ", ".join(
                f"{k}={v!r}" for k, v in event["payload"].items() if k not in _LONG_FIELDS
            )
            lines.append(
                f"  +{(event['at_us'] - first) / 1000:9.1f} ms  {event['at']}  "
                f"{event['kind']:<15} {event['source']:<28} {body}"
            )
    return lines
