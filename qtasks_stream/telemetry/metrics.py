"""``MetricsInterceptor``: task counts, durations, queue wait, consumer lag and in-flight.

Counts come from the events as stages emit them (one count per event), so they match the
events in the log; an emit whose transaction is later fenced is redone by the partition's
next owner and counted again, a rare overcount this accepts. The meter provider is passed
in; nothing here touches the global providers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from qtasks_stream.errors import QTasksStreamError
from qtasks_stream.events import TaskEvent, now_us
from qtasks_stream.executors.base import Executor
from qtasks_stream.interceptors import (
    EmitInput,
    EmitNext,
    ExecuteInput,
    ExecuteNext,
    Interceptor,
    SkipInput,
    StepInput,
    StepNext,
)

__all__ = ["COUNTED_KINDS", "MetricsInterceptor"]

log = logging.getLogger("qtasks_stream.telemetry")

#: Event kind → the counter it adds one to (``qtasks.tasks.<name>``).
COUNTED_KINDS = {
    "Submitted": "submitted",
    "Succeeded": "succeeded",
    "Failed": "failed",
    "TimedOut": "failed",
    "RetryScheduled": "retried",
    "DeadLettered": "dead_lettered",
    "Cancelled": "cancelled",
}


class MetricsInterceptor(Interceptor):
    """Task metrics through OpenTelemetry.

    Instruments (attribute ``qtasks.task.name`` unless said otherwise):
    ``qtasks.tasks.{submitted,succeeded,failed,retried,dead_lettered,cancelled}`` counters;
    ``qtasks.triggers.skipped`` (records a trigger's filter skipped; also ``qtasks.topic``);
    ``qtasks.task.duration`` (s, also ``qtasks.task.status``) and ``qtasks.task.queue_wait``
    (s, from the lane record's timestamp, or from the submit where the log keeps none)
    histograms; ``qtasks.worker.in_flight`` and ``qtasks.worker.abandoned`` (calls left
    running in a thread after their attempt timed out or was cancelled; ``qtasks.worker.id``);
    ``qtasks.consumer.lag``
    (per stage, topic and partition, measured at most every ``lag_interval`` seconds while
    the stage receives records).
    """

    def __init__(self, meter_provider: MeterProvider, *, lag_interval: float = 5.0) -> None:
        meter = meter_provider.get_meter("qtasks_stream")
        self._counters = {
            name: meter.create_counter(
                f"qtasks.tasks.{name}", unit="{task}", description=f"tasks {name}"
            )
            for name in dict.fromkeys(COUNTED_KINDS.values())
        }
        self._skipped = meter.create_counter(
            "qtasks.triggers.skipped", unit="{record}", description="records a filter skipped"
        )
        self._duration = meter.create_histogram(
            "qtasks.task.duration", unit="s", description="execution time of one attempt"
        )
        self._queue_wait = meter.create_histogram(
            "qtasks.task.queue_wait", unit="s", description="time a work item waited to start"
        )
        self._in_flight = meter.create_up_down_counter(
            "qtasks.worker.in_flight", unit="{task}", description="attempts running"
        )
        meter.create_observable_gauge(
            "qtasks.worker.abandoned",
            callbacks=[self._observe_abandoned],
            unit="{call}",
            description="calls still running after their attempt ended (threads held)",
        )
        #: The executor of each worker seen running an attempt.
        self._executors: dict[str, Executor] = {}
        meter.create_observable_gauge(
            "qtasks.consumer.lag",
            callbacks=[self._observe_lag],
            unit="{message}",
            description="records between a stage's position and the partition's end",
        )
        self._lag_interval = lag_interval
        self._lag_measured: dict[str, float] = {}
        #: Latest lag per stage: (topic, partition, group) → records.
        self._lag: dict[str, dict[tuple[str, int, str], int]] = {}

    def emit(self, input: EmitInput, next: EmitNext) -> None:
        next(input)
        event = input.value
        if isinstance(event, TaskEvent):
            counter = COUNTED_KINDS.get(event.kind)
            if counter is not None:
                self._counters[counter].add(1, {"qtasks.task.name": event.task_name})

    def skipped(self, input: SkipInput) -> None:
        self._skipped.add(
            1, {"qtasks.task.name": input.task_name, "qtasks.topic": input.record.topic}
        )

    async def execute(self, input: ExecuteInput, next: ExecuteNext) -> Any:
        item = input.item
        name = {"qtasks.task.name": item.task_name}
        worker = {"qtasks.worker.id": input.worker_id}
        if input.executor is not None:
            self._executors[input.worker_id] = input.executor
        rec = input.record
        enqueued_us = max(item.submitted_at_us, rec.timestamp_ms * 1000 if rec else 0)
        self._queue_wait.record(max(0, now_us() - enqueued_us) / 1e6, name)
        self._in_flight.add(1, worker)
        started = time.perf_counter()
        status = "error"
        try:
            result = await next(input)
            status = "success"
            return result
        finally:
            self._in_flight.add(-1, worker)
            self._duration.record(
                time.perf_counter() - started, {**name, "qtasks.task.status": status}
            )

    async def step(self, input: StepInput, next: StepNext) -> None:
        await next(input)
        now = time.monotonic()
        if now - self._lag_measured.get(input.stage, -self._lag_interval) < self._lag_interval:
            return
        self._lag_measured[input.stage] = now
        try:
            lag = await input.measure_lag()
        except QTasksStreamError as exc:
            log.debug("stage %s: lag not measured: %s", input.stage, exc)
            return
        self._lag[input.stage] = {(tp.topic, tp.partition, input.group): n for tp, n in lag.items()}

    def _observe_abandoned(self, options: CallbackOptions) -> Iterable[Observation]:
        for worker_id, executor in list(self._executors.items()):
            yield Observation(executor.abandoned, {"qtasks.worker.id": worker_id})

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        for stage, lags in list(self._lag.items()):
            for (topic, partition, group), n in lags.items():
                yield Observation(
                    n,
                    {
                        "qtasks.stage": stage,
                        "messaging.destination.name": topic,
                        "messaging.destination.partition.id": str(partition),
                        "messaging.consumer.group.name": group,
                    },
                )
