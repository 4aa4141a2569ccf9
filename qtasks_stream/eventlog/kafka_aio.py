"""The event log on Apache Kafka through aiokafka (pure asyncio, no threads).

Group membership, heartbeats and fetching run in aiokafka's background tasks: a member
keeps up with rebalances while the stage is busy between polls, and the rebalance listener
is called from those tasks. Transactions serialize on a per-producer lock, so a listener
committing from ``on_revoked`` waits for a transaction the stage has in flight instead of
interleaving with it.

aiokafka's TxnOffsetCommit (v0) carries no group generation, so the broker cannot fence a
zombie member's transactional offsets; :meth:`commit_transaction` refuses offsets of
partitions this member no longer holds, which catches zombies of a rebalance this process
has seen.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as AioTopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    IllegalOperation,
    IllegalStateError,
    InvalidProducerEpoch,
    KafkaError,
    ProducerFenced,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from aiokafka.producer.transaction_manager import TransactionState

from qtasks_stream.errors import ConfigurationError, EventLogError, FencedError
from qtasks_stream.eventlog.base import Consumer, EventLog, Producer, RebalanceListener, StartFrom
from qtasks_stream.eventlog.kafka_admin import (
    ListedOffsets,
    OffsetLister,
    ensure_topics,
)
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.eventlog.partitioning import murmur2_partition
from qtasks_stream.records import (
    Headers,
    OutRecord,
    Record,
    TopicPartition,
    TopicSpec,
    record_at,
)

__all__ = ["AioKafkaEventLog"]

log = logging.getLogger(__name__)

#: aiokafka errors that mean "someone newer owns this work".
_FENCING = (
    ProducerFenced,
    InvalidProducerEpoch,
    CommitFailedError,
    IllegalGenerationError,
    UnknownMemberIdError,
    RebalanceInProgressError,
)
#: Extra time a poll may overrun its timeout while a rebalance settles, before giving up.
_POLL_GRACE = 5.0


def _parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls).parameters) - {"loop"}


_CLIENT_PARAMS = _parameters(AIOKafkaClient)


def _map_error(exc: BaseException, what: str) -> EventLogError:
    """Our error for an aiokafka one; the caller raises it ``from exc``."""
    if isinstance(exc, EventLogError):
        return exc
    if isinstance(exc, _FENCING):
        return FencedError(f"{what}: superseded by a newer producer or group generation ({exc!r})")
    return EventLogError(f"{what}: {exc!r}")


def _aio_tp(tp: TopicPartition) -> AioTopicPartition:
    return AioTopicPartition(tp.topic, tp.partition)


def _our_tp(tp: Any) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _headers(raw: Any) -> Headers:
    """aiokafka's headers (a tuple of (str, bytes | None) pairs) as ours: its own tuple when
    every value is bytes, as ours always are, without a copy per record."""
    if not raw:
        return ()
    for _, value in raw:
        if type(value) is not bytes:
            return tuple((k, bytes(v)) for k, v in raw)
    return raw if type(raw) is tuple else tuple(raw)


class AioKafkaEventLog(EventLog):
    """Kafka through aiokafka. Creating it does no I/O; clients connect in ``start()``."""

    def __init__(self, config: KafkaConfig) -> None:
        self._config = config
        self._offsets = OffsetLister(config)
        self._producer_params = _parameters(AIOKafkaProducer)
        self._consumer_params = _parameters(AIOKafkaConsumer)
        unknown = sorted(
            key
            for key, name in ((k, k.replace(".", "_")) for k in config.extra)
            if name not in self._producer_params | self._consumer_params
        )
        if unknown:
            raise ConfigurationError(
                f"KafkaConfig.extra keys {unknown} mean nothing to aiokafka's producer or consumer"
            )

    async def close(self) -> None:
        self._offsets.close()

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        await ensure_topics(self._config, specs)

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        settings: dict[str, Any] = {
            "enable_idempotence": True,
            "acks": "all",
            "linger_ms": 5,
        }
        if transactional_id is not None:
            settings["transactional_id"] = transactional_id
            settings["transaction_timeout_ms"] = self._config.transaction_timeout_ms
        kwargs = self._config.to_aiokafka_kwargs(settings, accepted=self._producer_params)
        return _AioProducer(kwargs, transactional_id)

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str | None,
        listener: RebalanceListener | None = None,
        start: StartFrom = "earliest",
    ) -> Consumer:
        config = self._config
        settings: dict[str, Any] = {
            "group_id": group_id,
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            "auto_offset_reset": start,
            "session_timeout_ms": config.session_timeout_ms,
            "heartbeat_interval_ms": config.heartbeat_interval_ms,
            "max_poll_interval_ms": config.max_poll_interval_ms,
            "fetch_max_wait_ms": config.fetch_max_wait_ms,
            # As Java does: a member gets max.poll.interval to finish on_revoked and rejoin.
            "rebalance_timeout_ms": config.max_poll_interval_ms,
        }
        kwargs = config.to_aiokafka_kwargs(settings, accepted=self._consumer_params)
        start_timeout = (config.max_poll_interval_ms + config.request_timeout_ms) / 1000
        consumer = _AioConsumer(kwargs, tuple(topics), group_id, listener, start, start_timeout)
        consumer.offsets = self._offsets
        return consumer


class _AioProducer(Producer):
    def __init__(self, kwargs: dict[str, Any], transactional_id: str | None) -> None:
        self._kwargs = kwargs
        self._transactional_id = transactional_id
        self._producer: Any = None
        self._start_lock = asyncio.Lock()
        self._txn_lock = asyncio.Lock()
        #: Partitions of the topics written so far (metadata, cached for validation).
        self._partitions: dict[str, set[int]] = {}
        #: Set once the producer is dead (fenced or fatally failed): every later call fails.
        self._fatal: EventLogError | None = None
        self._closed = False

    async def start(self) -> None:
        async with self._start_lock:
            if self._producer is not None:
                return
            if self._closed:
                raise EventLogError("start on a closed producer")
            producer = AIOKafkaProducer(**self._kwargs)
            try:
                await producer.start()
            except BaseException as exc:
                await producer.stop()
                if isinstance(exc, KafkaError):
                    raise _map_error(exc, "cannot start the Kafka producer") from exc
                raise
            self._producer = producer

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._producer is not None:
            await self._producer.stop()

    def _check_alive(self) -> None:
        if self._closed:
            raise EventLogError("the producer is closed")
        if self._fatal is not None:
            raise type(self._fatal)(str(self._fatal)) from self._fatal

    async def _validate(self, records: Sequence[OutRecord]) -> None:
        """Check topics and partitions first, so a bad batch writes nothing.

        aiokafka would assert on a bad partition, and its per-topic metadata request asks
        the broker to auto-create an unknown topic (with the broker's default partition
        count); an all-topics request creates nothing.
        """
        unknown = {
            r.topic
            for r in records
            if r.topic not in self._partitions
            or (r.partition is not None and r.partition not in self._partitions[r.topic])
        }
        if unknown:
            cluster = await self._producer.client.fetch_all_metadata()
            for topic in unknown:
                self._partitions[topic] = cluster.partitions_for_topic(topic) or set()
        for rec in records:
            if not self._partitions[rec.topic]:
                raise EventLogError(f"unknown topic {rec.topic!r}: create it first")
            if rec.partition is not None and rec.partition not in self._partitions[rec.topic]:
                raise EventLogError(f"topic {rec.topic!r} has no partition {rec.partition}")
            if rec.key is None and rec.value is None:
                raise EventLogError(f"a record for {rec.topic!r} needs a key or a value")

    async def _send_all(self, records: Sequence[OutRecord]) -> None:
        """Queue every record (in order), then wait for all acknowledgements together."""
        futures: list[asyncio.Future[Any]] = []
        try:
            for rec in records:
                partition = rec.partition
                if partition is None and rec.key is not None:
                    # What aiokafka's default partitioner picks, from a cache: it would run
                    # murmur2 in Python for each of a task's events, a twentieth of a run.
                    partition = murmur2_partition(rec.key, len(self._partitions[rec.topic]))
                futures.append(
                    await self._producer.send(
                        rec.topic,
                        value=rec.value,
                        key=rec.key,
                        partition=partition,
                        headers=list(rec.headers),
                    )
                )
        finally:
            # Even when queueing failed half way, collect what was queued so no future's
            # exception goes unretrieved.
            results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def send(self, records: Sequence[OutRecord]) -> None:
        if not records:
            return
        if self._transactional_id is not None:
            # A transactional producer can only write inside a transaction.
            await self._transact(records, {}, None)
            return
        self._check_alive()
        await self.start()
        try:
            await self._validate(records)
            await self._send_all(records)
        except KafkaError as exc:
            raise self._fail(exc, "send failed") from exc

    def _fail(self, exc: BaseException, what: str) -> EventLogError:
        error = _map_error(exc, what)
        txn = getattr(self._producer, "_txn_manager", None)
        # A fenced producer (or one whose sender task died) cannot be used again.
        if isinstance(exc, ProducerFenced | InvalidProducerEpoch) or (
            txn is not None and txn.is_fatal_error()
        ):
            self._fatal = error
            _retrieve_dead_futures(self._producer)
        return error

    async def commit_transaction(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        consumer: Consumer,
    ) -> None:
        if self._transactional_id is None:
            raise EventLogError("commit_transaction needs a producer with a transactional_id")
        if offsets and not isinstance(consumer, _AioConsumer):
            raise EventLogError("commit_transaction needs a consumer of the same event log")
        await self._transact(
            records, offsets, consumer if isinstance(consumer, _AioConsumer) and offsets else None
        )

    async def _transact(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        consumer: _AioConsumer | None,
    ) -> None:
        async with self._txn_lock:
            self._check_alive()
            await self.start()
            # Checked under the lock: a rebalance may have happened while we waited for it.
            group_id = consumer.check_owned(offsets) if consumer is not None else None
            producer = self._producer
            try:
                await self._validate(records)
                await producer.begin_transaction()
                await self._send_all(records)
                if offsets:
                    await producer.send_offsets_to_transaction(
                        {_aio_tp(tp): offset for tp, offset in offsets.items()}, group_id
                    )
                await producer.commit_transaction()
            except BaseException as exc:
                await self._abort()
                if isinstance(exc, KafkaError | IllegalOperation):
                    raise self._fail(exc, "transaction failed, nothing was written") from exc
                raise

    async def _abort(self) -> None:
        """Abort the open transaction, if aiokafka still has one that can be aborted."""
        txn = self._producer._txn_manager
        # aiokafka asserts on an abort from any other state (a fenced producer is in
        # FATAL_ERROR and must not be touched again).
        if txn.state not in (TransactionState.IN_TRANSACTION, TransactionState.ABORTABLE_ERROR):
            return
        try:
            await self._producer.abort_transaction()
        except KafkaError as exc:
            log.warning("aborting the transaction of %r failed: %r", self._transactional_id, exc)


async def _existing_partitions(
    kwargs: Mapping[str, Any], topics: Sequence[str]
) -> dict[str, set[int]]:
    """The partitions of ``topics``; EventLogError naming a topic that does not exist.

    Asked with a short-lived client before the consumer exists: a subscribing consumer's
    own metadata requests would make the broker auto-create a missing topic.
    """
    client = AIOKafkaClient(**{k: v for k, v in kwargs.items() if k in _CLIENT_PARAMS})
    try:
        await client.bootstrap()
        cluster = await client.fetch_all_metadata()
    except KafkaError as exc:
        raise _map_error(exc, "cannot read the cluster's topics") from exc
    finally:
        await client.close()
    found = {topic: set(cluster.partitions_for_topic(topic) or ()) for topic in topics}
    missing = sorted(topic for topic, parts in found.items() if not parts)
    if missing:
        raise EventLogError(f"unknown topics {missing}: create them first")
    return found


def _retrieve_dead_futures(producer: Any) -> None:
    """Mark the futures a dead aiokafka producer failed, but nobody awaits, as retrieved.

    When the sender dies (a fenced producer) aiokafka fails its transaction waiter and the
    batches' drain waiters; unretrieved, each logs "Future exception was never retrieved"
    when collected, for a situation we already reported as FencedError.
    """
    futures: list[asyncio.Future[Any] | None] = []
    try:
        futures.append(producer._txn_manager._transaction_waiter)
        accumulator = producer._message_accumulator
        batches = [b for queued in accumulator._batches.values() for b in queued]
        batches.extend(accumulator._pending_batches)
        futures.extend(b._drain_waiter for b in batches)
    except AttributeError:  # another aiokafka version: only the log noise comes back
        return
    for future in futures:
        if future is not None and future.done() and not future.cancelled():
            future.exception()


class _AioRebalanceAdapter(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka's listener interface, forwarding to the consumer (which calls ours)."""

    def __init__(self, owner: _AioConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._owner.partitions_revoked({_our_tp(tp) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._owner.partitions_assigned({_our_tp(tp) for tp in assigned})


class _AioConsumer(ListedOffsets, Consumer):
    def __init__(
        self,
        kwargs: dict[str, Any],
        topics: tuple[str, ...],
        group_id: str | None,
        listener: RebalanceListener | None,
        start: StartFrom,
        start_timeout: float,
    ) -> None:
        self._kwargs = kwargs
        self._topics = topics
        self._group_id = group_id
        self._listener = listener
        self._start = start
        self._start_timeout = start_timeout
        self._consumer: Any = None
        self._start_lock = asyncio.Lock()
        self._first_assignment: asyncio.Future[None] | None = None
        self._paused: set[TopicPartition] = set()
        #: The first exception a listener raised in the background, for the next poll.
        self._listener_error: BaseException | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._consumer is not None:
            # Also while the first start() waits for its assignment: a listener called from
            # that assignment may use the consumer (commit, committed, seek...).
            return
        async with self._start_lock:
            if self._consumer is not None:
                return
            if self._closed:
                raise EventLogError("start on a closed consumer")
            partitions = await _existing_partitions(self._kwargs, self._topics)
            consumer = AIOKafkaConsumer(**self._kwargs)
            try:
                await consumer.start()
            except BaseException as exc:
                await consumer.stop()
                if isinstance(exc, KafkaError):
                    raise _map_error(exc, f"cannot start a consumer of {self._topics}") from exc
                raise
            self._consumer = consumer
            try:
                if self._group_id is None:
                    await self._assign_everything(consumer, partitions)
                else:
                    # Subscribed only now, so the consumer is fully usable by the listener
                    # that the first assignment calls; then wait for that assignment, so a
                    # started member already owns its partitions.
                    first = self._first_assignment = asyncio.get_running_loop().create_future()
                    consumer.subscribe(list(self._topics), listener=_AioRebalanceAdapter(self))
                    await asyncio.wait_for(asyncio.shield(first), self._start_timeout)
            except BaseException as exc:
                await self.close()
                if isinstance(exc, TimeoutError):
                    raise EventLogError(
                        f"group {self._group_id!r} gave no assignment within "
                        f"{self._start_timeout:.0f}s"
                    ) from exc
                if isinstance(exc, KafkaError):
                    raise _map_error(exc, f"cannot start a consumer of {self._topics}") from exc
                raise

    async def _assign_everything(self, consumer: Any, partitions: dict[str, set[int]]) -> None:
        tps = [
            AioTopicPartition(topic, p) for topic in self._topics for p in sorted(partitions[topic])
        ]
        consumer.assign(tps)
        if self._start == "latest":
            # Resolve "latest" now, not at the first fetch, so a record appended after
            # start() is read.
            for tp, offset in (await consumer.end_offsets(tps)).items():
                consumer.seek(tp, offset)
        else:
            await consumer.seek_to_beginning(*tps)

    async def close(self) -> None:
        """Leave the group without committing; the listener is not called (as in aiokafka)."""
        if self._closed:
            return
        self._closed = True
        if self._consumer is not None:
            await self._consumer.stop()

    # -- rebalance (called from aiokafka's coordinator task) -----------------------------

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked and self._listener is not None and not self._closed:
            await self._call_listener(self._listener.on_revoked, revoked)

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # aiokafka forgets pauses with the old assignment; keep those still assigned.
        self._paused &= assigned
        if self._paused and self._consumer is not None:
            self._consumer.pause(*(_aio_tp(tp) for tp in self._paused))
        if assigned and self._listener is not None and not self._closed:
            await self._call_listener(self._listener.on_assigned, assigned)
        if self._first_assignment is not None and not self._first_assignment.done():
            self._first_assignment.set_result(None)

    async def _call_listener(self, method: Any, partitions: set[TopicPartition]) -> None:
        try:
            await method(sorted(partitions))
        except Exception as exc:
            # aiokafka would only log it; keep it for the stage's next poll instead.
            log.warning("rebalance listener %r failed: %r", method, exc)
            if self._listener_error is None:
                self._listener_error = exc

    # -- reading ----------------------------------------------------------------------------

    async def poll(self, *, max_records: int, timeout: float) -> list[Record]:
        if self._closed:
            raise EventLogError("poll on a closed consumer")
        await self.start()
        if self._listener_error is not None:
            error, self._listener_error = self._listener_error, None
            raise error
        fetch = asyncio.ensure_future(
            self._consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_records)
        )
        # getmany waits, without a timeout, for a rebalance in progress to finish; bound it.
        done, _ = await asyncio.wait({fetch}, timeout=timeout + _POLL_GRACE)
        if not done:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
            return []
        try:
            batches = fetch.result()
        except KafkaError as exc:
            raise _map_error(exc, "poll failed") from exc
        records: list[Record] = []
        for atp, messages in batches.items():
            tp = TopicPartition(atp.topic, atp.partition)
            records.extend(
                [
                    record_at(tp, m.offset, m.key, m.value, _headers(m.headers), m.timestamp)
                    for m in messages
                ]
            )
        return records

    def _require_started(self) -> Any:
        if self._consumer is None or self._closed:
            raise EventLogError("the consumer is not started (or closed)")
        return self._consumer

    async def position(self, tp: TopicPartition) -> int | None:
        consumer = self._require_started()
        try:
            # aiokafka advances it as getmany hands records out, and past control batches.
            return int(await consumer.position(_aio_tp(tp)))
        except IllegalStateError:
            return None
        except KafkaError as exc:
            raise _map_error(exc, f"cannot read the position of {tp}") from exc

    def seek(self, tp: TopicPartition, offset: int) -> None:
        consumer = self._require_started()
        try:
            consumer.seek(_aio_tp(tp), offset)
        except IllegalStateError as exc:
            raise EventLogError(f"cannot seek {tp}: not assigned to this consumer") from exc

    def pause(self, tps: Sequence[TopicPartition], paused: bool) -> None:
        consumer = self._require_started()
        assigned = {_our_tp(tp) for tp in consumer.assignment()}
        if paused:
            chosen = [tp for tp in tps if tp in assigned]
            self._paused.update(chosen)
            consumer.pause(*(_aio_tp(tp) for tp in chosen))
        else:
            self._paused.difference_update(tps)
            consumer.resume(*(_aio_tp(tp) for tp in tps if tp in assigned))

    # -- committing -----------------------------------------------------------------------

    def check_owned(self, offsets: Mapping[TopicPartition, int]) -> str:
        """The group id, if this member may commit ``offsets``; else FencedError."""
        if self._group_id is None:
            raise EventLogError("a consumer without group_id has no offsets to commit")
        consumer = self._require_started()
        assigned = {_our_tp(tp) for tp in consumer.assignment()}
        lost = sorted(set(offsets) - assigned)
        if lost:
            raise FencedError(
                f"partitions {lost} are no longer assigned to this member of group "
                f"{self._group_id!r}; their work is redone by the new owner"
            )
        return self._group_id

    async def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        if self._group_id is None or not tps:
            return {}
        await self.start()
        try:
            found = await asyncio.gather(*(self._consumer.committed(_aio_tp(tp)) for tp in tps))
        except KafkaError as exc:
            raise _map_error(exc, f"cannot read the offsets of group {self._group_id!r}") from exc
        return {tp: offset for tp, offset in zip(tps, found, strict=True) if offset is not None}

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        if self._group_id is None:
            raise EventLogError("a consumer without group_id has no offsets to commit")
        await self.start()
        try:
            await self._consumer.commit({_aio_tp(tp): offset for tp, offset in offsets.items()})
        except IllegalStateError as exc:
            raise FencedError(
                f"cannot commit {dict(offsets)}: not assigned to this member of group "
                f"{self._group_id!r} any more"
            ) from exc
        except KafkaError as exc:
            raise _map_error(exc, f"commit to group {self._group_id!r} failed") from exc
