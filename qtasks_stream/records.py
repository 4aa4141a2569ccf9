"""The plain data that crosses the event-log contract: topics, partitions and records."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Headers", "OutRecord", "Record", "TopicPartition", "TopicSpec"]

#: Kafka record headers: ordered, keys may repeat.
Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Record:
    """A record as read from the log, with its position."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    timestamp_ms: int = 0
    #: Built once: stages look it up for every record several times.
    tp: TopicPartition = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tp", TopicPartition(self.topic, self.partition))


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A record to append; the partition is chosen from the key unless given."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What a topic must look like; the event log creates it or checks it."""

    name: str
    partitions: int = 1
    replication: int = 1
    #: Extra topic configs (``cleanup.policy``, ``retention.ms``...).
    config: dict[str, str] = field(default_factory=dict)
