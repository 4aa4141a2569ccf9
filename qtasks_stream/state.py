"""A task's state as the fold of its events, and the ``Task`` clients see.

``fold`` is the one place that says what each event does to a task; the view stores, the
scheduler and ``history --as-of`` all use it, so they cannot disagree.
"""

from __future__ import annotations

import base64
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from qtasks_stream.events import (
    DLQ_REPLAY,
    Cancelled,
    CancelRequested,
    DeadLettered,
    Failed,
    Progress,
    Released,
    Resubmitted,
    RetryScheduled,
    Scheduled,
    Started,
    Submitted,
    Succeeded,
    TaskEvent,
    TimedOut,
    WorkItem,
)

__all__ = [
    "FINAL_STATUSES",
    "STATE_FIELDS",
    "PayloadDecoder",
    "Task",
    "TaskState",
    "fold",
    "reopens",
    "work_item",
]

JSON = "application/json"
_BYTES_FIELDS = ("arguments_avro", "result_avro")


class PayloadDecoder(Protocol):
    """Turns a state's encoded arguments and result into Python values (see serde.payloads)."""

    def task_values(self, state: TaskState) -> tuple[Any, Any, Any]:
        """``(args, kwargs, result)`` of ``state``; the result is ``None`` before success."""
        ...


#: Statuses after which a task never changes.
FINAL_STATUSES = frozenset({"success", "error", "cancel", "timeout", "dead_letter"})


@dataclass(slots=True)
class TaskState:
    """What the log says about one task, with arguments and results still encoded."""

    task_id: str
    task_name: str
    status: str = "new"
    priority: int = 0
    args: str = "[]"
    kwargs: str = "{}"
    content_type: str = JSON
    result: str | None = None
    result_content_type: str = JSON
    arguments_avro: bytes | None = None
    result_avro: bytes | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    attempt: int = 0
    created_us: int = 0
    updated_us: int = 0
    cancel_requested: bool = False
    cancel_reason: str | None = None
    tags: list[str] = field(default_factory=list)
    lane: int | None = None
    due_us: int | None = None
    worker_id: str | None = None
    idempotency_key: str | None = None
    progress_count: int = 0
    traceparent: str | None = None
    events: int = 0
    #: Whether the task's ``Submitted`` was folded. False for a task known only from later
    #: events (a log read from the middle, or a submit that was dead-lettered): the copy a
    #: dead-letter replay writes is then applied instead of ignored as a repeat.
    submitted: bool = False
    #: The named queue; ``None``: ``"default"``.
    queue: str | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    def copy(self) -> TaskState:
        """A shallow copy: the view folds one per task per batch, and ``copy.copy`` (by
        ``__reduce_ex__``) took seven times as long."""
        return TaskState(*_state_values(self))

    def to_json(self) -> str:
        # orjson reads the dataclass's fields itself, in order (the bytes fields through
        # _base64): views encode a state per task per batch, and the dict built first cost
        # a third more. Same JSON text as json.dumps of the fields, a fraction of the time.
        return orjson.dumps(self, default=_base64).decode()

    @classmethod
    def from_json(cls, text: str) -> TaskState:
        data = orjson.loads(text)
        for name in _BYTES_FIELDS:
            if data.get(name) is not None:
                data[name] = base64.b64decode(data[name])
        return cls(**data)

    def to_task(self, payloads: PayloadDecoder | None = None) -> Task:
        """The client's ``Task``. JSON payloads are decoded here; typed Avro ones need
        ``payloads`` (without it they stay encoded: the view has no registry)."""
        if self.content_type == JSON and self.result_content_type == JSON:
            args: Any = json.loads(self.args)
            kwargs: Any = json.loads(self.kwargs)
            returning = json.loads(self.result) if self.result is not None else None
        elif payloads is not None:
            args, kwargs, returning = payloads.task_values(self)
        else:
            args, kwargs = self.arguments_avro or self.args, self.kwargs
            returning = self.result_avro or self.result
        return Task(
            uuid=self.task_id,
            task_name=self.task_name,
            status=self.status,
            priority=self.priority,
            args=args,
            kwargs=kwargs,
            returning=returning,
            traceback=self.traceback,
            error_type=self.error_type,
            error_message=self.error_message,
            attempt=self.attempt,
            created_at=_dt(self.created_us),
            updated_at=_dt(self.updated_us),
            cancel_reason=self.cancel_reason,
            cancel_requested=self.cancel_requested,
            tags=list(self.tags),
            worker_id=self.worker_id,
            due_at=_dt(self.due_us) if self.due_us is not None else None,
            idempotency_key=self.idempotency_key,
            queue=self.queue or "default",
        )


#: ``TaskState``'s field names in order: views and snapshots serialize states by them.
STATE_FIELDS = tuple(f.name for f in fields(TaskState))
_state_values = operator.attrgetter(*STATE_FIELDS)


def _base64(value: object) -> str:
    """What ``to_json`` writes for the bytes fields (``_BYTES_FIELDS``): their base64."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"a task state holds no {type(value).__name__}")


def _dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


@dataclass(frozen=True, slots=True)
class Task:
    """A task as the view knows it; the QTasks ``Task`` with the fields of an event log.

    ``status`` is one of new, scheduled, process, retry, success, error, cancel, timeout,
    dead_letter.
    """

    uuid: str
    task_name: str
    status: str
    priority: int
    args: Any
    kwargs: Any
    returning: Any
    traceback: str | None
    error_type: str | None
    error_message: str | None
    attempt: int
    created_at: datetime
    updated_at: datetime
    cancel_reason: str | None
    cancel_requested: bool
    tags: list[str]
    worker_id: str | None
    due_at: datetime | None
    idempotency_key: str | None
    #: The named queue whose workers run it.
    queue: str = "default"

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


def fold(state: TaskState | None, event: TaskEvent) -> TaskState:
    """``state`` after ``event``: updated in place (a new one when ``state`` is None) and
    returned. Callers that must keep the old state (a view mid-transaction) fold a copy.

    A final task ignores later events (a stale duplicate cannot resurrect it), except a
    ``Resubmitted`` that re-opens it (see :func:`reopens`); a repeated ``Submitted`` is ignored
    (idempotent submit: the first one wins). A ``Submitted`` after other events is applied
    only if none was folded before: the replayed copy of a dead-lettered submit, which makes
    the task new again (the scheduler schedules it).
    """
    payload = event.payload
    kind = type(payload)
    if state is None:
        state = TaskState(event.task_id, event.task_name, created_us=event.at_us)
        if kind is not Submitted:
            # The log was read from the middle (retention, a replay window): keep what we see.
            state.status = "scheduled"
    elif kind is Resubmitted:
        if not reopens(state, event):
            return state
    elif state.status in FINAL_STATUSES or (kind is Submitted and state.submitted):
        return state
    state.events += 1
    state.updated_us = event.at_us
    if event.traceparent and state.traceparent is None:
        state.traceparent = event.traceparent
    # One table lookup per event: the chain of isinstance tests it replaces was half the
    # cost of folding a log (views, the scheduler and the client all fold every event).
    step = _STEPS.get(kind) or _inherited_step(kind)
    if step is not None:
        step(state, event, payload)
    return state


def _inherited_step(kind: type[Any]) -> Callable[[TaskState, TaskEvent, Any], None] | None:
    # A subclass of a payload (none in this package) folds as its base does.
    return next((_STEPS[base] for base in kind.__mro__ if base in _STEPS), None)


def _submitted(state: TaskState, event: TaskEvent, payload: Submitted) -> None:
    state.submitted, state.status = True, "new"
    state.task_name, state.created_us = event.task_name, event.at_us
    state.priority = payload.priority
    state.args, state.kwargs = payload.args, payload.kwargs
    state.content_type = payload.content_type
    state.arguments_avro = payload.arguments_avro
    state.idempotency_key = payload.idempotency_key
    state.tags = list(payload.tags)
    state.due_us = payload.eta_us
    state.queue = payload.queue


def _scheduled(state: TaskState, event: TaskEvent, payload: Scheduled) -> None:
    state.status, state.lane, state.due_us = "scheduled", payload.lane, payload.due_us
    state.priority = payload.priority


def _released(state: TaskState, event: TaskEvent, payload: Released) -> None:
    state.status, state.lane, state.attempt = "scheduled", payload.lane, event.attempt
    state.due_us = None


def _started(state: TaskState, event: TaskEvent, payload: Started) -> None:
    state.status, state.attempt, state.worker_id = "process", event.attempt, payload.worker_id


def _progress(state: TaskState, event: TaskEvent, payload: Progress) -> None:
    state.progress_count = payload.seq + 1


def _succeeded(state: TaskState, event: TaskEvent, payload: Succeeded) -> None:
    state.status, state.result = "success", payload.result
    # Errors of earlier attempts stay in the history; the view shows the outcome.
    state.error_type = state.error_message = state.traceback = None
    state.result_content_type = payload.content_type
    state.result_avro = payload.result_avro
    state.attempt = event.attempt


def _failed(state: TaskState, event: TaskEvent, payload: Failed) -> None:
    state.status, state.attempt = "error", event.attempt
    state.error_type, state.error_message = payload.error_type, payload.message
    state.traceback = payload.traceback


def _retry_scheduled(state: TaskState, event: TaskEvent, payload: RetryScheduled) -> None:
    state.status, state.attempt, state.due_us = "retry", event.attempt, payload.due_us
    state.error_type, state.error_message = payload.error_type, payload.message
    state.traceback = payload.traceback


def _cancel_requested(state: TaskState, event: TaskEvent, payload: CancelRequested) -> None:
    state.cancel_requested, state.cancel_reason = True, payload.reason


def _cancelled(state: TaskState, event: TaskEvent, payload: Cancelled) -> None:
    state.status, state.cancel_reason = "cancel", payload.reason


def _timed_out(state: TaskState, event: TaskEvent, payload: TimedOut) -> None:
    state.status, state.attempt = "timeout", event.attempt
    state.error_type = "TaskTimeout"
    state.error_message = f"attempt exceeded max_time={payload.max_time}s"


def _dead_lettered(state: TaskState, event: TaskEvent, payload: DeadLettered) -> None:
    state.status, state.error_message = "dead_letter", payload.reason


def reopens(state: TaskState, event: TaskEvent) -> bool:
    """Whether ``event`` (a ``Resubmitted``) re-opens ``state``: only an ended task, and only
    once per attempt number (of two concurrent resubmits, the first in the log wins) or per
    dead-lettered task (a replay continues a task the dead-letter stage ended)."""
    payload = event.payload
    if not isinstance(payload, Resubmitted) or not state.final:
        return False
    if payload.mode == DLQ_REPLAY:
        return state.status == "dead_letter"
    return event.attempt > state.attempt


def _reopen(state: TaskState, event: TaskEvent, payload: Resubmitted) -> None:
    state.cancel_requested, state.result, state.result_avro = False, None, None
    if payload.mode == DLQ_REPLAY:
        # The replayed record's stage carries on; the task is in flight again.
        state.status = "scheduled"
        return
    if event.task_name:
        state.task_name = event.task_name
    # A retry asked for by an operator: the scheduler releases attempt ``event.attempt`` now,
    # through the same path as a retry backoff that came due.
    state.status, state.attempt, state.due_us = "retry", event.attempt - 1, event.at_us
    state.args, state.kwargs = payload.args, payload.kwargs
    state.arguments_avro = payload.arguments_avro
    state.content_type, state.priority = payload.content_type, payload.priority


#: What each payload type does to a task.
_STEPS: dict[type[Any], Callable[[TaskState, TaskEvent, Any], None]] = {
    Submitted: _submitted,
    Scheduled: _scheduled,
    Released: _released,
    Started: _started,
    Progress: _progress,
    Succeeded: _succeeded,
    Failed: _failed,
    RetryScheduled: _retry_scheduled,
    CancelRequested: _cancel_requested,
    Cancelled: _cancelled,
    TimedOut: _timed_out,
    DeadLettered: _dead_lettered,
    Resubmitted: _reopen,
}


def work_item(state: TaskState, attempt: int, max_time: float | None) -> WorkItem:
    """What a lane holds for ``attempt`` of ``state`` (the scheduler's, and a client's that
    routes a task due now itself)."""
    return WorkItem(
        task_id=state.task_id,
        task_name=state.task_name,
        attempt=attempt,
        args=state.args,
        kwargs=state.kwargs,
        priority=state.priority,
        submitted_at_us=state.created_us,
        content_type=state.content_type,
        max_time=max_time,
        traceparent=state.traceparent,
        arguments_avro=state.arguments_avro,
    )
