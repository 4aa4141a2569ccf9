"""The fold of a workflow: from its canvas and what its steps did, what runs next and how
it ended. Pure: the workflow stage folds steps' events with it to decide, a client to wait.

A step's outcome is its task's last end (a resubmitted step is running again). A chain
stops at its first step that did not succeed; a group is done when all its members are,
failed if any failed; a chord's callback runs once its group is done, if all succeeded or
``on_error="pass"`` (then a failed member's place in the list holds its failure).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from qtasks_stream.eventlog.partitioning import murmur2_partition
from qtasks_stream.workflows.canvas import Chain, Group, Node, Signature, child

__all__ = [
    "Launch",
    "NodeResult",
    "StepOutcome",
    "advance",
    "group_id",
    "is_step_id",
    "step_id",
]

Status = Literal["running", "succeeded", "failed"]


@dataclass(slots=True)
class StepOutcome:
    """What one step (a task) did last: ``value`` is its result when it succeeded."""

    task_id: str
    status: Status = "running"
    value: Any = None
    #: When it did not succeed: task_id, status, error_type, message.
    failure: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Launch:
    """A step to submit now: its task, arguments (the input first) and where it came from."""

    path: str
    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: Task ids of the steps whose results make up the input.
    parents: tuple[str, ...]
    #: The innermost group's path, if the step is in one.
    group: str | None
    #: Whether the step takes another step's result (False: the client submits it).
    has_input: bool


@dataclass(slots=True)
class NodeResult:
    status: Status
    value: Any = None
    #: Task ids whose results make up ``value``.
    parents: tuple[str, ...] = ()
    failures: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Input:
    value: Any
    parents: tuple[str, ...]


def advance(
    node: Node,
    outcomes: Mapping[str, StepOutcome],
    launches: list[Launch],
    path: str = "",
    given: _Input | None = None,
    group: str | None = None,
) -> NodeResult:
    """The state of ``node`` at ``path`` given the steps' ``outcomes`` (by path); appends to
    ``launches`` every step that may run now and has no outcome yet."""
    if isinstance(node, Signature):
        path = path or "0"
        outcome = outcomes.get(path)
        if outcome is None:
            args = node.args if given is None else (given.value, *node.args)
            parents = () if given is None else given.parents
            launches.append(
                Launch(path, node.task, args, node.kwargs, parents, group, given is not None)
            )
            return NodeResult("running")
        if outcome.status == "succeeded":
            return NodeResult("succeeded", outcome.value, (outcome.task_id,))
        if outcome.status == "failed":
            failure = outcome.failure or {"task_id": outcome.task_id}
            return NodeResult("failed", failure, (outcome.task_id,), [failure])
        return NodeResult("running")
    if isinstance(node, Chain):
        current = given
        result = NodeResult("succeeded")
        for index, step in enumerate(node.steps):
            result = advance(step, outcomes, launches, child(path, index), current, group)
            if result.status != "succeeded":
                return result  # a chain stops at a step that is not done or failed
            current = _Input(result.value, result.parents)
        return result
    if isinstance(node, Group):
        return _group(node, outcomes, launches, path, given)
    header = _group(node.header, outcomes, launches, path, given)
    if header.status == "running" or (header.status == "failed" and node.on_error != "pass"):
        return header
    body_input = _Input(header.value, header.parents)
    return advance(node.body, outcomes, launches, child(path, "body"), body_input, group)


def _group(
    node: Group,
    outcomes: Mapping[str, StepOutcome],
    launches: list[Launch],
    path: str,
    given: _Input | None,
) -> NodeResult:
    members = [
        advance(m, outcomes, launches, child(path, i), given, path)
        for i, m in enumerate(node.members)
    ]
    parents = tuple(p for m in members for p in m.parents)
    if any(m.status == "running" for m in members):
        return NodeResult("running", None, parents)
    values = [m.value for m in members]
    failures = [f for m in members for f in m.failures]
    return NodeResult("failed" if failures else "succeeded", values, parents, failures)


def _hex_id(workflow_id: str, what: str, partitions: int) -> str:
    """An id derived from the workflow's, on the workflow's partition of a topic of
    ``partitions``: every step of a workflow is in one partition, so one workflow stage
    instance sees them all, in order. A version 8 id (RFC 9562's custom one) with the
    workflow id's time where a version 7 has it: the version says it is a step's without
    any state (:func:`is_step_id`), and reading its history starts near its submit
    (:func:`~qtasks_stream.events.task_id_ms`)."""
    want = murmur2_partition(workflow_id.encode(), partitions)
    stamp = workflow_id.replace("-", "")[:12]
    # About `partitions` tries on average: the salt that lands on the workflow's partition.
    for salt in range(1 << 20):
        digest = hashlib.sha256(f"{workflow_id}/{what}/{salt}".encode()).hexdigest()
        text = f"{stamp}8{digest[:3]}{'89ab'[int(digest[3], 16) % 4]}{digest[4:19]}"
        candidate = str(uuid.UUID(text))
        if murmur2_partition(candidate.encode(), partitions) == want:
            return candidate
    raise AssertionError("no id on the workflow's partition")  # pragma: no cover


def is_step_id(key: bytes) -> bool:
    """Whether a record key is a workflow step's task id (see :func:`step_id`)."""
    return len(key) == 36 and key[14] == 0x38  # "8"


def step_id(workflow_id: str, path: str, partitions: int) -> str:
    """The task id of the step at ``path``: the same for every fold, so a step decided twice
    (a fold redone after a crash) is one task, which the scheduler submits once."""
    return _hex_id(workflow_id, f"step:{path}", partitions)


def group_id(workflow_id: str, path: str, partitions: int) -> str:
    return _hex_id(workflow_id, f"group:{path}", partitions)
