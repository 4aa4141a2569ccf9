"""The workflow stage: folds the ends of workflow steps and submits the steps that follow.

It reads the events topic in its own consumer group. Every step of a workflow has its id on
the workflow's partition (:func:`~qtasks_stream.workflows.fold.step_id`), so one instance
sees all of a workflow's steps, in order. Its state is the fold of the log: on each partition
it is given it reads from offset 0 to the end first (restoring, no actions), then acts on
every workflow there, as the scheduler does.

What it emits (the next step's ``Submitted``, the ``CancelRequested`` of a cancelled
workflow's open steps) commits in the runner's transaction with the offset of the event that
caused it. A fold redone after a crash decides the same steps with the same ids, and the
scheduler ignores a repeated ``Submitted``: each step runs once.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from qtasks_stream.errors import ConfigurationError, SerdeError
from qtasks_stream.events import (
    CancelRequested,
    DeadLettered,
    Failed,
    Resubmitted,
    Submitted,
    Succeeded,
    TaskEvent,
    TimedOut,
    event_kind,
    now_us,
)
from qtasks_stream.records import Record, TopicPartition
from qtasks_stream.serde.payloads import TaskPayloads
from qtasks_stream.stages.base import Checkpoint, Incoming, Restore, Stage
from qtasks_stream.tasks import TaskDefinition
from qtasks_stream.topology import Topology
from qtasks_stream.workflows.canvas import Node, parse
from qtasks_stream.workflows.fold import (
    Launch,
    StepOutcome,
    advance,
    group_id,
    is_step_id,
    step_id,
)

__all__ = ["INVALID_STEP", "WorkflowStage"]

log = logging.getLogger("qtasks_stream.workflows")
SOURCE = "workflow"
#: ``error_type`` of a step that could not be submitted (unknown task, arguments that do not
#: fit): recorded as its failure, so the workflow stops visibly.
INVALID_STEP = "qtasks_stream.WorkflowStepInvalid"
_ENDS = frozenset({"Succeeded", "Failed", "Cancelled", "TimedOut", "DeadLettered"})
#: Kinds of a known step (or workflow) the stage decodes; a Submitted is always decoded.
_KINDS = _ENDS | {"Resubmitted", "CancelRequested"}
_PRUNE_EVERY_US = 60_000_000


@dataclass(slots=True)
class _Workflow:
    workflow_id: str
    canvas: Node
    text: str
    tp: TopicPartition
    steps: dict[str, StepOutcome] = field(default_factory=dict)
    cancelled: bool = False
    #: Paths of the steps whose cancel the log holds (asked for by this stage or anyone).
    cancel_sent: set[str] = field(default_factory=set)
    #: When the fold last found it ended (ms), None while it runs: pruned past the retention.
    ended_ms: int | None = None


class WorkflowStage(Stage):
    name = "workflow"
    #: The scheduler and the projector read the same records and dead-letter what they cannot
    #: decode; a third copy of each dead letter would be noise (and replayed twice).
    dead_letters = False

    def __init__(
        self,
        topology: Topology,
        payloads: TaskPayloads,
        definitions: Mapping[str, TaskDefinition],
    ) -> None:
        self._topology = topology
        self._payloads = payloads
        self._definitions = definitions
        self._workflows: dict[str, _Workflow] = {}
        #: Step task id → (workflow id, path).
        self._step_of: dict[str, tuple[str, str]] = {}
        self._restoring = Restore()
        self._next_prune_us = 0

    @property
    def topics(self) -> Sequence[str]:
        return [self._topology.events]

    async def on_assigned(
        self, partitions: Sequence[TopicPartition], ends: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        return dict.fromkeys(self._restoring.begin(partitions, ends), 0)

    async def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        gone = set(partitions)
        self._restoring.drop(gone)
        for wf in [w for w in self._workflows.values() if w.tp in gone]:
            del self._workflows[wf.workflow_id]
            for outcome in wf.steps.values():
                self._step_of.pop(outcome.task_id, None)

    def positions_wanted(self) -> Collection[TopicPartition]:
        return self._restoring.wanted()

    async def advanced(
        self, positions: Mapping[TopicPartition, int], checkpoint: Checkpoint
    ) -> None:
        for tp, _ in self._restoring.reached(positions):
            for wf in [w for w in self._workflows.values() if w.tp == tp]:
                if wf.cancelled:
                    # The cancels a predecessor decided but did not commit.
                    self._cancel_steps(wf, checkpoint, None)
                else:
                    self._act(wf, checkpoint, None)

    def wants_value(self, record: Record) -> bool:
        kind = event_kind(record.headers)
        if kind is None:
            return False  # not written by this package: every step's event has its kind
        if kind == "CancelRequested":
            return True  # of a workflow (its id is no step's) or of a step
        # Decided per record before the batch is handled, so not from the state the batch
        # builds (a restore reads a step's Submitted and its end in one batch): a step's id
        # says it is one. Every step is submitted under its step id, so the Submitted of a
        # plain task (most of them) is not decoded.
        return (
            (kind == "Submitted" or kind in _KINDS)
            and record.key is not None
            and is_step_id(record.key)
        )

    def held(self) -> dict[str, int]:
        return {"workflows": len(self._workflows), "steps": len(self._step_of)}

    async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
        for item in batch:
            event: TaskEvent | None = item.value
            if event is None:
                continue
            rec = item.record
            wf = self._fold(event, rec.tp)
            if wf is None:
                continue
            if event.kind in _ENDS or isinstance(event.payload, Resubmitted):
                self._decide(wf, event.at_us // 1000)
            if rec.tp in self._restoring:
                continue
            if isinstance(event.payload, CancelRequested) and event.task_id == wf.workflow_id:
                self._cancel_steps(wf, checkpoint, rec)
            elif event.kind in _ENDS:
                self._act(wf, checkpoint, rec)

    # -- the fold ----------------------------------------------------------------------------

    def _fold(self, event: TaskEvent, tp: TopicPartition) -> _Workflow | None:
        payload = event.payload
        if isinstance(payload, Submitted):
            if payload.workflow_id is None or payload.workflow_step is None:
                return None
            wf = self._workflows.get(payload.workflow_id)
            if wf is None:
                if payload.workflow is None:
                    return None
                try:
                    canvas = parse(payload.workflow)
                except ConfigurationError as exc:
                    log.error("workflow %s: %s", payload.workflow_id, exc)
                    return None
                wf = _Workflow(payload.workflow_id, canvas, payload.workflow, tp)
                self._workflows[wf.workflow_id] = wf
            if payload.workflow_step not in wf.steps:
                wf.steps[payload.workflow_step] = StepOutcome(event.task_id)
                self._step_of[event.task_id] = (wf.workflow_id, payload.workflow_step)
            return wf
        if isinstance(payload, CancelRequested) and event.task_id in self._workflows:
            wf = self._workflows[event.task_id]
            wf.cancelled = True
            return wf
        where = self._step_of.get(event.task_id)
        if where is None:
            return None
        wf = self._workflows[where[0]]
        outcome = wf.steps[where[1]]
        if isinstance(payload, CancelRequested):
            wf.cancel_sent.add(where[1])
            return None  # its end, if it comes, is what the fold takes
        if isinstance(payload, Resubmitted):
            outcome.status, outcome.value, outcome.failure = "running", None, None
        elif isinstance(payload, Succeeded):
            try:
                outcome.value = self._payloads.decode_result(
                    self._definitions.get(event.task_name),
                    payload.content_type,
                    payload.result,
                    payload.result_avro,
                )
                outcome.status, outcome.failure = "succeeded", None
            except (SerdeError, ValueError) as exc:
                outcome.status = "failed"
                outcome.failure = _failure(event, "error", type(exc).__qualname__, str(exc))
        elif event.kind in _ENDS:
            outcome.status = "failed"
            outcome.failure = _failure_of(event)
        return wf

    # -- actions -----------------------------------------------------------------------------

    def _decide(self, wf: _Workflow, now_ms: int) -> list[Launch]:
        """The steps that may run now; notes whether the workflow has ended."""
        launches: list[Launch] = []
        root = advance(wf.canvas, wf.steps, launches)
        if root.status == "running" and not wf.cancelled:
            wf.ended_ms = None
        elif wf.ended_ms is None:
            wf.ended_ms = now_ms
        return launches

    async def tick(self, checkpoint: Checkpoint) -> float | None:
        now = now_us()
        if now >= self._next_prune_us:
            self._next_prune_us = now + _PRUNE_EVERY_US
            self._prune(now // 1000)
        return None

    def _prune(self, now_ms: int) -> None:
        """Forget workflows that ended longer than the events retention ago: a restore would
        no longer find their steps either (and a resubmit no longer their arguments)."""
        if self._topology.retention_ms < 0:
            return  # kept forever
        horizon_ms = now_ms - self._topology.retention_ms
        for wf in list(self._workflows.values()):
            if wf.ended_ms is not None and wf.ended_ms < horizon_ms:
                del self._workflows[wf.workflow_id]
                for outcome in wf.steps.values():
                    self._step_of.pop(outcome.task_id, None)

    def _act(self, wf: _Workflow, checkpoint: Checkpoint, origin: Record | None) -> None:
        if wf.cancelled:
            return
        for launch in self._decide(wf, now_us() // 1000):
            if launch.has_input and launch.path not in wf.steps:
                self._submit(wf, launch, checkpoint, origin)

    def _submit(
        self, wf: _Workflow, launch: Launch, checkpoint: Checkpoint, origin: Record | None
    ) -> None:
        partitions = self._topology.partitions
        task_id = step_id(wf.workflow_id, launch.path, partitions)
        definition = self._definitions.get(launch.task)
        try:
            if definition is None:
                raise ConfigurationError(f"no task named {launch.task!r} in this worker's app")
            call = self._payloads.encode_call(definition, launch.args, launch.kwargs)
        except ConfigurationError as exc:
            log.error("workflow %s step %s: %s", wf.workflow_id, launch.path, exc)
            failed = Failed(INVALID_STEP, str(exc), "", 0.0)
            event = TaskEvent.new(task_id, launch.task, 0, SOURCE, failed)
            checkpoint.emit(self._topology.events, task_id, event, origin)
            outcome = StepOutcome(task_id, "failed")
            outcome.failure = _failure(event, "error", INVALID_STEP, str(exc))
            wf.steps[launch.path] = outcome
            self._step_of[task_id] = (wf.workflow_id, launch.path)
            return
        submitted = call.submitted(
            definition,
            workflow_id=wf.workflow_id,
            workflow_step=launch.path,
            workflow_parents=launch.parents,
            group_id=(
                group_id(wf.workflow_id, launch.group, partitions)
                if launch.group is not None
                else None
            ),
            workflow=wf.text,
        )
        event = TaskEvent.new(task_id, launch.task, 0, SOURCE, submitted)
        checkpoint.emit(self._topology.events, task_id, event, origin)
        # Folded now: our own Submitted, read back later, is then a repeat.
        wf.steps[launch.path] = StepOutcome(task_id)
        self._step_of[task_id] = (wf.workflow_id, launch.path)

    def _cancel_steps(self, wf: _Workflow, checkpoint: Checkpoint, origin: Record | None) -> None:
        for path, outcome in wf.steps.items():
            if outcome.status == "running" and path not in wf.cancel_sent:
                wf.cancel_sent.add(path)
                reason = f"workflow {wf.workflow_id} cancelled"
                event = TaskEvent.new(outcome.task_id, "", 0, SOURCE, CancelRequested(reason))
                log.debug("workflow %s: cancelling step %s", wf.workflow_id, path)
                checkpoint.emit(self._topology.events, outcome.task_id, event, origin)


def _failure(event: TaskEvent, status: str, error_type: str, message: str) -> dict[str, str]:
    return {
        "task_id": event.task_id,
        "task_name": event.task_name,
        "status": status,
        "error_type": error_type,
        "message": message,
    }


def _failure_of(event: TaskEvent) -> dict[str, str]:
    payload = event.payload
    if isinstance(payload, Failed):
        return _failure(event, "error", payload.error_type, payload.message)
    if isinstance(payload, TimedOut):
        return _failure(event, "timeout", "TimeoutError", f"over {payload.max_time}s")
    if isinstance(payload, DeadLettered):
        return _failure(event, "dead_letter", "DeadLettered", payload.reason)
    reason = getattr(payload, "reason", "")
    return _failure(event, "cancel", "Cancelled", str(reason))
