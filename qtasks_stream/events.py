"""The lifecycle events of a task and the records stages exchange, as plain dataclasses.

Each class mirrors a record of ``schemas/avro/`` field for field; ``to_avro``/``from_avro``
convert to and from the dicts fastavro reads and writes.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from qtasks_stream.records import Headers, OutRecord, slot_setters

if TYPE_CHECKING:
    from qtasks_stream.serde.base import Serde

__all__ = [
    "DEFAULT_QUEUE",
    "DLQ_REPLAY",
    "JSON",
    "KIND_HEADER",
    "RESUBMIT",
    "ROUTED_HEADER",
    "TERMINAL_KINDS",
    "TRACEPARENT_HEADER",
    "CancelRequested",
    "Cancelled",
    "ControlCommand",
    "DeadLettered",
    "Failed",
    "Payload",
    "Progress",
    "Recordable",
    "Released",
    "Resubmitted",
    "RetryScheduled",
    "Scheduled",
    "Started",
    "Submitted",
    "Succeeded",
    "TaskEvent",
    "TimedOut",
    "WorkItem",
    "as_record",
    "event_kind",
    "new_task_id",
    "now_us",
    "task_id_ms",
]

#: Content type of JSON-encoded arguments and results.
JSON = "application/json"
#: Record header naming the event kind, so a consumer can skip kinds without decoding.
KIND_HEADER = "qtasks.kind"
#: Header of a ``Submitted`` whose client put the task in its lane itself, in the transaction
#: of the event and of its ``Scheduled`` (a task due now): the scheduler folds it as scheduled.
ROUTED_HEADER = "qtasks.routed"
#: W3C trace context header (the name OpenTelemetry's Kafka instrumentations use).
TRACEPARENT_HEADER = "traceparent"
_NAMESPACE = "qtasks.stream.v1."


def now_us() -> int:
    return time.time_ns() // 1000


def new_task_id() -> str:
    """A UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Its time lets a reader of one task's history start near the task's first event instead
    of at offset 0 (see :func:`task_id_ms`).
    """
    value = (time.time_ns() // 1_000_000) << 80 | random.getrandbits(80)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def task_id_ms(task_id: str) -> int | None:
    """The Unix milliseconds of a version 7 task id, or of a version 8 one (a workflow step's,
    which has its workflow's time there); None for any other id (an idempotency key's
    version 5 id, a version 4 id of an older client)."""
    if len(task_id) != 36 or task_id[14] not in "78" or task_id[19] not in "89ab":
        return None
    try:
        return int(task_id[:8] + task_id[9:13], 16)
    except ValueError:
        return None


#: The queue of tasks that name none (``Submitted.queue`` null); its lanes keep the topic
#: names they had before queues existed.
DEFAULT_QUEUE = "default"


@dataclass(frozen=True, slots=True)
class Submitted:
    args: str
    kwargs: str
    priority: int
    content_type: str = JSON
    eta_us: int | None = None
    idempotency_key: str | None = None
    max_time: float | None = None
    tags: tuple[str, ...] = ()
    arguments_avro: bytes | None = None
    #: The named queue; ``None``: ``"default"`` (what submits before queues existed wrote).
    queue: str | None = None
    #: Set on the steps of a workflow (see :mod:`qtasks_stream.workflows`), null otherwise.
    workflow_id: str | None = None
    workflow_step: str | None = None
    workflow_parents: tuple[str, ...] = ()
    group_id: str | None = None
    workflow: str | None = None


@dataclass(frozen=True, slots=True)
class Scheduled:
    lane: int
    priority: int
    due_us: int | None = None


@dataclass(frozen=True, slots=True)
class Released:
    lane: int


@dataclass(frozen=True, slots=True)
class Started:
    worker_id: str


@dataclass(frozen=True, slots=True)
class Progress:
    seq: int
    value: str


@dataclass(frozen=True, slots=True)
class Succeeded:
    result: str
    duration_ms: float
    content_type: str = JSON
    result_avro: bytes | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    error_type: str
    message: str
    traceback: str
    duration_ms: float


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    next_attempt: int
    due_us: int
    error_type: str
    message: str
    traceback: str
    duration_ms: float


@dataclass(frozen=True, slots=True)
class CancelRequested:
    reason: str


@dataclass(frozen=True, slots=True)
class Cancelled:
    reason: str


@dataclass(frozen=True, slots=True)
class TimedOut:
    max_time: float


@dataclass(frozen=True, slots=True)
class DeadLettered:
    reason: str
    stage: str
    source_topic: str
    source_partition: int
    source_offset: int


@dataclass(frozen=True, slots=True)
class Resubmitted:
    """An operator re-opened an ended task (see ``schemas/avro/TaskEvent.avsc``)."""

    reason: str
    previous_status: str
    mode: str = "resubmit"
    #: Empty with ``dlq_replay`` (a registry rejects "{}" as a default: Apicurio 3.3).
    args: str = ""
    kwargs: str = ""
    content_type: str = JSON
    priority: int = 0
    max_time: float | None = None
    dlq_source: str | None = None
    arguments_avro: bytes | None = None


#: ``Resubmitted.mode`` values.
RESUBMIT = "resubmit"
DLQ_REPLAY = "dlq_replay"

Payload = (
    Submitted
    | Scheduled
    | Released
    | Started
    | Progress
    | Succeeded
    | Failed
    | RetryScheduled
    | CancelRequested
    | Cancelled
    | TimedOut
    | DeadLettered
    | Resubmitted
)

_PAYLOAD_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        Submitted,
        Scheduled,
        Released,
        Started,
        Progress,
        Succeeded,
        Failed,
        RetryScheduled,
        CancelRequested,
        Cancelled,
        TimedOut,
        DeadLettered,
        Resubmitted,
    )
}
_PAYLOAD_BY_FULL_NAME = {_NAMESPACE + name: cls for name, cls in _PAYLOAD_TYPES.items()}
_PAYLOAD_FIELDS: dict[type[Any], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in _PAYLOAD_TYPES.values()
}

_KIND_BYTES: dict[type[Any], bytes] = {
    cls: cls.__name__.encode() for cls in _PAYLOAD_TYPES.values()
}

#: Kinds after which a task never changes again.
TERMINAL_KINDS = frozenset({"Succeeded", "Failed", "Cancelled", "TimedOut", "DeadLettered"})


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One fact in a task's life; the key of its record is ``task_id``."""

    task_id: str
    task_name: str
    attempt: int
    source: str
    payload: Payload
    at_us: int = 0
    event_id: str = ""
    traceparent: str | None = None

    SCHEMA: ClassVar[str] = "TaskEvent"

    @classmethod
    def new(
        cls,
        task_id: str,
        task_name: str,
        attempt: int,
        source: str,
        payload: Payload,
        *,
        traceparent: str | None = None,
    ) -> TaskEvent:
        # Unique, not secret: the random module's generator (reseeded after fork) avoids an
        # os.urandom call per event, which stalls behind the Kafka clients' threads on the GIL.
        event_id = f"{random.getrandbits(128):032x}"
        return _build(
            cls, task_id, task_name, attempt, source, payload, now_us(), event_id, traceparent
        )

    @property
    def kind(self) -> str:
        return type(self.payload).__name__

    @property
    def terminal(self) -> bool:
        return type(self.payload).__name__ in TERMINAL_KINDS

    def record_headers(self) -> tuple[tuple[str, bytes], ...]:
        if self.traceparent:
            return (
                (KIND_HEADER, _KIND_BYTES[type(self.payload)]),
                (TRACEPARENT_HEADER, self.traceparent.encode()),
            )
        return ((KIND_HEADER, _KIND_BYTES[type(self.payload)]),)

    def to_avro(self) -> dict[str, Any]:
        payload = self.payload
        body = {name: getattr(payload, name) for name in _PAYLOAD_FIELDS[type(payload)]}
        if isinstance(payload, Submitted):
            body["tags"] = list(payload.tags)
            body["workflow_parents"] = list(payload.workflow_parents)
        return {
            "event_id": self.event_id,
            "task_id": self.task_id,
            "task_name": self.task_name,
            "attempt": self.attempt,
            "at_us": self.at_us,
            "source": self.source,
            "traceparent": self.traceparent,
            "payload": (_NAMESPACE + type(payload).__name__, body),
        }

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> TaskEvent:
        name, body = data["payload"]
        payload_type = _PAYLOAD_BY_FULL_NAME.get(name) or _PAYLOAD_TYPES[name.rpartition(".")[2]]
        if payload_type is Submitted:
            body = {
                **body,
                "tags": tuple(body["tags"]),
                "workflow_parents": tuple(body.get("workflow_parents", ())),
            }
        return _build(
            cls,
            data["task_id"],
            data["task_name"],
            data["attempt"],
            data["source"],
            payload_type(**body),
            data["at_us"],
            data["event_id"],
            data.get("traceparent"),
        )


_new = object.__new__
(
    _set_task_id,
    _set_task_name,
    _set_attempt,
    _set_source,
    _set_payload,
    _set_at_us,
    _set_event_id,
    _set_traceparent,
) = slot_setters(TaskEvent)


def _build(
    cls: type[TaskEvent],
    task_id: str,
    task_name: str,
    attempt: int,
    source: str,
    payload: Payload,
    at_us: int,
    event_id: str,
    traceparent: str | None,
) -> TaskEvent:
    """``cls(...)`` for the two constructors every event goes through (one to write it,
    one per reader): the generated ``__init__`` of a frozen dataclass pays an
    ``object.__setattr__`` per field, twice what these slot setters cost."""
    event: TaskEvent = _new(cls)
    _set_task_id(event, task_id)
    _set_task_name(event, task_name)
    _set_attempt(event, attempt)
    _set_source(event, source)
    _set_payload(event, payload)
    _set_at_us(event, at_us)
    _set_event_id(event, event_id)
    _set_traceparent(event, traceparent)
    return event


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One attempt waiting in a lane for a worker."""

    task_id: str
    task_name: str
    attempt: int
    args: str
    kwargs: str
    priority: int
    submitted_at_us: int
    content_type: str = JSON
    max_time: float | None = None
    traceparent: str | None = None
    arguments_avro: bytes | None = None
    #: When a worker that did not know ``task_name`` first put the item back (see worker).
    unknown_since_us: int | None = None

    SCHEMA: ClassVar[str] = "WorkItem"

    def record_headers(self) -> tuple[tuple[str, bytes], ...]:
        return ((TRACEPARENT_HEADER, self.traceparent.encode()),) if self.traceparent else ()

    def to_avro(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _WORK_ITEM_FIELDS}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> WorkItem:
        return cls(**data)


_WORK_ITEM_FIELDS = tuple(f.name for f in fields(WorkItem))


@dataclass(frozen=True, slots=True)
class ControlCommand:
    """A command read by every worker instance."""

    task_id: str
    reason: str
    at_us: int
    command: str = "CANCEL"

    SCHEMA: ClassVar[str] = "ControlCommand"

    def to_avro(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "command": self.command,
            "reason": self.reason,
            "at_us": self.at_us,
        }

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> ControlCommand:
        return cls(data["task_id"], data["reason"], data["at_us"], data["command"])

    def record_headers(self) -> Headers:
        return ()


class Recordable(Protocol):
    """What travels as a record: a task event, a work item or a control command."""

    def to_avro(self) -> dict[str, Any]: ...

    def record_headers(self) -> Headers: ...


def as_record(serde: Serde, topic: str, key: str, value: Recordable) -> OutRecord:
    """``value`` encoded for ``topic`` under ``key``, with the headers it carries (its kind,
    its trace context).

    Raises:
        SerdeError: ``value`` does not fit the topic's schema (nothing is built).
    """
    return OutRecord(
        topic, key.encode(), serde.encode(topic, value.to_avro()), value.record_headers()
    )


_KIND_NAMES = {kind: cls.__name__ for cls, kind in _KIND_BYTES.items()}


def event_kind(headers: tuple[tuple[str, bytes], ...]) -> str | None:
    """The kind a record's headers declare, if any (records of other producers may not)."""
    for name, value in headers:
        if name == KIND_HEADER:
            # Ours from a table: readers ask this of every event record.
            return _KIND_NAMES.get(value) or value.decode(errors="replace")
    return None
