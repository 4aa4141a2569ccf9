"""What the console's API and pages do, written once for both: each reads or acts through
the app's public API (``add_task``, ``get``, ``history``, ``page``, ``counts``, ``cancel``,
``resubmit``) and :mod:`qtasks_stream.ops.dlq`, and checks its input before anything is written.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from qtasks_stream.app import QueueTasks
from qtasks_stream.errors import ConfigurationError, QTasksStreamError
from qtasks_stream.events import Submitted
from qtasks_stream.ops import audit, dlq
from qtasks_stream.ops.rerun import ResubmitFilter
from qtasks_stream.state import Task
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import TaskPage, TaskQuery
from qtasks_stream.workflows.tree import workflow_document

__all__ = [
    "STATUSES",
    "ConsoleError",
    "LetterRow",
    "TaskDetail",
    "cancel",
    "counts",
    "dead_letters",
    "detail",
    "dumps",
    "list_tasks",
    "parse_positions",
    "reason_of",
    "replay_letters",
    "resubmit",
    "submit",
    "task_json",
]

#: Every status a task can have, in lifecycle order (the list page's counts and filter).
STATUSES = (
    "new",
    "scheduled",
    "process",
    "retry",
    "success",
    "error",
    "cancel",
    "timeout",
    "dead_letter",
)
#: ``add_task``'s own keywords: a task argument of one of these names cannot go through it.
_OPTION_NAMES = frozenset(
    {"priority", "queue", "timeout", "countdown", "eta", "idempotency_key", "max_time", "tags"}
)
#: Keys a submission body may have.
_SUBMIT_KEYS = frozenset({"args", "kwargs", "priority", "queue", "countdown", "tags", "max_time"})


class ConsoleError(QTasksStreamError):
    """A request the console refuses; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _plain(value: Any) -> Any:
    """What orjson cannot write by itself: typed payloads' models, bytes, anything else."""
    if hasattr(value, "model_dump"):  # a Pydantic model
        return value.model_dump(mode="json")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def dumps(value: Any, *, indent: bool = False) -> bytes:
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(value, default=_plain, option=option)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="microseconds") if moment is not None else None


def task_json(task: Task) -> dict[str, Any]:
    """A task as the API returns it (arguments and result decoded, typed ones as plain values)."""
    return {
        "id": task.uuid,
        "name": task.task_name,
        "status": task.status,
        "final": task.final,
        "queue": task.queue,
        "priority": task.priority,
        "attempt": task.attempt,
        "args": task.args,
        "kwargs": task.kwargs,
        "result": task.returning,
        "error_type": task.error_type,
        "error_message": task.error_message,
        "traceback": task.traceback,
        "created_at": _iso(task.created_at),
        "updated_at": _iso(task.updated_at),
        "cancel_requested": task.cancel_requested,
        "cancel_reason": task.cancel_reason,
        "tags": task.tags,
        "worker_id": task.worker_id,
        "due_at": _iso(task.due_at),
        "idempotency_key": task.idempotency_key,
    }


def _json_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ConsoleError(400, f"the body is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConsoleError(400, f"the body must be a JSON object, not {type(value).__name__}")
    return value


def reason_of(body: bytes | dict[str, Any]) -> str:
    """The ``reason`` of an action's JSON body (empty when there is none)."""
    data = _json_body(body) if isinstance(body, bytes) else body
    value = data.get("reason", "")
    if not isinstance(value, str):
        raise ConsoleError(400, "reason must be a string")
    return value


async def submit(app: QueueTasks, task_name: str, body: bytes, idempotency_key: str | None) -> Task:
    """Submit ``task_name`` with the arguments of a JSON body ``{"args": [...], "kwargs":
    {...}}`` (and optionally priority, countdown, max_time, tags). Everything is checked
    before the app writes: a refused submission leaves nothing in the log."""
    if task_name not in app.definitions:
        raise ConsoleError(404, f"no task named {task_name!r}")
    data = _json_body(body)
    unknown = sorted(set(data) - _SUBMIT_KEYS)
    if unknown:
        raise ConsoleError(400, f"unknown fields {unknown}; known: {sorted(_SUBMIT_KEYS)}")
    args, kwargs = data.get("args", []), data.get("kwargs", {})
    if not isinstance(args, list):
        raise ConsoleError(400, "args must be a JSON array")
    if not isinstance(kwargs, dict):
        raise ConsoleError(400, "kwargs must be a JSON object")
    clash = sorted(_OPTION_NAMES & set(kwargs))
    if clash:
        raise ConsoleError(400, f"kwargs {clash} are submission options, not task arguments")
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise ConsoleError(400, "tags must be an array of strings")
    options: dict[str, Any] = {}
    for name in ("priority", "countdown", "max_time"):
        value = data.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConsoleError(400, f"{name} must be a number")
            options[name] = value
    queue = data.get("queue")
    if queue is not None:
        if not isinstance(queue, str):
            raise ConsoleError(400, "queue must be a string")
        options["queue"] = queue
    if idempotency_key is not None and not idempotency_key.strip():
        raise ConsoleError(400, "the Idempotency-Key header is empty")
    try:
        task = await app.add_task(
            task_name, *args, idempotency_key=idempotency_key, tags=tags, **options, **kwargs
        )
    except TypeError as exc:  # keyword arguments that collide with add_task's own
        raise ConsoleError(400, f"bad arguments for {task_name!r}: {exc}") from exc
    except ConfigurationError as exc:  # arguments that do not fit the task's types, options
        raise ConsoleError(400, str(exc)) from exc
    assert task is not None  # without a timeout, add_task always answers the task
    return task


def _time(params: Mapping[str, str], name: str) -> int | None:
    text = params.get(name, "").strip()
    if not text:
        return None
    try:
        return audit.parse_time_us(text)
    except ConfigurationError as exc:
        raise ConsoleError(400, f"{name}: {exc}") from exc


def task_query(params: Mapping[str, str], limit: int = 50) -> TaskQuery:
    """A view query from request parameters: status, name, tag, queue, since, until, limit,
    after."""
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise ConsoleError(400, f"status must be one of {', '.join(STATUSES)}, not {status!r}")
    queue = params.get("queue") or None
    if queue is not None:
        # Any well-formed name: tasks of a queue the app no longer declares are still listed.
        try:
            Topology.check_queue_name(queue)
        except ConfigurationError as exc:
            raise ConsoleError(400, f"queue: {exc}") from exc
    text = params.get("limit", "").strip()
    if text:
        if not text.isdigit():
            raise ConsoleError(400, f"limit must be a whole number, not {text!r}")
        limit = int(text)
    try:
        return TaskQuery(
            status=status,
            task_name=params.get("name") or None,
            tag=params.get("tag") or None,
            queue=queue,
            since_us=_time(params, "since"),
            until_us=_time(params, "until"),
            limit=limit,
            after=params.get("after") or None,
        )
    except ConfigurationError as exc:
        raise ConsoleError(400, str(exc)) from exc


async def list_tasks(app: QueueTasks, params: Mapping[str, str]) -> TaskPage:
    query = task_query(params)
    try:
        return await app.page(query)
    except ConfigurationError as exc:  # no projector feeds this process's view
        raise ConsoleError(503, str(exc)) from exc


async def counts(app: QueueTasks) -> dict[str, int]:
    """Tasks per status, every status named."""
    try:
        known = await app.counts()
    except ConfigurationError as exc:
        raise ConsoleError(503, str(exc)) from exc
    return {s: known.get(s, 0) for s in STATUSES}


@dataclasses.dataclass(frozen=True, slots=True)
class TaskDetail:
    """A task page's content: the task and its history document, from one read of the log."""

    task: Task
    history: dict[str, Any]
    as_of_us: int | None
    #: The workflow the task is a step of, as ``qtasks-stream history --tree`` has it
    #: (:func:`qtasks_stream.workflows.tree.workflow_document`), now; None for other tasks.
    workflow: dict[str, Any] | None = None
    #: The step's path in that workflow ("0", "1.2", "body").
    workflow_step: str | None = None


async def detail(app: QueueTasks, task_id: str, as_of: str | None) -> TaskDetail:
    """The task and its history (:func:`qtasks_stream.ops.audit.history_document`), both from
    one read of the log; with ``as_of``, as they stood then."""
    at = None
    if as_of:
        try:
            at = audit.parse_time_us(as_of)
        except ConfigurationError as exc:
            raise ConsoleError(400, f"as_of: {exc}") from exc
    events = await app.history(task_id)
    if not events:
        raise ConsoleError(404, f"no events for task {task_id}")
    state = audit.state_as_of(events, at)
    if state is None:
        raise ConsoleError(404, f"task {task_id} had no events yet at {as_of}")
    document = audit.history_document(
        task_id, app.topology.events, events, at, app.payloads.decode_plain
    )
    submitted = next((e.payload for e in events if isinstance(e.payload, Submitted)), None)
    workflow = None
    if submitted is not None and submitted.workflow_id:
        workflow = await workflow_document(
            app.event_log,
            app.serde,
            app.topology.events,
            app.topology.partitions,
            submitted.workflow_id,
            app.payloads.decode_plain,
        )
    # From the same read as the timeline: the two agree, and the log is read once.
    return TaskDetail(
        state.to_task(app.payloads),
        document,
        at,
        workflow,
        submitted.workflow_step if workflow is not None and submitted is not None else None,
    )


async def get(app: QueueTasks, task_id: str, as_of: str | None) -> Task:
    try:
        task = await app.get(task_id, as_of=as_of or None)
    except ConfigurationError as exc:
        raise ConsoleError(400, f"as_of: {exc}") from exc
    if task is None:
        raise ConsoleError(404, f"no task {task_id}" + (f" at {as_of}" if as_of else ""))
    return task


async def cancel(app: QueueTasks, task_id: str, reason: str) -> Task:
    """Ask for a cancel; refused for a task with no events or that has ended."""
    task = await app.get(task_id)
    if task is None:
        raise ConsoleError(404, f"no task {task_id}")
    if task.final:
        raise ConsoleError(409, f"task {task_id} has ended ({task.status}): nothing to cancel")
    await app.cancel(task_id, reason=reason)
    return task


async def resubmit(app: QueueTasks, task_id: str, reason: str) -> int:
    """Start a new attempt of an ended task; answers the attempt's number."""
    found = await app.resubmit(ResubmitFilter(task_ids=frozenset({task_id})), reason=reason)
    chosen = next((r for r in found if r.task_id == task_id), None)
    if chosen is None:
        raise ConsoleError(404, f"no task {task_id}")
    if chosen.refused is not None or chosen.event is None:
        status = 404 if chosen.refused and "no events" in chosen.refused else 409
        raise ConsoleError(status, f"task {task_id} not resubmitted: {chosen.refused}")
    return chosen.event.attempt


@dataclasses.dataclass(frozen=True, slots=True)
class LetterRow:
    """A dead letter with whether it was replayed already."""

    letter: dlq.DeadLetter
    replayed: bool

    def to_json(self, topic: str) -> dict[str, Any]:
        document = self.letter.to_json(topic)
        document.pop("headers")
        document["id"] = f"{self.letter.partition}:{self.letter.offset}"
        document["replayed"] = self.replayed
        return document


async def dead_letters(app: QueueTasks, params: Mapping[str, str]) -> list[LetterRow]:
    """Letters of the dead-letter topic, newest first; ``stage`` and ``key`` filter."""
    await app.connect()
    stage, key = params.get("stage") or None, params.get("key") or None
    letters = await dlq.list_dead_letters(app.event_log, app.topology)
    done = await dlq.replayed_sources(app.event_log, app.serde, app.topology)
    rows = [
        LetterRow(d, d.source in done)
        for d in letters
        if (stage is None or d.stage == stage) and (key is None or d.task_id == key)
    ]
    return sorted(rows, key=lambda r: r.letter.timestamp_ms, reverse=True)


def parse_positions(values: list[Any]) -> set[tuple[int, int]]:
    """``["PARTITION:OFFSET", ...]`` → positions in the dead-letter topic."""
    positions = set()
    for text in values:
        partition, sep, offset = str(text).partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise ConsoleError(400, f"a dead letter is PARTITION:OFFSET, not {text!r}")
        positions.add((int(partition), int(offset)))
    return positions


async def replay_letters(
    app: QueueTasks, positions: set[tuple[int, int]], reason: str
) -> list[dlq.ReplayOutcome]:
    """Replay the dead letters at ``positions`` (each at most once:
    :mod:`qtasks_stream.ops.dlq`)."""
    if not positions:
        raise ConsoleError(400, "no dead letters chosen")
    await app.connect()
    outcomes = await dlq.replay(
        app.event_log,
        app.serde,
        app.topology,
        lambda d: (d.partition, d.offset) in positions,
        reason=reason,
    )
    found = {(o.letter.partition, o.letter.offset) for o in outcomes}
    missing = sorted(positions - found)
    if missing and not found:
        raise ConsoleError(404, f"no dead letters at {', '.join(f'{p}:{o}' for p, o in missing)}")
    return outcomes


def replay_request(body: bytes) -> tuple[set[tuple[int, int]], str]:
    """The letters and reason of a replay body ``{"letters": ["P:O", ...], "reason": ...}``."""
    data = _json_body(body)
    letters = data.get("letters")
    if not isinstance(letters, list):
        raise ConsoleError(400, 'letters must be an array of "PARTITION:OFFSET"')
    return parse_positions(letters), reason_of(data)
