"""Topic and consumer-group names of an application, and what each topic carries.

For app ``shop`` with the default prefix ``qtasks.``::

    qtasks.shop.events        every TaskEvent, keyed by task id (the source of truth)
    qtasks.shop.lane.0 .. N   WorkItems of the queue "default" waiting for a worker; lane 0
                              is served first
    qtasks.shop.queue.gpu.lane.0 .. N   the same for the named queue "gpu"
    qtasks.shop.control       ControlCommands every worker instance reads (cancel)
    qtasks.shop.deadletter    records no stage could decode or process, bytes untouched
    qtasks.shop.snapshots     compacted: TaskSnapshot per task id, plus the '@manifest'
    qtasks.shop.schedules     compacted, one partition: ScheduleEvents (see schedules/)

Consumer groups are ``<prefix><app>.<stage>``: scheduler, worker, projector, deadletter,
workflow, schedules, trigger.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.events import DEFAULT_QUEUE
from qtasks_stream.records import TopicSpec

__all__ = ["DEFAULT_QUEUE", "Topology"]

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
#: Seven days: long enough to audit a week of tasks; ``Topology(retention_ms=...)`` changes it
#: (-1: the events are kept forever, as Kafka's ``retention.ms=-1``).
_WEEK_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Topology:
    app: str
    prefix: str = "qtasks."
    partitions: int = 4
    lanes: int = 3
    replication: int = 1
    retention_ms: int = _WEEK_MS
    #: Named queues, each with its own lanes; the app adds those its tasks name.
    queues: tuple[str, ...] = (DEFAULT_QUEUE,)
    #: ``<prefix><app>`` and the events topic, built once: stages name the events topic for
    #: every event they emit.
    base: str = field(init=False, repr=False, compare=False)
    events: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.app) or not _NAME.match(self.prefix or "x"):
            raise ConfigurationError(
                f"app name {self.app!r} and prefix {self.prefix!r} may only hold letters, "
                "digits, '.', '_' and '-' (they become Kafka topic names)"
            )
        if not 1 <= self.partitions <= 1000:
            raise ConfigurationError(f"partitions must be 1..1000, not {self.partitions}")
        if not 1 <= self.lanes <= 10:
            raise ConfigurationError(f"lanes must be 1..10, not {self.lanes}")
        if self.retention_ms <= 0 and self.retention_ms != -1:
            raise ConfigurationError(
                f"retention_ms must be > 0, or -1 to keep the events forever, not "
                f"{self.retention_ms}"
            )
        for queue in self.queues:
            self.check_queue_name(queue)
        if DEFAULT_QUEUE not in self.queues or len(set(self.queues)) != len(self.queues):
            raise ConfigurationError(
                f"queues must hold {DEFAULT_QUEUE!r} once and no name twice, not {self.queues}"
            )
        base = f"{self.prefix}{self.app}"
        object.__setattr__(self, "base", base)  # frozen: set once, here
        object.__setattr__(self, "events", f"{base}.events")

    @staticmethod
    def check_queue_name(queue: object) -> None:
        if not isinstance(queue, str) or not queue or not _NAME.match(queue):
            raise ConfigurationError(
                f"a queue name is a non-empty string of letters, digits, '.', '_' and '-' "
                f"(it becomes part of topic names), not {queue!r}"
            )

    def with_queue(self, queue: str) -> Topology:
        """This topology with ``queue`` among its queues (itself if it is already)."""
        self.check_queue_name(queue)
        if queue in self.queues:
            return self
        return dataclasses.replace(self, queues=(*self.queues, queue))

    def check_queue(self, queue: str) -> None:
        """Refuse a queue this app has no lanes for."""
        if queue not in self.queues:
            raise ConfigurationError(
                f"unknown queue {queue!r} of app {self.app!r}: its queues are "
                f"{', '.join(self.queues)} (a queue exists once a task of the app names it "
                "with @app.task(queue=...))"
            )

    def lane(self, index: int, queue: str = DEFAULT_QUEUE) -> str:
        if queue == DEFAULT_QUEUE:
            return f"{self.base}.lane.{index}"
        return f"{self.base}.queue.{queue}.lane.{index}"

    def queue_lanes(self, queue: str) -> list[str]:
        """The lane topics of one queue, lane 0 first."""
        return [self.lane(i, queue) for i in range(self.lanes)]

    @property
    def lane_topics(self) -> list[str]:
        """The lane topics of every queue."""
        return [lane for queue in self.queues for lane in self.queue_lanes(queue)]

    @property
    def control(self) -> str:
        return f"{self.base}.control"

    @property
    def deadletter(self) -> str:
        return f"{self.base}.deadletter"

    @property
    def snapshots(self) -> str:
        return f"{self.base}.snapshots"

    @property
    def schedules(self) -> str:
        return f"{self.base}.schedules"

    def group(self, stage: str) -> str:
        return f"{self.base}.{stage}"

    def lane_for(self, priority: int) -> int:
        """Lower priority values run first (the QTasks convention): priority p → lane p.

        Clamped for events written before priorities were checked (or by an app with more
        lanes): new submissions are refused by :meth:`check_priority` instead.
        """
        return min(max(priority, 0), self.lanes - 1)

    def check_priority(self, priority: int, task_name: str) -> None:
        """Refuse a priority no lane serves: mapped silently onto the last lane it would run
        in arbitrary order with the others there.

        Raises:
            ConfigurationError: ``priority`` is outside ``0 .. lanes - 1``.
        """
        if not 0 <= priority < self.lanes:
            raise ConfigurationError(
                f"priority {priority} of task {task_name!r} is outside the lanes of app "
                f"{self.app!r}: 0..{self.lanes - 1} (lanes={self.lanes}; lower runs first); "
                "use one of those, or more lanes"
            )

    def lane_index(self, topic: str) -> int:
        return int(topic.rsplit(".", 1)[1])

    def topic_schemas(self) -> dict[str, str]:
        """Topic → name of the Avro schema of its values."""
        schemas = {
            self.events: "TaskEvent",
            self.control: "ControlCommand",
            self.snapshots: "TaskSnapshot",
            self.schedules: "ScheduleEvent",
        }
        schemas.update({lane: "WorkItem" for lane in self.lane_topics})
        return schemas

    def specs(self) -> list[TopicSpec]:
        retention = {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}
        topics = [self.events, *self.lane_topics, self.deadletter]
        specs = [TopicSpec(t, self.partitions, self.replication, dict(retention)) for t in topics]
        # One partition: every worker reads all of it, so there is nothing to spread.
        specs.append(TopicSpec(self.control, 1, self.replication, dict(retention)))
        # Compacted, never deleted by age: the latest state of every task and the manifest.
        compacted = {"cleanup.policy": "compact"}
        specs.append(TopicSpec(self.snapshots, self.partitions, self.replication, compacted))
        # One partition: one worker at a time owns every schedule (the rest stand by), and
        # a schedule's definition and its ticks, under two keys, stay in one order. Hourly
        # segments: compaction skips the open segment, and a restore reads it all (a week
        # of one-second ticks by Kafka's default segment.ms).
        schedules = {**compacted, "segment.ms": str(3_600_000)}
        specs.append(TopicSpec(self.schedules, 1, self.replication, schedules))
        return specs
