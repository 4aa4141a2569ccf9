"""What the two Kafka event logs (confluent-kafka's and aiokafka's) share, written once.

Neither depends on the client library: topics are created and offsets listed through one
admin client (:mod:`.kafka_admin`); a producer checks its records against the partitions
it knows before writing any, so a bad batch writes nothing; a member commits only the
partitions it still holds.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from qtasks_stream.errors import EventLogError, FencedError
from qtasks_stream.eventlog.base import EventLog, Producer
from qtasks_stream.eventlog.kafka_admin import OffsetLister, ensure_topics
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.records import OutRecord, TopicPartition, TopicSpec

__all__ = ["NO_GROUP", "CheckedProducer", "KafkaEventLog", "check_owned"]

#: Why a consumer without a group cannot commit.
NO_GROUP = "a consumer without group_id has no offsets to commit"


class KafkaEventLog(EventLog):
    """An event log on a Kafka cluster: the settings, topic creation and offset listing."""

    def __init__(self, config: KafkaConfig) -> None:
        self._config = config
        self._offsets = OffsetLister(config)

    @property
    def config(self) -> KafkaConfig:
        """How this log reaches its cluster (the start-up ACL check asks with it)."""
        return self._config

    async def close(self) -> None:
        self._offsets.close()

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        await ensure_topics(self._config, specs)


class CheckedProducer(Producer):
    """A Kafka producer's state and checks: closed, dead (fenced or fatally failed), and
    the partitions of the topics written so far, to check records against."""

    def __init__(self, transactional_id: str | None) -> None:
        self._transactional_id = transactional_id
        #: Set once the producer is dead (fenced or fatally failed): every later call fails.
        self._fatal: EventLogError | None = None
        self._closed = False
        #: Partitions of the topics written so far (metadata, cached for validation).
        self._partitions: dict[str, set[int]] = {}

    def _check_alive(self) -> None:
        if self._closed:
            raise EventLogError("the producer is closed")
        if self._fatal is not None:
            raise type(self._fatal)(str(self._fatal)) from self._fatal

    def _check_transactional(self) -> None:
        if self._transactional_id is None:
            raise EventLogError("commit_transaction needs a producer with a transactional_id")

    def _topics_to_describe(self, records: Sequence[OutRecord]) -> set[str]:
        """Topics of ``records`` whose partitions are not known (or lack one a record names)."""
        return {
            r.topic
            for r in records
            if r.topic not in self._partitions
            or (r.partition is not None and r.partition not in self._partitions[r.topic])
        }

    def _check_records(self, records: Sequence[OutRecord]) -> None:
        """EventLogError for a record of an unknown topic or partition.

        Called once ``_partitions`` holds every topic ``_topics_to_describe`` named (an
        empty set for a topic that does not exist).
        """
        for rec in records:
            if not self._partitions[rec.topic]:
                raise EventLogError(f"unknown topic {rec.topic!r}: create it first")
            if rec.partition is not None and rec.partition not in self._partitions[rec.topic]:
                raise EventLogError(f"topic {rec.topic!r} has no partition {rec.partition}")


def check_owned(
    group_id: str | None,
    assigned: Collection[TopicPartition],
    offsets: Mapping[TopicPartition, int],
) -> str:
    """The group id, if a member holding ``assigned`` may commit ``offsets``.

    FencedError if it no longer holds one of their partitions (the broker only checks the
    generation: this also catches a member that rejoined without the partition).
    """
    if group_id is None:
        raise EventLogError(NO_GROUP)
    lost = sorted(set(offsets) - set(assigned))
    if lost:
        raise FencedError(
            f"partitions {lost} are no longer assigned to this member of group "
            f"{group_id!r}; their work is redone by the new owner"
        )
    return group_id
