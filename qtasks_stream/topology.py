"""Topic and consumer-group names of an application, and what each topic carries.

For app ``shop`` with the default prefix ``qtasks.``::

    qtasks.shop.events        every TaskEvent, keyed by task id (the source of truth)
    qtasks.shop.lane.0 .. N   WorkItems waiting for a worker; lane 0 is served first
    qtasks.shop.control       ControlCommands every worker instance reads (cancel)
    qtasks.shop.deadletter    records no stage could decode or process, bytes untouched
    qtasks.shop.snapshots     compacted: TaskSnapshot per task id, plus the '@manifest'
    qtasks.shop.schedules     compacted, one partition: ScheduleEvents (see schedules/)

Consumer groups are ``<prefix><app>.<stage>``: scheduler, worker, projector, deadletter,
schedules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.records import TopicSpec

__all__ = ["Topology"]

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
        base = f"{self.prefix}{self.app}"
        object.__setattr__(self, "base", base)  # frozen: set once, here
        object.__setattr__(self, "events", f"{base}.events")

    def lane(self, index: int) -> str:
        return f"{self.base}.lane.{index}"

    @property
    def lane_topics(self) -> list[str]:
        return [self.lane(i) for i in range(self.lanes)]

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
        """Lower priority values run first (the QTasks convention): priority p → lane p."""
        return min(max(priority, 0), self.lanes - 1)

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
