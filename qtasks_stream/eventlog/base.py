"""The event-log contract: what a stage needs from Kafka and nothing more.

Offsets follow Kafka's convention: a committed offset is the *next* offset to read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from qtasks_stream.records import OutRecord, Record, TopicPartition, TopicSpec

__all__ = ["Consumer", "EventLog", "Producer", "RebalanceListener", "StartFrom"]

StartFrom = Literal["earliest", "latest"]


class RebalanceListener(Protocol):
    """Called when the group moves partitions: inside :meth:`Consumer.poll` (in-memory) or
    from the client's background task (Kafka), so possibly while the stage is between the
    awaits of a batch. A revoke waits for an in-flight transaction of the same producer."""

    async def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions are about to go: flush and commit their work now."""

    async def on_assigned(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions arrived; their positions are the committed offsets (or ``start``)."""


class Consumer(ABC):
    """Reads records of its topics, as a group member or (``group_id=None``) on its own."""

    async def start(self) -> None:
        """Connect; a no-op where nothing needs connecting."""

    async def close(self) -> None:
        """Leave the group without committing anything."""

    @abstractmethod
    async def poll(self, *, max_records: int, timeout: float) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds for the first."""

    @abstractmethod
    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit offsets outside a transaction (for stages that keep offsets elsewhere)."""

    @abstractmethod
    async def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offsets of ``tps`` (partitions with none are left out)."""

    @abstractmethod
    async def position(self, tp: TopicPartition) -> int | None:
        """The offset of the next record :meth:`poll` would return for ``tp``, past any
        transaction markers already read; ``None`` while unknown (nothing fetched yet).

        Offsets of delivered records cannot tell a reader it reached the end: a partition
        written transactionally ends with a commit marker that is never delivered.
        """

    @abstractmethod
    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` on the next poll."""

    @abstractmethod
    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset the next appended record of each partition will get."""

    @abstractmethod
    async def offsets_for_time(
        self, tps: Sequence[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int]:
        """Per partition, the first offset whose record timestamp is at or after
        ``timestamp_ms`` (Kafka's offsetsForTimes), or the end offset where there is none:
        where to start reading to see everything from then on."""

    @abstractmethod
    def pause(self, tps: Sequence[TopicPartition], paused: bool) -> None:
        """Stop (or resume) fetching ``tps`` without losing the assignment: backpressure."""


class Producer(ABC):
    """Appends records; with a transactional id, atomically with consumed offsets."""

    async def start(self) -> None:
        """Connect; a no-op where nothing needs connecting."""

    async def close(self) -> None:
        """Flush and disconnect."""

    @abstractmethod
    async def send(self, records: Sequence[OutRecord]) -> None:
        """Append ``records`` and wait until the log has them (not transactional)."""

    @abstractmethod
    async def commit_transaction(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        consumer: Consumer,
    ) -> None:
        """Append ``records`` and commit ``offsets`` for ``consumer``'s group, all or nothing.

        Raises:
            FencedError: a newer producer with this transactional id, or a newer group
                generation, owns the work; nothing was written.
        """


class EventLog(ABC):
    """Topics with partitions, keyed records, consumer groups and transactions."""

    async def close(self) -> None:
        """Release shared resources; a no-op by default."""

    @abstractmethod
    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        """Create missing topics; leave matching ones alone; refuse contradicting ones."""

    @abstractmethod
    def producer(self, *, transactional_id: str | None = None) -> Producer:
        """A producer; transactional when given an id (a newer one with the id fences it)."""

    @abstractmethod
    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str | None,
        listener: RebalanceListener | None = None,
        start: StartFrom = "earliest",
        pauses: bool = True,
    ) -> Consumer:
        """A consumer of ``topics``: a group member, or with ``group_id=None`` every partition.

        ``pauses=False`` promises the caller never calls :meth:`Consumer.pause`: a Kafka
        log then lets the broker hold an empty fetch longer (a quiet consumer wakes less;
        data still returns at once), which would delay a paused partition's resumption.
        """
