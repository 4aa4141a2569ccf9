"""``QueueTasks``: the application object, and the wiring of its components.

Three roles, one home each: this module wires the components (every one passed in, built
from :class:`~qtasks_stream.settings.Settings`, or defaulted here: the in-memory event log,
the ``mock://`` schema registry and the in-memory view make the embedded default, which needs
no server); :class:`~qtasks_stream.client.TaskClient` submits and reads tasks;
:class:`~qtasks_stream.runtime.StageRuntime` runs stages, built only when the app starts
some.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.client import TaskClient
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.coalesce import CoalescedSends
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.executors.base import Executor
from qtasks_stream.executors.pool import LocalExecutor
from qtasks_stream.interceptors import Interceptor
from qtasks_stream.results import ResultListener
from qtasks_stream.schedules.api import Schedules
from qtasks_stream.schedules.records import Schedule
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.payloads import TaskPayloads
from qtasks_stream.settings import BOOTSTRAP_ENV, Settings
from qtasks_stream.state import TaskState, fold
from qtasks_stream.tasks import Router, TaskDefinition, TaskHandle, TaskSelf
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import ViewStore
from qtasks_stream.views.memory import MemoryViewStore

if TYPE_CHECKING:
    from qtasks_stream.runtime import StageRuntime
    from qtasks_stream.stages.runner import StageRunner

__all__ = ["STAGES", "QueueTasks"]

log = logging.getLogger("qtasks_stream")

#: Every stage, in start order.
STAGES = ("projector", "deadletter", "scheduler", "workflow", "worker", "schedules", "trigger")


class QueueTasks(TaskClient, Router):
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
        settings: where the components live (see :class:`~qtasks_stream.settings.Settings`):
            they build the event log, registry and view that are not passed explicitly, and
            set the topic prefix and instance id when they name one.
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
        settings: Settings | None = None,
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
        #: The queues this process's worker serves (``start(queues=...)``); None: all.
        self.worker_queues: tuple[str, ...] | None = None
        #: Seconds a work item of a task this process does not know is put back in its lane
        #: (for a worker that knows it: a rolling deploy) before it is dead-lettered.
        self.unknown_task_deadline = 300.0
        self._runtime: StageRuntime | None = None
        self.view: ViewStore = view if view is not None else MemoryViewStore()
        self.settings = settings if settings is not None else Settings()
        if settings is None:
            self.use(event_log=event_log, schema_registry=schema_registry)
        else:
            registry = schema_registry or settings.build_registry()
            self.use(
                event_log=event_log or settings.build_event_log(),
                schema_registry=registry,
                view=view or settings.build_view(),
                topic_prefix=settings.topic_prefix,
                instance_id=instance_id or settings.instance_id,
                own_registry=schema_registry is None and registry is not None,
            )

    @classmethod
    def from_env(cls, name: str, env: Mapping[str, str] = os.environ, **options: Any) -> QueueTasks:
        """An app on what the environment configures (see docs/configuration.md);
        ``options`` are the other arguments of :class:`QueueTasks`."""
        return cls(name, settings=Settings.from_env(env), **options)

    def configure(self, settings: Settings) -> QueueTasks:
        """Move this app, declared with its module's components, onto ``settings``: how the
        CLI applies the environment to the app it loads. The view the module chose stays
        unless the settings name one. Returns the app."""
        registry = settings.build_registry()
        self.use(
            # Embedded settings keep the log the module chose (it may be its own Kafka log).
            event_log=settings.build_event_log() if settings.shared_log else self.event_log,
            schema_registry=registry or self._registry,
            view=settings.build_view(),
            topic_prefix=settings.topic_prefix,
            instance_id=settings.instance_id,
            own_registry=registry is not None or self._own_registry,
        )
        self.settings = settings
        return self

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

        :meth:`configure` (what the CLI calls) swaps through here, so an app declared with the
        embedded defaults moves onto Kafka without touching the module that declares its
        tasks. With ``own_registry`` the app closes the registry client when it closes.
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
        self._registry, self._own_registry = registry, own_registry
        self.serde: Serde = AvroSerde(
            registry, self.topology.topic_schemas(), close_registry=own_registry
        )
        self.payloads = TaskPayloads(registry, self.topology.events, self.definitions)
        # Without one, the view the app was declared with stays.
        if view is not None:
            self.view = view
        self._results = ResultListener(
            self.event_log, self.serde, self.topology.events, self.topology.partitions
        )
        # Transactional: a task due now goes to its lane with its Submitted, all or nothing.
        self._producer = self.event_log.producer(
            transactional_id=f"{self.topology.group('client')}.{uuid.uuid4().hex}"
        )
        self._sends = CoalescedSends(self._producer)

    def _app_or_none(self) -> QueueTasks:
        return self

    def serve_queues(self, queues: Iterable[str]) -> None:
        """Let this process's worker take work only from ``queues`` (of the app's queues).

        Raises:
            ConfigurationError: none given, or one the app has no lanes for.
        """
        served = tuple(dict.fromkeys(queues))
        if not served:
            raise ConfigurationError("a worker serves at least one queue")
        for queue in served:
            self.topology.check_queue(queue)
        self.worker_queues = served

    def _register(self, definition: TaskDefinition) -> TaskHandle:
        self._take_queues([definition])
        return super()._register(definition)

    def _take_queues(self, definitions: Iterable[TaskDefinition]) -> None:
        """Refuse a priority outside the lanes; give new queues their lanes (all or none)."""
        topology = self.topology
        for definition in definitions:
            topology.check_priority(definition.priority, definition.name)
            wider = topology.with_queue(definition.queue)
            if wider is not topology and self._client_ready:
                raise ConfigurationError(
                    f"task {definition.name!r} names the new queue {definition.queue!r}, but "
                    "the app has started: declare the tasks of a new queue before it starts"
                )
            topology = wider
        if topology is not self.topology:
            self.topology = topology
            self.serde.add_topics(topology.topic_schemas())

    # -- registration ---------------------------------------------------------------------

    def include_router(self, router: Router) -> None:
        """Add a router's tasks; their handles now submit through this app."""
        for definition in router.definitions.values():
            if definition.name in self.definitions:
                raise ConfigurationError(f"task {definition.name!r} is already registered")
        self._take_queues(router.definitions.values())
        self.definitions.update(router.definitions)
        for handle in router.handles:
            handle._app = self

    def add_interceptor(self, interceptor: Interceptor) -> None:
        if self.runners:
            raise ConfigurationError("add interceptors before the stages start")
        self.interceptors.append(interceptor)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def runners(self) -> Mapping[str, StageRunner]:
        """The stages running in this process, by name (none in a client-only process)."""
        return self._runtime.runners if self._runtime is not None else {}

    def _feeds_view(self) -> bool:
        return "projector" in self.runners

    async def _ensure_client(self) -> None:
        if (
            not self._client_ready
            and isinstance(self.event_log, InMemoryEventLog)
            and os.environ.get(BOOTSTRAP_ENV)
        ):
            # The CLI moves the module's app onto the environment's Kafka; a client that
            # imports the same module does not, and would run alone, unseen by the workers.
            log.warning(
                "app %r runs on the embedded in-memory log although %s is set: no other "
                "process sees its tasks. Build it with QueueTasks.from_env(%r) to use that "
                "Kafka cluster (docs/deployment.md)",
                self.name,
                BOOTSTRAP_ENV,
                self.name,
            )
        await super()._ensure_client()

    async def start(
        self, stages: Iterable[str] = STAGES, *, queues: Iterable[str] | None = None
    ) -> None:
        """Start the given stages in this process (all by default). ``queues``: the named
        queues this process's worker takes work from (by default every queue its tasks
        name, and ``"default"``)."""
        wanted = list(dict.fromkeys(stages))
        if queues is not None:
            self.serve_queues(queues)
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise ConfigurationError(f"unknown stages {unknown}; choose from {list(STAGES)}")
        await self._ensure_client()
        await self._check_access(wanted)
        await self._ensure_view()
        if "projector" in wanted and "projector" not in self.runners:
            from qtasks_stream.stages.projector import check_view_positions

            await check_view_positions(self.view, self.event_log, self.topology)
        if self._runtime is None:
            from qtasks_stream.runtime import StageRuntime

            self._runtime = StageRuntime(
                topology=self.topology,
                event_log=self.event_log,
                serde=self.serde,
                registry=self._registry,
                payloads=self.payloads,
                view=self.view,
                definitions=self.definitions,
                executor=self.executor,
                interceptors=self.interceptors,
                instance_id=self.instance_id,
                batch_size=self.batch_size,
                poll_timeout=self.poll_timeout,
                concurrency=self.concurrency,
                lane_weights=self.lane_weights,
                shutdown_grace=self.shutdown_grace,
                echo_self=lambda ctx: TaskSelf(ctx, self),
                queues=self.worker_queues or self.topology.queues,
                unknown_task_deadline=self.unknown_task_deadline,
                run_state=self._run_state,
            )
        self._runtime.start(wanted)

    async def _check_access(self, stages: Sequence[str]) -> None:
        """On a secured cluster, name a missing ACL now ("User:x lacks READ on group y"),
        rather than let a stage fail on it and be restarted over and over."""
        config = getattr(self.event_log, "config", None)
        if isinstance(config, KafkaConfig) and config.security_protocol != "PLAINTEXT":
            from qtasks_stream.acl.kafka import check_access

            groups = [self.topology.group(stage) for stage in stages]
            await check_access(config, self.topology, "worker", groups)

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
        if self._runtime is not None:
            await self._runtime.close()
            self._runtime = None
        await self._close_client()

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
