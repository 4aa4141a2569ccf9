"""``QueueTasks``: the application object and the composition root of its components.

It registers tasks, submits and awaits them, and runs the stages of the pipeline. Every
component is passed in or defaulted here (and only here): the in-memory event log, the
``mock://`` schema registry and the in-memory view make the embedded default, which needs
no server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import audit
from qtasks_stream.errors import (
    ConfigurationError,
    EventLogError,
    QTasksStreamError,
    SerdeError,
    UnknownTaskError,
)
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.memory import InMemoryEventLog, murmur2_partition
from qtasks_stream.events import (
    CancelRequested,
    Submitted,
    TaskEvent,
    as_record,
    event_kind,
    new_task_id,
    now_us,
    task_id_ms,
)
from qtasks_stream.executors.base import Executor
from qtasks_stream.executors.pool import LocalExecutor
from qtasks_stream.interceptors import EmitInput, Interceptor, chain_emit, wants
from qtasks_stream.records import TopicPartition
from qtasks_stream.rerun import Resubmission, ResubmitFilter, find_resubmissions, records_of
from qtasks_stream.results import ResultListener
from qtasks_stream.schedules.api import Schedules
from qtasks_stream.schedules.records import Schedule
from qtasks_stream.schedules.stage import ScheduleStage
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.payloads import TaskPayloads
from qtasks_stream.stages.base import Stage
from qtasks_stream.stages.deadletter import DeadLetterStage
from qtasks_stream.stages.projector import ProjectorStage
from qtasks_stream.stages.runner import StageRunner
from qtasks_stream.stages.scheduler import SchedulerStage
from qtasks_stream.stages.worker import WorkerStage
from qtasks_stream.state import Task, TaskState, fold
from qtasks_stream.tasks import Router, TaskDefinition, TaskSelf
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import TaskPage, TaskQuery, ViewStore
from qtasks_stream.views.memory import MemoryViewStore

__all__ = ["STAGES", "QueueTasks"]

log = logging.getLogger("qtasks_stream")

#: Every stage, in start order.
STAGES = ("projector", "deadletter", "scheduler", "worker", "schedules")
_IDEMPOTENCY_NS = uuid.UUID("5b0a4f0e-7c51-4d8a-9a55-6f1c1c2b8e11")
#: A task's history is read from this long before its id's time: the ``Submitted`` record's
#: timestamp is its client's clock (CreateTime), or the broker's on a LogAppendTime topic.
_HISTORY_CLOCK_MARGIN_MS = 60_000
#: How long before the events retention ends a delayed task must start at the latest.
_RETENTION_MARGIN_MS = 3_600_000


class QueueTasks(Router):
    """A qtasks-stream application.

    Args:
        name: the application name; topics and groups derive from it.
        event_log: defaults to a fresh :class:`InMemoryEventLog` (the embedded default).
        schema_registry: a ``SchemaRegistryClient``; defaults to an in-process ``mock://``.
        view: the task view; defaults to :class:`MemoryViewStore`.
        executor: where task functions run; defaults to :class:`LocalExecutor`.
        topic_prefix, partitions, lanes, retention_ms: see :class:`Topology`.
        concurrency: attempts one worker runs at once.
        lane_weights: one positive weight per lane, e.g. ``(8, 2, 1)``: a worker with work
            in several lanes serves them in these proportions (smooth weighted round robin),
            so a busy high-priority lane cannot starve the others. ``None`` (the default):
            strict priority, the lowest lane with work always first.
        interceptors: wrap task execution and stage steps, outermost first.
        instance_id: this process's identity in transactional ids; a restarted process
            with the same id fences its predecessor. Random by default.
    """

    def __init__(
        self,
        name: str,
        *,
        event_log: EventLog | None = None,
        schema_registry: SchemaRegistryClient | None = None,
        view: ViewStore | None = None,
        executor: Executor | None = None,
        topic_prefix: str = "qtasks.",
        partitions: int = 4,
        lanes: int = 3,
        retention_ms: int | None = None,
        concurrency: int = 16,
        lane_weights: Sequence[int] | None = None,
        interceptors: Sequence[Interceptor] = (),
        instance_id: str | None = None,
        batch_size: int = 500,
        poll_timeout: float = 0.2,
        shutdown_grace: float = 10.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.topology = Topology(name, topic_prefix, partitions, lanes)
        if retention_ms is not None:
            self.topology = dataclasses.replace(self.topology, retention_ms=retention_ms)
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, not {concurrency}")
        self.executor = executor if executor is not None else LocalExecutor()
        self.concurrency = concurrency
        if lane_weights is not None and (
            len(lane_weights) != lanes
            or not all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in lane_weights
            )
        ):
            raise ConfigurationError(
                f"lane_weights must be {lanes} positive ints (one per lane), not {lane_weights!r}"
            )
        self.lane_weights = tuple(lane_weights) if lane_weights is not None else None
        self.interceptors = list(interceptors)
        self.instance_id = (
            instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.shutdown_grace = shutdown_grace
        self.runners: dict[str, StageRunner] = {}
        self._runner_tasks: list[asyncio.Task[None]] = []
        self._client_ready = False
        self._client_lock = asyncio.Lock()
        self._view_started = False
        self.view: ViewStore = view if view is not None else MemoryViewStore()
        self.use(event_log=event_log, schema_registry=schema_registry)

    def use(
        self,
        *,
        event_log: EventLog | None = None,
        schema_registry: SchemaRegistryClient | None = None,
        view: ViewStore | None = None,
        topic_prefix: str | None = None,
        instance_id: str | None = None,
        own_registry: bool = False,
    ) -> None:
        """Swap the event log, registry or view before starting. ``None`` means the embedded
        default for the event log and registry, and keeps the current view (a store the
        app's module chose, say SQLite, survives the CLI moving the app onto Kafka).

        This is how a composition root (the CLI) moves an app declared with the embedded
        defaults onto Kafka without touching the module that declares its tasks. With
        ``own_registry`` the app closes the registry client when it closes.
        """
        if self._client_ready or self.runners:
            raise ConfigurationError("components can only be swapped before the app starts")
        if topic_prefix is not None:
            self.topology = dataclasses.replace(self.topology, prefix=topic_prefix)
        if instance_id is not None:
            self.instance_id = instance_id
        self.event_log = event_log if event_log is not None else InMemoryEventLog()
        registry = schema_registry or SchemaRegistryClient.new_client(
            {"url": f"mock://{self.name}-{uuid.uuid4().hex[:8]}"}
        )
        self.serde: Serde = AvroSerde(
            registry, self.topology.topic_schemas(), close_registry=own_registry
        )
        self.payloads = TaskPayloads(registry, self.topology.events, self.definitions)
        # Without one, the view the app was declared with stays (the CLI's configure swaps
        # only the log and the registry).
        if view is not None:
            self.view = view
        self._results = ResultListener(
            self.event_log, self.serde, self.topology.events, self.topology.partitions
        )
        self._producer = self.event_log.producer()

    def _app_or_none(self) -> QueueTasks:
        return self

    # -- registration ---------------------------------------------------------------------

    def include_router(self, router: Router) -> None:
        """Add a router's tasks; their handles now submit through this app."""
        for definition in router.definitions.values():
            if definition.name in self.definitions:
                raise ConfigurationError(f"task {definition.name!r} is already registered")
        self.definitions.update(router.definitions)
        for handle in router.handles:
            handle._app = self

    def add_interceptor(self, interceptor: Interceptor) -> None:
        if self.runners:
            raise ConfigurationError("add interceptors before the stages start")
        self.interceptors.append(interceptor)

    # -- lifecycle ------------------------------------------------------------------------

    async def _ensure_client(self) -> None:
        async with self._client_lock:
            if self._client_ready:
                return
            await self.event_log.create_topics(self.topology.specs())
            await self.serde.start()
            await self.payloads.start(self.definitions.values())
            await self._producer.start()
            self._client_ready = True

    async def _ensure_view(self) -> None:
        if not self._view_started:
            await self.view.start()
            self._view_started = True

    async def start(self, stages: Iterable[str] = STAGES) -> None:
        """Start the given stages in this process (all by default)."""
        wanted = list(dict.fromkeys(stages))
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise ConfigurationError(f"unknown stages {unknown}; choose from {list(STAGES)}")
        await self._ensure_client()
        await self._ensure_view()
        for stage_name in wanted:
            if stage_name in self.runners:
                continue
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
            return ScheduleStage(self.topology, self._run_state)
        return WorkerStage(
            self.topology,
            tasks=self.definitions,
            executor=self.executor,
            serde=self.serde,
            payloads=self.payloads,
            control=lambda: self.event_log.consumer([self.topology.control], group_id=None),
            worker_id=f"worker:{self.instance_id}",
            concurrency=self.concurrency,
            lane_weights=self.lane_weights,
            interceptors=self.interceptors,
            echo_self=lambda ctx: TaskSelf(ctx, self),
            shutdown_grace=self.shutdown_grace,
        )

    async def _run_state(self, task_id: str) -> TaskState | None:
        """A run's state folded from its events in the log (the overlap policy asks)."""
        state = None
        for event in await self.history(task_id):
            state = fold(state, event)
        return state

    # -- schedules ------------------------------------------------------------------------

    @property
    def schedules(self) -> Schedules:
        """Pause, resume, delete and list the app's schedules (see :mod:`.schedules`)."""
        return Schedules(self, self._producer.send)

    async def schedule(self, name: str, *, task: str, **options: Any) -> Schedule:
        """Run ``task`` periodically: ``cron="0 2 * * *", tz="Europe/Berlin"`` or
        ``every=timedelta(...)``, with ``args``/``kwargs`` and the catch-up and overlap
        policies; see :meth:`.Schedules.add`."""
        return await self.schedules.add(name, task=task, **options)

    async def close(self) -> None:
        """Stop the stages (letting running attempts finish within the grace), then clients."""
        for runner in self.runners.values():
            runner.request_stop()
        results = await asyncio.gather(*self._runner_tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("a stage ended with an error", exc_info=result)
        self.runners.clear()
        self._runner_tasks.clear()
        await self._results.close()
        if self._client_ready:
            await self._producer.close()
            self._client_ready = False
        await self.serde.close()
        if self._view_started:
            await self.view.close()
            self._view_started = False

    async def __aenter__(self) -> QueueTasks:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- client ---------------------------------------------------------------------------

    async def add_task(
        self,
        task_name: str,
        *args: Any,
        priority: int | None = None,
        timeout: float | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
        max_time: float | None = None,
        tags: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Task | None:
        """Submit a task. Returns it with status ``new``; with ``timeout``, waits for its end
        and returns the finished task, or ``None`` if it did not end in time.

        Raises:
            UnknownTaskError: no task is registered under ``task_name``.
            ConfigurationError: an option is invalid or an argument is not JSON-serializable.
        """
        definition = self.definitions.get(task_name)
        if definition is None:
            known = ", ".join(sorted(self.definitions)) or "none"
            raise UnknownTaskError(f"no task named {task_name!r} (registered: {known})")
        if timeout is not None and timeout < 0:
            raise ConfigurationError(f"timeout must be >= 0, not {timeout}")
        options = _options(
            definition,
            priority,
            countdown,
            eta,
            idempotency_key,
            max_time,
            self.topology.retention_ms,
        )
        await self._ensure_client()
        await self.payloads.start([definition])  # a task added after the client started
        call = self.payloads.encode_call(definition, args, kwargs)
        submitted = Submitted(
            args=call.args,
            kwargs=call.kwargs,
            content_type=call.content_type,
            arguments_avro=call.arguments_avro,
            tags=tuple(tags) if tags is not None else definition.tags,
            **options,
        )
        task_id = (
            str(uuid.uuid5(_IDEMPOTENCY_NS, f"{self.name}:{idempotency_key}"))
            if idempotency_key is not None
            else new_task_id()
        )
        event = TaskEvent.new(task_id, task_name, 0, "client", submitted)
        event = self._intercept(self.topology.events, task_id, event)
        # Encoded before anything is sent: a value that does not fit leaves nothing behind.
        record = as_record(self.serde, self.topology.events, task_id, event)
        waiter = None
        if timeout is not None:
            await self._results.start()
            waiter = self._results.expect(task_id, base=fold(None, event))
        try:
            await self._producer.send([record])
        except BaseException:
            if waiter is not None:
                self._results.forget(task_id, waiter)
            raise
        if idempotency_key is not None:
            # A repeat of a known key is the first task: answer with it, as the view has it.
            existing = await self._view_state(task_id)
            if existing is not None and (waiter is None or existing.final):
                if waiter is not None:
                    self._results.forget(task_id, waiter)
                return existing.to_task(self.payloads)
        if waiter is None:
            return fold(None, event).to_task(self.payloads)
        return await self._await(task_id, waiter, timeout)

    async def _await(
        self, task_id: str, waiter: asyncio.Future[TaskState], timeout: float | None
    ) -> Task | None:
        try:
            async with asyncio.timeout(timeout):
                state = await waiter
        except TimeoutError:
            self._results.forget(task_id, waiter)
            return None
        return state.to_task(self.payloads)

    async def wait(self, uuid: str, timeout: float | None = None) -> Task | None:
        """Wait for a task to end; returns it, or ``None`` if it did not end in time."""
        await self._ensure_client()
        await self._results.start()
        # Listen first, then look: whatever ends after this point reaches the listener.
        waiter = self._results.expect(uuid, record=True)
        try:
            current = await self._view_state(uuid)
            if current is not None and current.final:
                self._results.forget(uuid, waiter)
                self._results.unseed(uuid)
                return current.to_task(self.payloads)
            # The view may lag behind the log (or not know the task yet): the log decides.
            history = await self._history_events(uuid, skip_undecodable=True)
        except BaseException:
            self._results.forget(uuid, waiter)
            self._results.unseed(uuid)
            raise
        self._results.seed(uuid, history)
        return await self._await(uuid, waiter, timeout)

    async def stream(self, uuid: str) -> AsyncIterator[Any]:
        """Progress items of a (generator) task as they are produced, until it ends."""
        await self._ensure_client()
        async for item in self._results.stream(uuid):
            yield item

    async def _view_state(self, uuid: str) -> TaskState | None:
        await self._ensure_view()
        return await self.view.state(uuid)

    async def get(self, uuid: str, as_of: datetime | float | str | None = None) -> Task | None:
        """The task as the view knows it, or ``None`` when unknown.

        With ``as_of`` (an aware datetime, epoch seconds, or ISO 8601 text), the task as it
        stood then: folded from its events in the log that happened at or before that moment
        (not from the view); ``None`` if it had no events yet.
        """
        if as_of is None:
            state = await self._view_state(uuid)
        else:
            state = audit.state_as_of(await self.history(uuid), audit.as_of_us(as_of))
        return state.to_task(self.payloads) if state is not None else None

    async def connect(self) -> None:
        """Create the topics and register the schemas: what a client of the log needs."""
        await self._ensure_client()

    async def resubmit(
        self,
        what: ResubmitFilter | None = None,
        *,
        reason: str = "",
        dry_run: bool = False,
    ) -> list[Resubmission]:
        """New attempts of ended tasks (error, timeout, dead letter) that ``what`` selects,
        chosen from the log; see :mod:`qtasks_stream.rerun`. Returns every task selected
        (``event`` set) and every explicit id refused (``refused`` says why); with
        ``dry_run`` nothing is written."""
        await self._ensure_client()
        found = await find_resubmissions(
            self.event_log, self.serde, self.topology, what or ResubmitFilter(), reason
        )
        records = records_of(self.serde, self.topology, found)
        if records and not dry_run:
            await self._producer.send(records)
        return found

    async def query(self, query: TaskQuery | None = None, **filters: Any) -> list[Task]:
        await self._ensure_view()
        return await self.view.query(query or TaskQuery(**filters), payloads=self.payloads)

    async def page(self, query: TaskQuery | None = None, **filters: Any) -> TaskPage:
        """One page of :meth:`query`; pass its ``next_cursor`` as ``after`` for the next."""
        await self._ensure_view()
        return await self.view.page(query or TaskQuery(**filters), payloads=self.payloads)

    async def counts(self) -> dict[str, int]:
        """Tasks per status, as the view has them."""
        await self._ensure_view()
        return await self.view.counts()

    async def cancel(self, uuid: str, reason: str = "") -> None:
        """Ask for the task to be cancelled; honoured wherever it is, even after restarts."""
        await self._ensure_client()
        known = await self._view_state(uuid)
        name = known.task_name if known is not None else ""
        event = TaskEvent.new(uuid, name, 0, "client", CancelRequested(reason))
        event = self._intercept(self.topology.events, uuid, event)
        await self._producer.send([as_record(self.serde, self.topology.events, uuid, event)])

    def _intercept(self, topic: str, key: str, event: TaskEvent) -> TaskEvent:
        """``event`` as the client's emit interceptors pass it on (tracing stamps it)."""
        if not wants(self.interceptors, "emit"):
            return event
        passed: list[TaskEvent] = []
        chain_emit(self.interceptors, lambda out: passed.append(out.value))(
            EmitInput("client", topic, key, event)
        )
        if not passed:
            raise QTasksStreamError(f"an interceptor dropped the {event.kind} event of {key}")
        return passed[-1]

    async def history(self, uuid: str, *, limit: float = 30.0) -> list[TaskEvent]:
        """Every event of one task, in order, read from the log (not from a view).

        Records under the task's key that cannot be decoded are left out (they are in the
        dead-letter topic, and the ``DeadLettered`` event says so).
        """
        return await self._history_events(uuid, skip_undecodable=True, limit=limit)

    async def _history_events(
        self, uuid: str, *, skip_undecodable: bool, limit: float = 30.0
    ) -> list[TaskEvent]:
        await self._ensure_client()
        topic = self.topology.events
        tp = TopicPartition(topic, murmur2_partition(uuid.encode(), self.topology.partitions))
        consumer = self.event_log.consumer([topic], group_id=None, start="earliest")
        await consumer.start()
        try:
            others = [
                TopicPartition(topic, p)
                for p in range(self.topology.partitions)
                if p != tp.partition
            ]
            consumer.pause(others, True)
            end = (await consumer.end_offsets([tp]))[tp]
            # A time-ordered id says when the task was submitted: start there, not at 0.
            born_ms = task_id_ms(uuid)
            position = 0
            if born_ms is not None:
                since = born_ms - _HISTORY_CLOCK_MARGIN_MS
                position = (await consumer.offsets_for_time([tp], since))[tp]
            consumer.seek(tp, position)
            events: list[TaskEvent] = []
            key = uuid.encode()
            deadline = asyncio.get_running_loop().time() + limit
            while position < end:
                if asyncio.get_running_loop().time() > deadline:
                    raise EventLogError(f"reading the history of {uuid} took over {limit}s")
                for rec in await consumer.poll(max_records=5000, timeout=0.5):
                    if rec.partition != tp.partition or rec.key != key or rec.value is None:
                        continue
                    try:
                        kind = event_kind(rec.headers)
                        value = self.serde.decode(topic, rec.value, branch=kind)
                        events.append(TaskEvent.from_avro(value))
                    except (SerdeError, KeyError, TypeError, ValueError):
                        if not skip_undecodable:
                            raise
                position = await consumer.position(tp) or 0
            return events
        finally:
            await consumer.close()


def _options(
    definition: TaskDefinition,
    priority: int | None,
    countdown: float | None,
    eta: datetime | None,
    idempotency_key: str | None,
    max_time: float | None,
    retention_ms: int,
) -> dict[str, Any]:
    """The Submitted fields other than arguments and tags, checked.

    A start further away than the events topic's retention (less a margin for the release
    itself) is refused: the task's arguments live in its ``Submitted`` event, which would
    be deleted before the task runs.
    """
    if priority is None:
        priority = definition.priority
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigurationError(f"priority must be an int, not {priority!r}")
    if countdown is not None and eta is not None:
        raise ConfigurationError("give countdown or eta, not both")
    eta_us: int | None = None
    if countdown is not None:
        if not countdown >= 0:
            raise ConfigurationError(f"countdown must be >= 0 seconds, not {countdown!r}")
        eta_us = now_us() + int(countdown * 1_000_000)
    elif eta is not None:
        if eta.tzinfo is None:
            raise ConfigurationError("eta must be timezone-aware (e.g. datetime.now(UTC))")
        eta_us = int(eta.timestamp() * 1_000_000)
    if eta_us is not None and retention_ms > 0:
        margin_ms = min(_RETENTION_MARGIN_MS, retention_ms // 10)
        if (eta_us - now_us()) // 1000 > retention_ms - margin_ms:
            raise ConfigurationError(
                f"the task would start in {(eta_us - now_us()) / 86_400e6:.2f} days, later "
                f"than the events retention of {retention_ms / 86_400e3:.2f} days allows "
                f"(less {margin_ms / 1000:.0f} s): its Submitted event, which holds the "
                "arguments, would be deleted first; raise retention_ms or submit it later"
            )
    if max_time is not None and not max_time > 0:
        raise ConfigurationError(f"max_time must be > 0, not {max_time!r}")
    if idempotency_key is not None and not idempotency_key:
        raise ConfigurationError("idempotency_key must be a non-empty string")
    return {
        "priority": priority,
        "eta_us": eta_us,
        "idempotency_key": idempotency_key,
        "max_time": max_time,
    }
