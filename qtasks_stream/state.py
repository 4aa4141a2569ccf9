"""A task's state as the fold of its events, and the ``Task`` clients see.

``fold`` is the one place that says what each event does to a task; the view stores, the
scheduler and ``history --as-of`` all use it, so they cannot disagree.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from qtasks_stream.events import (
    Cancelled,
    CancelRequested,
    DeadLettered,
    Failed,
    Progress,
    Released,
    RetryScheduled,
    Scheduled,
    Started,
    Submitted,
    Succeeded,
    TaskEvent,
    TimedOut,
)

__all__ = ["FINAL_STATUSES", "Task", "TaskState", "fold"]

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
    content_type: str = "application/json"
    result: str | None = None
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

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_json(self) -> str:
        # Field names looked up once (below the class): views encode a state per task per batch.
        return json.dumps(dict(zip(_STATE_FIELDS, _state_values(self), strict=True)))

    @classmethod
    def from_json(cls, text: str) -> TaskState:
        return cls(**json.loads(text))

    def to_task(self) -> Task:
        return Task(
            uuid=self.task_id,
            task_name=self.task_name,
            status=self.status,
            priority=self.priority,
            args=json.loads(self.args) if self.content_type == "application/json" else self.args,
            kwargs=json.loads(self.kwargs)
            if self.content_type == "application/json"
            else self.kwargs,
            returning=json.loads(self.result)
            if self.result is not None and self.content_type == "application/json"
            else self.result,
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
        )


_STATE_FIELDS = tuple(f.name for f in fields(TaskState))
_state_values = operator.attrgetter(*_STATE_FIELDS)


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

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


def fold(state: TaskState | None, event: TaskEvent) -> TaskState:
    """``state`` after ``event``: updated in place (a new one when ``state`` is None) and
    returned. Callers that must keep the old state (a view mid-transaction) fold a copy.

    A final task ignores later events (a stale duplicate cannot resurrect it), and a repeated
    ``Submitted`` is ignored (idempotent submit: the first one wins).
    """
    payload = event.payload
    if state is None:
        state = TaskState(event.task_id, event.task_name, created_us=event.at_us)
        if not isinstance(payload, Submitted):
            # The log was read from the middle (retention, a replay window): keep what we see.
            state.status = "scheduled"
    elif state.final or isinstance(payload, Submitted):
        return state
    state.events += 1
    state.updated_us = event.at_us
    if event.traceparent and state.traceparent is None:
        state.traceparent = event.traceparent
    if isinstance(payload, Submitted):
        state.priority = payload.priority
        state.args, state.kwargs = payload.args, payload.kwargs
        state.content_type = payload.content_type
        state.idempotency_key = payload.idempotency_key
        state.tags = list(payload.tags)
        state.due_us = payload.eta_us
    elif isinstance(payload, Scheduled):
        state.status, state.lane, state.due_us = "scheduled", payload.lane, payload.due_us
        state.priority = payload.priority
    elif isinstance(payload, Released):
        state.status, state.lane, state.attempt = "scheduled", payload.lane, event.attempt
        state.due_us = None
    elif isinstance(payload, Started):
        state.status, state.attempt, state.worker_id = "process", event.attempt, payload.worker_id
    elif isinstance(payload, Progress):
        state.progress_count = payload.seq + 1
    elif isinstance(payload, Succeeded):
        state.status, state.result = "success", payload.result
        # Errors of earlier attempts stay in the history; the view shows the outcome.
        state.error_type = state.error_message = state.traceback = None
        state.content_type = payload.content_type
        state.attempt = event.attempt
    elif isinstance(payload, Failed):
        state.status, state.attempt = "error", event.attempt
        state.error_type, state.error_message = payload.error_type, payload.message
        state.traceback = payload.traceback
    elif isinstance(payload, RetryScheduled):
        state.status, state.attempt, state.due_us = "retry", event.attempt, payload.due_us
        state.error_type, state.error_message = payload.error_type, payload.message
        state.traceback = payload.traceback
    elif isinstance(payload, CancelRequested):
        state.cancel_requested, state.cancel_reason = True, payload.reason
    elif isinstance(payload, Cancelled):
        state.status, state.cancel_reason = "cancel", payload.reason
    elif isinstance(payload, TimedOut):
        state.status, state.attempt = "timeout", event.attempt
        state.error_type = "TaskTimeout"
        state.error_message = f"attempt exceeded max_time={payload.max_time}s"
    elif isinstance(payload, DeadLettered):
        state.status, state.error_message = "dead_letter", payload.reason
    return state
