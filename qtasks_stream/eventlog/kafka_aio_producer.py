"""The aiokafka producer: transactions serialize on a per-producer lock.

A listener committing from ``on_revoked`` thus waits for a transaction the stage has in
flight instead of interleaving with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import IllegalOperation, InvalidProducerEpoch, KafkaError, ProducerFenced
from aiokafka.producer.transaction_manager import TransactionState

from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.base import Consumer
from qtasks_stream.eventlog.kafka_aio_consumer import AioConsumer
from qtasks_stream.eventlog.kafka_aio_convert import aio_tp, map_error
from qtasks_stream.eventlog.kafka_common import CheckedProducer
from qtasks_stream.eventlog.partitioning import murmur2_partition
from qtasks_stream.records import OutRecord, TopicPartition

__all__ = ["AioProducer"]

log = logging.getLogger(__name__)


class AioProducer(CheckedProducer):
    def __init__(self, kwargs: dict[str, Any], transactional_id: str | None) -> None:
        super().__init__(transactional_id)
        self._kwargs = kwargs
        self._producer: Any = None
        self._start_lock = asyncio.Lock()
        self._txn_lock = asyncio.Lock()

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
                    raise map_error(
                        exc,
                        "cannot start the Kafka producer",
                        conf=self._kwargs,
                        operation="WRITE",
                        names={"transactional id": self._transactional_id or ""},
                    ) from exc
                raise
            self._producer = producer

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._producer is not None:
            await self._producer.stop()

    async def _validate(self, records: Sequence[OutRecord]) -> None:
        """Check topics and partitions first, so a bad batch writes nothing.

        aiokafka would assert on a bad partition, and its per-topic metadata request asks
        the broker to auto-create an unknown topic (with the broker's default partition
        count); an all-topics request creates nothing.
        """
        unknown = self._topics_to_describe(records)
        if unknown:
            cluster = await self._producer.client.fetch_all_metadata()
            for topic in unknown:
                self._partitions[topic] = cluster.partitions_for_topic(topic) or set()
        self._check_records(records)
        for rec in records:
            # aiokafka asserts on it; librdkafka writes such a record.
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
        error = map_error(
            exc,
            what,
            conf=self._kwargs,
            operation="WRITE",
            names={"transactional id": self._transactional_id or ""},
        )
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
        self._check_transactional()
        if offsets and not isinstance(consumer, AioConsumer):
            raise EventLogError("commit_transaction needs a consumer of the same event log")
        await self._transact(
            records, offsets, consumer if isinstance(consumer, AioConsumer) and offsets else None
        )

    async def _transact(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        consumer: AioConsumer | None,
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
                        {aio_tp(tp): offset for tp, offset in offsets.items()}, group_id
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
