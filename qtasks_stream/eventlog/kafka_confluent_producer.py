"""The confluent-kafka producer: every blocking call on one thread of its own.

Produce + flush and the transaction calls run on a single-thread executor, so transactions
of one producer never overlap. Plain sends that arrive while one is being written wait and
go together in the next batch, flushed once: a flush per call would serialize concurrent
callers on that thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import confluent_kafka as ck
from confluent_kafka import KafkaError, KafkaException

from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.base import Consumer
from qtasks_stream.eventlog.kafka_admin import describe_kafka_error, kafka_error_of
from qtasks_stream.eventlog.kafka_common import CheckedProducer
from qtasks_stream.eventlog.kafka_confluent_consumer import ConfluentConsumer
from qtasks_stream.eventlog.kafka_confluent_convert import ck_tp, map_error
from qtasks_stream.records import OutRecord, TopicPartition

__all__ = ["ConfluentProducer"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class ConfluentProducer(CheckedProducer):
    def __init__(self, conf: dict[str, Any], transactional_id: str | None, timeout: float) -> None:
        super().__init__(transactional_id)
        self._conf = conf
        self._timeout = timeout
        self._producer: ck.Producer | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._start_lock = asyncio.Lock()
        #: send() calls waiting for the flusher to take them into its next batch.
        self._queued: list[_QueuedSend] = []
        #: The task writing queued sends, batch after batch; None while nothing is queued.
        self._flusher: asyncio.Task[None] | None = None

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        async with self._start_lock:
            if self._producer is not None:
                return
            if self._closed:
                raise EventLogError("start on a closed producer")
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="qtasks-rdkafka-producer"
            )
            producer = None
            try:
                producer = await self._run(ck.Producer, self._conf)
                if self._transactional_id is not None:
                    # Fences older producers with this id and finishes their open transaction.
                    await self._run(producer.init_transactions, self._timeout)
            except KafkaException as exc:
                if producer is not None:
                    # Why it failed (FAIL: connection refused...) is in its queued log lines,
                    # which reach the logger only when polled: dropped unpolled, they were lost.
                    await self._run(producer.poll, 0)
                self._executor.shutdown(wait=False)
                self._executor = None
                raise map_error(
                    exc,
                    "cannot start the Kafka producer",
                    conf=self._conf,
                    operation="WRITE",
                    names={"transactional id": self._transactional_id or ""},
                ) from exc
            self._producer = producer

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            # Sends accepted before close() are written (or fail) before the executor goes.
            await asyncio.wait({self._flusher})
        if self._producer is not None:
            try:
                await self._run(self._producer.flush, self._timeout)
            finally:
                assert self._executor is not None
                self._executor.shutdown(wait=False)

    def _validate(self, records: Sequence[OutRecord]) -> None:
        """Check topics and partitions first, so a bad batch writes nothing (producer thread).

        librdkafka would only fail the record after its metadata propagation timeout.
        """
        assert self._producer is not None
        for topic in self._topics_to_describe(records):
            # With allow.auto.create.topics=false this request creates nothing.
            info = self._producer.list_topics(topic, timeout=self._timeout).topics.get(topic)
            ok = info is not None and info.error is None
            self._partitions[topic] = set(info.partitions) if ok and info is not None else set()
        self._check_records(records)

    def _produce_all(self, records: Sequence[OutRecord], on_delivery: Any) -> None:
        """Queue every record in order (producer thread)."""
        assert self._producer is not None
        for rec in records:
            kwargs: dict[str, Any] = {
                "key": rec.key,
                "value": rec.value,
                "on_delivery": on_delivery,
            }
            if rec.headers:
                kwargs["headers"] = list(rec.headers)
            if rec.partition is not None:
                kwargs["partition"] = rec.partition
            while True:
                try:
                    self._producer.produce(rec.topic, **kwargs)
                    break
                except BufferError:
                    # The local queue is full: let deliveries drain it, then retry.
                    self._producer.poll(0.05)

    async def send(self, records: Sequence[OutRecord]) -> None:
        if not records:
            return
        if self._transactional_id is not None:
            # A transactional producer can only write inside a transaction.
            await self._transact(records, {}, None)
            return
        self._check_alive()
        await self.start()
        # Again: close() may have begun meanwhile, and it only waits for sends already queued.
        self._check_alive()
        # A produce + flush round trip per call would serialize concurrent callers on the
        # one producer thread (a few ms each); they join the next batch instead, which is
        # produced whole and flushed once.
        loop = asyncio.get_running_loop()
        queued = _QueuedSend(list(records), loop.create_future())
        self._queued.append(queued)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_queued(), name="qtasks-rdkafka-send")
        await queued.future

    async def _flush_queued(self) -> None:
        """Write queued sends, batch after batch, until none is left (event loop)."""
        batch: list[_QueuedSend] = []
        try:
            while self._queued:
                # A caller cancelled before its batch started gives up its records, as a
                # cancelled executor job never runs.
                batch = [q for q in self._queued if not q.future.done()]
                self._queued = []
                if not batch:
                    continue
                try:
                    await self._run(self._send_batch_blocking, batch)
                except Exception as exc:  # the batch as a whole failed (executor gone...)
                    for queued in batch:
                        if queued.failure is None:
                            queued.failure = self._mapped(exc, "send failed", queued.records)
                for queued in batch:
                    self._settle_send(queued)
                batch = []
        finally:
            self._flusher = None
            # Cancelled (the loop is shutting down): no one else would answer these callers.
            for queued in [*batch, *self._queued]:
                if not queued.future.done():
                    queued.future.set_exception(EventLogError("send abandoned: producer stopped"))
            self._queued = []

    def _send_batch_blocking(self, batch: list[_QueuedSend]) -> None:
        """Produce every queued send in order, then flush once (producer thread).

        A send refused before reaching a broker (validation, produce()) fails alone; the
        others go on. Delivery reports then tell, record by record, what was written.
        """
        producer = self._producer
        assert producer is not None
        for queued in batch:
            try:
                self._validate(queued.records)
                self._produce_all(queued.records, queued.on_delivery)
            except Exception as exc:
                queued.failure = exc
        # message.timeout.ms (2x the request timeout) fails undelivered records by then; this
        # only bounds the wait should librdkafka never report them.
        deadline = time.monotonic() + self._timeout * 2
        while producer.flush(0.1) > 0:
            if time.monotonic() > deadline:
                return

    def _settle_send(self, queued: _QueuedSend) -> None:
        """Complete one caller's future from what became of its records (event loop)."""
        if queued.future.done():  # the caller was cancelled meanwhile
            return
        error: BaseException | None = None
        failure = queued.failure
        if isinstance(failure, KafkaException):
            error = self._fail(failure, "send failed", queued.records)
            error.__cause__ = failure
        elif failure is not None:
            # Ours (EventLogError: unknown topic...) or the caller's bug (TypeError for a
            # bad key...): raised as they are, as before sends were batched.
            error = failure
        elif queued.errors:
            first = KafkaException(queued.errors[0])
            error = self._fail(
                first,
                f"send failed, {len(queued.errors)} of {len(queued.records)} records not written",
                queued.records,
            )
            error.__cause__ = first
        elif queued.delivered < len(queued.records):
            error = EventLogError(
                f"send failed: {len(queued.records) - queued.delivered} of "
                f"{len(queued.records)} records not acknowledged within {self._timeout * 2:.0f}s"
            )
        if error is None:
            queued.future.set_result(None)
        else:
            queued.future.set_exception(error)

    def _mapped(
        self, exc: BaseException, what: str, records: Sequence[OutRecord] = ()
    ) -> EventLogError:
        """``map_error`` with what a refusal of this producer's writes names."""
        return map_error(
            exc,
            what,
            conf=self._conf,
            operation="WRITE",
            names={
                "topic": ", ".join(sorted({r.topic for r in records})),
                "transactional id": self._transactional_id or "",
            },
        )

    def _fail(
        self, exc: KafkaException, what: str, records: Sequence[OutRecord] = ()
    ) -> EventLogError:
        error = self._mapped(exc, what, records)
        err = kafka_error_of(exc)
        if err is not None and err.fatal():
            self._fatal = error
        return error

    async def commit_transaction(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        consumer: Consumer,
    ) -> None:
        self._check_transactional()
        if not offsets:
            await self._transact(records, {}, None)
            return
        if not isinstance(consumer, ConfluentConsumer):
            raise EventLogError("commit_transaction needs a consumer of the same event log")
        # The broker fences the offsets if this generation is no longer the group's.
        await self._transact(records, offsets, await consumer.group_metadata_for(offsets))

    async def _transact(
        self, records: Sequence[OutRecord], offsets: Mapping[TopicPartition, int], group: Any
    ) -> None:
        self._check_alive()
        await self.start()
        try:
            await self._run(self._transact_blocking, records, offsets, group)
        except KafkaException as exc:
            raise self._fail(exc, "transaction failed, nothing was written") from exc

    def _transact_blocking(
        self, records: Sequence[OutRecord], offsets: Mapping[TopicPartition, int], group: Any
    ) -> None:
        producer = self._producer
        assert producer is not None
        self._validate(records)
        producer.begin_transaction()
        try:
            self._produce_all(records, None)
            if offsets:
                producer.send_offsets_to_transaction(
                    [ck_tp(tp, offset) for tp, offset in offsets.items()], group, self._timeout
                )
            producer.commit_transaction(self._timeout)
        except BaseException as exc:
            err = kafka_error_of(exc)
            if err is None or not err.fatal():
                # Abortable (or our own) error: roll back so the next transaction can begin.
                try:
                    producer.abort_transaction(self._timeout)
                except KafkaException as abort_exc:
                    log.warning(
                        "aborting the transaction of %r failed: %s",
                        self._transactional_id,
                        describe_kafka_error(abort_exc),
                    )
            raise


class _QueuedSend:
    """One ``send()`` call in a coalesced batch, with the future its caller awaits.

    ``failure``, ``delivered`` and ``errors`` are written on the producer thread (delivery
    reports fire inside its produce and flush calls) and read on the event loop once the
    batch's flush has returned.
    """

    __slots__ = ("delivered", "errors", "failure", "future", "records")

    def __init__(self, records: list[OutRecord], future: asyncio.Future[None]) -> None:
        self.records = records
        self.future = future
        #: Why the records were refused before reaching a broker (some may have been queued).
        self.failure: BaseException | None = None
        self.delivered = 0  # delivery reports received, failed ones included
        self.errors: list[KafkaError] = []

    def on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        self.delivered += 1
        if err is not None:
            self.errors.append(err)
