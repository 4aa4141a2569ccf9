"""``StageRuntime``: the stages one process runs, and their lifecycle.

Built by :meth:`QueueTasks.start <qtasks_stream.app.QueueTasks.start>` only: a process that
only submits and reads never imports the stages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.executors.base import Executor
from qtasks_stream.interceptors import Interceptor
from qtasks_stream.schedules.stage import ScheduleStage
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.payloads import TaskPayloads
from qtasks_stream.stages.base import Stage
from qtasks_stream.stages.deadletter import DeadLetterStage
from qtasks_stream.stages.projector import ProjectorStage
from qtasks_stream.stages.runner import StageRunner
from qtasks_stream.stages.scheduler import SchedulerStage
from qtasks_stream.stages.worker import WorkerStage
from qtasks_stream.state import TaskState
from qtasks_stream.tasks import TaskDefinition
from qtasks_stream.topology import Topology
from qtasks_stream.triggers.stage import TriggerStage, triggered
from qtasks_stream.views.base import ViewStore

__all__ = ["StageRuntime"]

log = logging.getLogger("qtasks_stream")


class StageRuntime:
    """Runs stages on the components the app wired; ``echo_self`` builds the ``self`` of
    ``echo=True`` tasks."""

    def __init__(
        self,
        *,
        topology: Topology,
        event_log: EventLog,
        serde: Serde,
        registry: SchemaRegistryClient,
        payloads: TaskPayloads,
        view: ViewStore,
        definitions: Mapping[str, TaskDefinition],
        executor: Executor,
        interceptors: Sequence[Interceptor],
        instance_id: str,
        batch_size: int,
        poll_timeout: float,
        concurrency: int,
        lane_weights: Sequence[int] | None,
        shutdown_grace: float,
        echo_self: Callable[[Any], Any],
        queues: Sequence[str],
        unknown_task_deadline: float,
        run_state: Callable[[str], Awaitable[TaskState | None]],
    ) -> None:
        self.topology = topology
        self.event_log = event_log
        self.serde = serde
        self.registry = registry
        self.payloads = payloads
        self.view = view
        self.definitions = definitions
        self.executor = executor
        self.interceptors = interceptors
        self.instance_id = instance_id
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.concurrency = concurrency
        self.lane_weights = lane_weights
        self.shutdown_grace = shutdown_grace
        self.echo_self = echo_self
        self.queues = queues
        self.unknown_task_deadline = unknown_task_deadline
        self.run_state = run_state
        self.runners: dict[str, StageRunner] = {}
        self._runner_tasks: list[asyncio.Task[None]] = []

    def start(self, stages: Sequence[str]) -> None:
        """Run ``stages`` (those not running yet), each as a task of the running loop."""
        for stage_name in stages:
            if stage_name in self.runners:
                continue
            if stage_name == "trigger" and not triggered(self.definitions):
                continue  # no task is triggered by a topic: nothing to consume
            runner = StageRunner(
                self._build_stage(stage_name),
                event_log=self.event_log,
                serde=self.serde,
                topology=self.topology,
                instance_id=self.instance_id,
                batch_size=self.batch_size,
                poll_timeout=self.poll_timeout,
                interceptors=self.interceptors,
            )
            self.runners[stage_name] = runner
            self._runner_tasks.append(
                asyncio.create_task(runner.run(), name=f"qtasks-stage-{stage_name}")
            )

    def _build_stage(self, name: str) -> Stage:
        if name == "scheduler":
            return SchedulerStage(self.topology)
        if name == "projector":
            return ProjectorStage(self.topology, self.view)
        if name == "deadletter":
            return DeadLetterStage(self.topology)
        if name == "schedules":
            return ScheduleStage(self.topology, self.run_state)
        if name == "workflow":
            from qtasks_stream.workflows.stage import WorkflowStage

            return WorkflowStage(self.topology, self.payloads, self.definitions)
        if name == "trigger":
            return TriggerStage(
                self.topology, self.definitions, self.payloads, self.registry, self.interceptors
            )
        return WorkerStage(
            self.topology,
            tasks=self.definitions,
            executor=self.executor,
            serde=self.serde,
            payloads=self.payloads,
            control=lambda: self.event_log.consumer(
                [self.topology.control], group_id=None, pauses=False
            ),
            worker_id=f"worker:{self.instance_id}",
            concurrency=self.concurrency,
            lane_weights=self.lane_weights,
            interceptors=self.interceptors,
            echo_self=self.echo_self,
            shutdown_grace=self.shutdown_grace,
            queues=self.queues,
            unknown_task_deadline=self.unknown_task_deadline,
        )

    async def close(self) -> None:
        """Stop the stages, letting running attempts finish within the grace."""
        for runner in self.runners.values():
            runner.request_stop()
        results = await asyncio.gather(*self._runner_tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("a stage ended with an error", exc_info=result)
        self.runners.clear()
        self._runner_tasks.clear()
