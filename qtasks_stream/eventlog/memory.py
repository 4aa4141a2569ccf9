"""An in-process event log that behaves like Kafka, for the embedded default and fast tests.

What it keeps from Kafka: key-hash partitioning (murmur2, as Kafka's default partitioner, so a
key lands on the same partition number here and there), per-partition order and offsets,
consumer groups that split partitions between members and rebalance when members join or
leave, committed offsets that outlive their consumers, redelivery of uncommitted work, and
fencing of zombies (an old transactional producer, or a member of an old group generation),
and time-based retention (a topic's ``retention.ms``: records older than it are deleted from
the start of their partition, whose log start offset advances; a consumer positioned before
it is reset as ``auto.offset.reset`` would, to the start or the end).
Everything lives in one event loop; nothing is persisted.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from qtasks_stream.errors import EventLogError, FencedError, TopicConfigError
from qtasks_stream.eventlog.base import Consumer, EventLog, Producer, RebalanceListener, StartFrom
from qtasks_stream.eventlog.partitioning import murmur2_partition
from qtasks_stream.records import OutRecord, Record, TopicPartition, TopicSpec

__all__ = ["InMemoryEventLog"]


class _Signal:
    """Wakes every waiter at once; one future per round, replaced on each notify."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    async def wait(self, timeout: float) -> None:
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
        # races with the future completing, which would leave a cancelled poller running.
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._future)
        except TimeoutError:
            pass

    def notify(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)


class _Partition:
    """The retained records of one partition: offsets ``start`` to ``end - 1``."""

    __slots__ = ("records", "start")

    def __init__(self) -> None:
        self.records: list[Record] = []
        #: The log start offset: every record below it was deleted by retention.
        self.start = 0

    @property
    def end(self) -> int:
        return self.start + len(self.records)

    def read(self, offset: int, count: int) -> list[Record]:
        index = offset - self.start
        return self.records[index : index + count]

    def expire(self, before_ms: int) -> None:
        """Delete the leading records appended before ``before_ms``, as Kafka deletes the
        oldest segments: a later record stays while an earlier one is retained."""
        records = self.records
        count = 0
        while count < len(records) and records[count].timestamp_ms < before_ms:
            count += 1
        if count:
            del records[:count]
            self.start += count


def _retention_ms(spec: TopicSpec) -> int | None:
    """How long ``spec``'s records are kept; ``None``: forever (or compacted, not aged)."""
    if spec.config.get("cleanup.policy", "delete") != "delete":
        return None
    retention = int(spec.config.get("retention.ms", "-1"))
    return retention if retention >= 0 else None


@dataclass
class _Member:
    member_id: str
    topics: tuple[str, ...]
    generation: int = -1
    assignment: tuple[TopicPartition, ...] = ()
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class _Group:
    group_id: str
    generation: int = 0
    members: dict[str, _Member] = field(default_factory=dict)
    #: Members that have given up their partitions for the rebalance in progress.
    joined: set[str] = field(default_factory=set)
    rebalancing: bool = False
    committed: dict[TopicPartition, int] = field(default_factory=dict)


class InMemoryEventLog(EventLog):
    """Kafka-like topics, groups and transactions inside one event loop.

    Args:
        session_timeout: a member that has not polled for this long is dropped from its
            group at the next rebalance, as Kafka's ``session.timeout.ms``.
        retention_check: seconds between two passes that delete records older than their
            topic's ``retention.ms`` (Kafka's ``log.retention.check.interval.ms``), made
            by the append that comes after the period.
        clock: wall time in seconds (record timestamps, retention); tests pass their own.
    """

    def __init__(
        self,
        *,
        session_timeout: float = 10.0,
        retention_check: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._topics: dict[str, list[_Partition]] = {}
        self._specs: dict[str, TopicSpec] = {}
        self._groups: dict[str, _Group] = {}
        self._txn_epochs: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._round_robin = itertools.count()
        self._signal = _Signal()
        self.session_timeout = session_timeout
        self.retention_check = retention_check
        self._clock = clock
        self._retention: dict[str, int] = {}
        self._next_expiry = 0.0

    # -- topics -------------------------------------------------------------------------

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        for spec in specs:
            existing = self._specs.get(spec.name)
            if existing is None:
                self._specs[spec.name] = spec
                self._topics[spec.name] = [_Partition() for _ in range(spec.partitions)]
                retention = _retention_ms(spec)
                if retention is not None:
                    self._retention[spec.name] = retention
            elif existing.partitions != spec.partitions or existing.config != spec.config:
                raise TopicConfigError(
                    f"topic {spec.name!r} exists with {existing.partitions} partitions and "
                    f"config {existing.config}, but {spec.partitions} partitions and "
                    f"{spec.config} are needed"
                )

    def partitions_of(self, topic: str) -> int:
        try:
            return len(self._topics[topic])
        except KeyError:
            raise EventLogError(f"unknown topic {topic!r}: create it first") from None

    def records(self, topic: str) -> list[Record]:
        """Every record of ``topic``, partition by partition (for tests and tools)."""
        return [r for part in self._topics.get(topic, []) for r in part.records]

    def start_offsets(self, topic: str) -> list[int]:
        """Each partition's log start offset (for tests and tools)."""
        return [part.start for part in self._topics.get(topic, [])]

    def delete_records(self, tp: TopicPartition, before: int) -> None:
        """Delete the records of ``tp`` below offset ``before``, as Kafka's DeleteRecords."""
        part = self._topics[tp.topic][tp.partition]
        if not part.start <= before <= part.end:
            raise EventLogError(f"{tp} holds offsets {part.start}..{part.end}, not {before}")
        del part.records[: before - part.start]
        part.start = before

    def expire(self) -> None:
        """Delete every record older than its topic's retention now."""
        now = self._clock()
        self._next_expiry = now + self.retention_check
        for topic, retention in self._retention.items():
            before_ms = int(now * 1000) - retention
            for part in self._topics[topic]:
                part.expire(before_ms)

    def _append(self, records: Iterable[OutRecord]) -> None:
        now = self._clock()
        if self._retention and now >= self._next_expiry:
            self.expire()
        now_ms = int(now * 1000)
        for rec in records:
            parts = self._topics.get(rec.topic)
            if parts is None:
                raise EventLogError(f"unknown topic {rec.topic!r}: create it first")
            if rec.partition is not None:
                index = rec.partition
            elif rec.key is not None:
                index = murmur2_partition(rec.key, len(parts))
            else:
                index = next(self._round_robin) % len(parts)
            part = parts[index]
            part.records.append(
                Record(rec.topic, index, part.end, rec.key, rec.value, rec.headers, now_ms)
            )
        self._signal.notify()

    def _check_records(self, records: Sequence[OutRecord]) -> None:
        # Validate before appending anything, so a bad record leaves no half-written batch.
        for rec in records:
            parts = self._topics.get(rec.topic)
            if parts is None:
                raise EventLogError(f"unknown topic {rec.topic!r}: create it first")
            if rec.partition is not None and not 0 <= rec.partition < len(parts):
                raise EventLogError(f"topic {rec.topic!r} has no partition {rec.partition}")

    # -- groups ---------------------------------------------------------------------------

    def _group(self, group_id: str) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            group = self._groups[group_id] = _Group(group_id)
        return group

    def _start_rebalance(self, group: _Group) -> None:
        group.rebalancing = True
        group.joined.clear()
        self._signal.notify()

    def _finish_rebalance_if_ready(self, group: _Group) -> None:
        now = time.monotonic()
        for member_id, member in list(group.members.items()):
            if member_id not in group.joined and now - member.last_seen > self.session_timeout:
                del group.members[member_id]
        if not group.rebalancing or not set(group.members) <= group.joined:
            return
        group.generation += 1
        members = sorted(group.members.values(), key=lambda m: m.member_id)
        assignments: dict[str, list[TopicPartition]] = {m.member_id: [] for m in members}
        topics = sorted({t for m in members for t in m.topics})
        for topic in topics:
            subscribers = [m for m in members if topic in m.topics]
            for index in range(len(self._topics.get(topic, []))):
                owner = subscribers[index % len(subscribers)]
                assignments[owner.member_id].append(TopicPartition(topic, index))
        for member in members:
            member.assignment = tuple(assignments[member.member_id])
            member.generation = group.generation
        group.rebalancing = False
        group.joined.clear()
        self._signal.notify()

    def _check_generation(self, group_id: str, member_id: str, generation: int) -> _Group:
        group = self._group(group_id)
        member = group.members.get(member_id)
        if member is None or member.generation != generation or generation != group.generation:
            raise FencedError(
                f"member {member_id} of group {group_id!r} (generation {generation}) was "
                f"superseded (group generation {group.generation}); its work is redone"
            )
        return group

    def committed(self, group_id: str) -> dict[TopicPartition, int]:
        """The group's committed offsets (for tests and tools)."""
        return dict(self._group(group_id).committed)

    # -- factories ------------------------------------------------------------------------

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        epoch = 0
        if transactional_id is not None:
            # A new producer with the same transactional id fences the old one, as in Kafka.
            epoch = self._txn_epochs.get(transactional_id, 0) + 1
            self._txn_epochs[transactional_id] = epoch
        return _MemoryProducer(self, transactional_id, epoch)

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str | None,
        listener: RebalanceListener | None = None,
        start: StartFrom = "earliest",
        pauses: bool = True,
    ) -> Consumer:
        # ``pauses`` only tunes how long a Kafka fetch may wait; nothing waits here.
        return _MemoryConsumer(self, tuple(topics), group_id, listener, start, next(self._ids))


class _MemoryProducer(Producer):
    def __init__(self, log: InMemoryEventLog, transactional_id: str | None, epoch: int) -> None:
        self._log = log
        self._transactional_id = transactional_id
        self._epoch = epoch

    async def send(self, records: Sequence[OutRecord]) -> None:
        self._log._check_records(records)
        self._log._append(records)

    async def commit_transaction(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        consumer: Consumer,
    ) -> None:
        if self._transactional_id is None:
            raise EventLogError("commit_transaction needs a producer with a transactional_id")
        if self._log._txn_epochs.get(self._transactional_id) != self._epoch:
            raise FencedError(
                f"transactional id {self._transactional_id!r} is owned by a newer producer"
            )
        if not isinstance(consumer, _MemoryConsumer) or consumer._log is not self._log:
            raise EventLogError("the consumer belongs to another event log")
        self._log._check_records(records)
        consumer._check_commit(offsets)
        self._log._append(records)
        consumer._store_commit(offsets)
        # Yield once, as a network round trip would, so a tight stage loop cannot starve others.
        await asyncio.sleep(0)


class _MemoryConsumer(Consumer):
    def __init__(
        self,
        log: InMemoryEventLog,
        topics: tuple[str, ...],
        group_id: str | None,
        listener: RebalanceListener | None,
        start: StartFrom,
        serial: int,
    ) -> None:
        self._log = log
        self._topics = topics
        self._group_id = group_id
        self._listener = listener
        self._start = start
        self._member_id = f"member-{serial}"
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._assigned: tuple[TopicPartition, ...] = ()
        self._generation = -1
        self._started = False
        self._closed = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for topic in self._topics:
            self._log.partitions_of(topic)  # fail early on an unknown topic
        if self._group_id is None:
            await self._set_assignment(
                tuple(
                    TopicPartition(t, p)
                    for t in self._topics
                    for p in range(self._log.partitions_of(t))
                )
            )
        else:
            group = self._log._group(self._group_id)
            group.members[self._member_id] = _Member(self._member_id, self._topics)
            self._log._start_rebalance(group)

    async def close(self) -> None:
        """Leave the group; uncommitted work goes to whoever gets the partitions next."""
        if self._closed:
            return
        self._closed = True
        if self._group_id is not None and self._started:
            group = self._log._group(self._group_id)
            if group.members.pop(self._member_id, None) is not None:
                self._log._start_rebalance(group)

    async def _set_assignment(self, assignment: tuple[TopicPartition, ...]) -> None:
        self._assigned = assignment
        self._paused &= set(assignment)
        for tp in assignment:
            if self._group_id is not None and tp in self._log._group(self._group_id).committed:
                self._positions[tp] = self._log._group(self._group_id).committed[tp]
            else:
                self._positions[tp] = self._reset_position(tp)
        if self._listener is not None and assignment:
            await self._listener.on_assigned(list(assignment))

    async def _sync_group(self) -> None:
        """Take part in a rebalance: give up partitions, wait for the group, take new ones."""
        assert self._group_id is not None
        group = self._log._group(self._group_id)
        member = group.members.get(self._member_id)
        if member is None:
            raise FencedError(
                f"member {self._member_id} was dropped from group {self._group_id!r} "
                "(closed, or silent longer than the session timeout)"
            )
        member.last_seen = time.monotonic()
        if group.rebalancing and self._member_id not in group.joined:
            if self._assigned and self._listener is not None:
                await self._listener.on_revoked(list(self._assigned))
            for tp in self._assigned:
                self._positions.pop(tp, None)
            self._assigned = ()
            group.joined.add(self._member_id)
        self._log._finish_rebalance_if_ready(group)
        if not group.rebalancing and member.generation != self._generation:
            self._generation = member.generation
            await self._set_assignment(member.assignment)

    async def poll(self, *, max_records: int, timeout: float) -> list[Record]:
        if self._closed:
            raise EventLogError("poll on a closed consumer")
        await self.start()
        deadline = time.monotonic() + timeout
        while True:
            if self._group_id is not None:
                await self._sync_group()
            batch = self._fetch(max_records)
            remaining = deadline - time.monotonic()
            if batch or remaining <= 0:
                return batch
            await self._log._signal.wait(remaining)

    def _reset_position(self, tp: TopicPartition) -> int:
        """Where ``auto.offset.reset`` puts a consumer with no valid position."""
        part = self._log._topics[tp.topic][tp.partition]
        return part.start if self._start == "earliest" else part.end

    def _fetch(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        for tp in self._assigned:
            if tp in self._paused:
                continue
            part = self._log._topics[tp.topic][tp.partition]
            pos = self._positions[tp]
            if pos < part.start:
                # Deleted by retention (or a seek before the start): Kafka answers
                # OFFSET_OUT_OF_RANGE and the client resets as auto.offset.reset says.
                pos = self._positions[tp] = self._reset_position(tp)
            if pos >= part.end:
                continue
            take = part.read(pos, max_records - len(out))
            out.extend(take)
            self._positions[tp] = pos + len(take)
            if len(out) >= max_records:
                break
        return out

    def _check_commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        if self._group_id is None:
            raise EventLogError("a consumer without group_id has no offsets to commit")
        self._log._check_generation(self._group_id, self._member_id, self._generation)

    def _store_commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if offsets and self._group_id is not None:
            self._log._group(self._group_id).committed.update(offsets)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._check_commit(offsets)
        self._store_commit(offsets)

    async def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        if self._group_id is None:
            return {}
        stored = self._log._group(self._group_id).committed
        return {tp: stored[tp] for tp in tps if tp in stored}

    async def position(self, tp: TopicPartition) -> int | None:
        return self._positions.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self._assigned:
            raise EventLogError(f"cannot seek {tp}: not assigned to this consumer")
        self._positions[tp] = offset

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._log._topics[tp.topic][tp.partition].end for tp in tps}

    async def offsets_for_time(
        self, tps: Sequence[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int]:
        found: dict[TopicPartition, int] = {}
        for tp in tps:
            part = self._log._topics[tp.topic][tp.partition]
            # The first at or after, not a bisection: a clock may step back between appends.
            found[tp] = next(
                (r.offset for r in part.records if r.timestamp_ms >= timestamp_ms), part.end
            )
        return found

    def pause(self, tps: Sequence[TopicPartition], paused: bool) -> None:
        if paused:
            self._paused.update(tp for tp in tps if tp in self._assigned)
        else:
            self._paused.difference_update(tps)
            self._log._signal.notify()  # a poll waiting now may have records to return
