"""Submitting a workflow, waiting for it and cancelling it, on a :class:`TaskClient`.

The client submits the steps that take no input (the heads) in one send, each carrying the
canvas; the workflow stage submits the rest. Waiting folds the steps' outcomes as the log
has them with the same fold the stage uses, so a wait sees a resubmitted step's new end.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtasks_stream.errors import ConfigurationError, TaskNotFoundError, UnknownTaskError
from qtasks_stream.events import CancelRequested, Submitted, TaskEvent, as_record, new_task_id
from qtasks_stream.workflows.canvas import Node, Signature, dumps, parse
from qtasks_stream.workflows.fold import (
    Launch,
    StepOutcome,
    advance,
    group_id,
    step_id,
)

if TYPE_CHECKING:
    from qtasks_stream.client import TaskClient
    from qtasks_stream.state import Task

__all__ = ["WorkflowHandle", "WorkflowResult", "attach", "cancel_workflow", "run_workflow"]

#: ``task_name`` of the ``CancelRequested`` event that cancels a whole workflow (keyed by
#: the workflow id, on the partition of its steps).
WORKFLOW_TASK_NAME = "qtasks.workflow"


@dataclass(frozen=True, slots=True)
class WorkflowResult:
    """How a workflow ended: ``status`` "success" (``value`` is the result: the last step's
    for a chain, the list of results for a group, the callback's for a chord) or "error"
    (``failures`` lists each failed step: task_id, task_name, status, error_type, message)."""

    workflow_id: str
    status: str
    value: Any
    failures: list[dict[str, Any]]


class WorkflowHandle:
    """A submitted workflow: its id, the ids of its steps, a wait and a cancel."""

    def __init__(self, client: TaskClient, workflow_id: str, canvas: Node) -> None:
        self.client = client
        self.workflow_id = workflow_id
        self.canvas = canvas

    def step_id(self, path: str) -> str:
        """The task id of the step at ``path`` ("0", "1.2", "body", see docs/workflows.md)."""
        return step_id(self.workflow_id, path, self.client.topology.partitions)

    async def result(self, timeout: float | None = None) -> WorkflowResult | None:
        """Wait until the workflow has ended (every step it will run has ended); ``None`` if
        it did not in time. A chain stopped by a failed step has ended with "error" (a
        ``resubmit`` of that step opens it again: wait again)."""
        try:
            async with asyncio.timeout(timeout):
                return await self._result()
        except TimeoutError:
            return None

    async def _result(self) -> WorkflowResult:
        # Every step watched at once, with one read of their histories (they share the
        # workflow's partition): a step the stage submits later reaches the listener.
        paths = _step_paths(self.canvas)
        ids = [self.step_id(path) for path in paths]
        waiters = dict(zip(paths, await self.client._watch_all(ids), strict=True))
        try:
            outcomes: dict[str, StepOutcome] = {}
            while True:
                launches: list[Launch] = []
                node = advance(self.canvas, outcomes, launches)
                if node.status != "running":
                    value = node.value if node.status == "succeeded" else None
                    status = "success" if node.status == "succeeded" else "error"
                    return WorkflowResult(self.workflow_id, status, value, node.failures)
                # The steps the fold waits for run now, or will once the stage submits them.
                for launch in launches:
                    state = await waiters[launch.path]
                    outcomes[launch.path] = _outcome(state.to_task(self.client.payloads))
        finally:
            for path, waiter in waiters.items():
                if not waiter.done():
                    self.client._results.forget(self.step_id(path), waiter)

    async def cancel(self, reason: str = "") -> None:
        """Cancel the workflow: its open steps are cancelled, and no further step starts."""
        await cancel_workflow(self.client, self.workflow_id, reason)


def _outcome(task: Task) -> StepOutcome:
    if task.status == "success":
        return StepOutcome(task.uuid, "succeeded", task.returning)
    failure = {
        "task_id": task.uuid,
        "task_name": task.task_name,
        "status": task.status,
        "error_type": task.error_type or ("Cancelled" if task.status == "cancel" else ""),
        "message": task.error_message or task.cancel_reason or "",
    }
    return StepOutcome(task.uuid, "failed", None, failure)


async def run_workflow(client: TaskClient, canvas: Node) -> WorkflowHandle:
    """Submit ``canvas`` (a signature, chain, group or chord) as one workflow.

    Raises:
        UnknownTaskError: a step names a task this app does not have.
        ConfigurationError: a step's arguments do not fit its task.
    """
    if isinstance(canvas, Signature):
        from qtasks_stream.workflows.canvas import chain

        canvas = chain(canvas)
    _check_tasks(client, canvas)
    await client._ensure_client()
    await client.payloads.start(client.definitions.values())
    workflow_id = new_task_id()
    partitions = client.topology.partitions
    heads: list[Launch] = []
    advance(canvas, {}, heads)
    text = dumps(canvas, {id(s) for s in _head_signatures(canvas)})
    records = []
    for launch in heads:
        definition = client.definitions[launch.task]
        call = client.payloads.encode_call(definition, launch.args, launch.kwargs)
        task_id = step_id(workflow_id, launch.path, partitions)
        submitted = call.submitted(
            definition,
            workflow_id=workflow_id,
            workflow_step=launch.path,
            group_id=(
                group_id(workflow_id, launch.group, partitions)
                if launch.group is not None
                else None
            ),
            workflow=text,
        )
        event = client._intercept(
            client.topology.events,
            task_id,
            TaskEvent.new(task_id, launch.task, 0, "client", submitted),
        )
        records.append(as_record(client.serde, client.topology.events, task_id, event))
    # One send, to one partition: the steps share the workflow's partition.
    await client._producer.send(records)
    return WorkflowHandle(client, workflow_id, canvas)


#: How deep the first step of a workflow may be nested for :func:`attach` to find it.
_ATTACH_DEPTH = 8


async def attach(client: TaskClient, workflow_id: str) -> WorkflowHandle:
    """The handle of a workflow submitted earlier (by any process), from the log.

    The first step in canvas order is always one the client submitted, at path "0", "0.0",
    "0.0.0"... (the first child at each level): their histories, read in one pass, give the
    canvas.

    Raises:
        TaskNotFoundError: the log has no workflow of that id.
    """
    partitions = client.topology.partitions
    paths = [".".join("0" * depth) for depth in range(1, _ATTACH_DEPTH + 1)]
    ids = [step_id(workflow_id, path, partitions) for path in paths]
    histories = await client._histories(ids, skip_undecodable=True)
    for events in histories.values():
        for event in events:
            payload = event.payload
            if (
                isinstance(payload, Submitted)
                and payload.workflow_id == workflow_id
                and payload.workflow is not None
            ):
                return WorkflowHandle(client, workflow_id, parse(payload.workflow))
    raise TaskNotFoundError(f"no workflow {workflow_id} in {client.topology.events}")


async def cancel_workflow(client: TaskClient, workflow_id: str, reason: str = "") -> None:
    await client._ensure_client()
    event = TaskEvent.new(workflow_id, WORKFLOW_TASK_NAME, 0, "client", CancelRequested(reason))
    event = client._intercept(client.topology.events, workflow_id, event)
    await client._producer.send(
        [as_record(client.serde, client.topology.events, workflow_id, event)]
    )


def _step_paths(node: Node, path: str = "") -> list[str]:
    """The path of every step of ``node`` (as :func:`~qtasks_stream.workflows.fold.advance`
    names them)."""
    from qtasks_stream.workflows.canvas import Chain, Group, child

    if isinstance(node, Signature):
        return [path or "0"]
    if isinstance(node, Chain):
        return [p for i, s in enumerate(node.steps) for p in _step_paths(s, child(path, i))]
    if isinstance(node, Group):
        return [p for i, m in enumerate(node.members) for p in _step_paths(m, child(path, i))]
    return _step_paths(node.header, path) + _step_paths(node.body, child(path, "body"))


def _signatures(node: Node) -> list[Signature]:
    from qtasks_stream.workflows.canvas import Chain, Group

    if isinstance(node, Signature):
        return [node]
    if isinstance(node, Chain):
        return [s for step in node.steps for s in _signatures(step)]
    if isinstance(node, Group):
        return [s for m in node.members for s in _signatures(m)]
    return _signatures(node.header) + _signatures(node.body)


def _head_signatures(node: Node) -> list[Signature]:
    """The signatures that take no input: first steps, reached without a step before them."""
    from qtasks_stream.workflows.canvas import Chain, Group

    if isinstance(node, Signature):
        return [node]
    if isinstance(node, Chain):
        return _head_signatures(node.steps[0])
    if isinstance(node, Group):
        return [s for m in node.members for s in _head_signatures(m)]
    return _head_signatures(node.header)


def _check_tasks(client: TaskClient, canvas: Node) -> None:
    for signature in _signatures(canvas):
        if signature.task not in client.definitions:
            known = ", ".join(sorted(client.definitions)) or "none"
            raise UnknownTaskError(
                f"workflow step: no task named {signature.task!r} (registered: {known})"
            )
        if not isinstance(signature.kwargs, dict):
            raise ConfigurationError(f"kwargs of step {signature.task!r} must be a dict")
