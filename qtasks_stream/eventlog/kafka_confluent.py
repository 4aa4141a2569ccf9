"""The event log on Apache Kafka through confluent-kafka (librdkafka).

librdkafka calls block, so each client gets a thread of its own:

* a producer runs every blocking call (produce + flush, the transaction calls) on a
  single-thread executor, so transactions of one producer never overlap. Plain sends that
  arrive while one is being written wait and go together in the next batch, flushed once:
  a flush per call would serialize concurrent callers on that thread;
* a consumer runs one thread that loops ``consume()`` and buffers what it gets; each round
  waits at most a short slice for the first message and takes what else is ready. As with
  aiokafka, membership and fetching thus go on while the stage is busy between polls: a
  member started second does not wait for the first one to poll before the group settles.
  ``poll()`` only drains the buffer.

confluent-kafka serializes the calls on a consumer: any call from another thread waits for
the running ``consume()`` and starves behind a loop of them. So *every* consumer call
(commit, committed, seek, pause) runs on the consumer thread between two ``consume()``
calls, as a command or from state it reads. The group metadata a transaction needs is
cached by that thread, renewed with every assignment change and every round, so a
transaction does not wait for a round to end.

Rebalance callbacks fire inside ``consume()`` on that thread. They hand the listener's
coroutine to the event loop and, while waiting for it, keep running commands: a listener that
commits (directly, or through a transaction) is served from inside the callback, which
librdkafka allows, instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import confluent_kafka as ck
from confluent_kafka import KafkaError, KafkaException

from qtasks_stream.errors import EventLogError, FencedError
from qtasks_stream.eventlog.base import Consumer, EventLog, Producer, RebalanceListener, StartFrom
from qtasks_stream.eventlog.kafka_admin import (
    ListedOffsets,
    OffsetLister,
    describe_kafka_error,
    ensure_topics,
    kafka_error_of,
    retry_retriable,
    with_rdkafka_logger,
)
from qtasks_stream.eventlog.kafka_config import ConfValue, KafkaConfig
from qtasks_stream.records import (
    Headers,
    OutRecord,
    Record,
    TopicPartition,
    TopicSpec,
    record_at,
)

__all__ = ["ConfluentEventLog"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: librdkafka codes meaning "a newer producer or group generation owns this work".
_FENCING_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.STALE_MEMBER_EPOCH,
        KafkaError.FENCED_MEMBER_EPOCH,
    }
)
#: Consumer errors that poll() raises; anything else librdkafka reports it retries itself.
_CONSUMER_FATAL_CODES = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
    }
)
#: How long one consume() call may block: bounds how long a command waits to run.
_CONSUME_SLICE = 0.05
#: The slice of a consumer without a group: such readers (history, wait, replay) are made
#: and closed per call, and close() waits out the slice in progress.
_UNMANAGED_CONSUME_SLICE = 0.01
_CONSUME_BATCH = 500
#: How often (seconds) an idle group consumer re-reads its group metadata (generation).
_IDLE_METADATA_REFRESH = 1.0
#: Past this many buffered records a partition stops fetching until poll() drains it.
_BUFFER_HIGH = 2_000
_BUFFER_LOW = _BUFFER_HIGH // 2


def _map_error(exc: BaseException, what: str) -> EventLogError:
    """Our error for a librdkafka one, keeping its code; raise it ``from exc``."""
    if isinstance(exc, EventLogError):
        return exc
    err = kafka_error_of(exc)
    text = f"{what}: {describe_kafka_error(exc)}"
    if err is not None and err.code() in _FENCING_CODES:
        return FencedError(text)
    return EventLogError(text)


def _ck_tp(tp: TopicPartition, offset: int | None = None) -> ck.TopicPartition:
    if offset is None:
        return ck.TopicPartition(tp.topic, tp.partition)
    return ck.TopicPartition(tp.topic, tp.partition, offset)


def _our_tp(tp: ck.TopicPartition) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _high_watermark(consumer: ck.Consumer, tp: TopicPartition, timeout: float) -> int:
    """Where the next record of ``tp`` will go (blocking)."""
    _low, high = consumer.get_watermark_offsets(_ck_tp(tp), timeout=timeout)
    return high


class ConfluentEventLog(EventLog):
    """Kafka through confluent-kafka. Creating it does no I/O; clients connect in ``start()``."""

    def __init__(self, config: KafkaConfig) -> None:
        self._config = config
        self._offsets = OffsetLister(config)

    async def close(self) -> None:
        self._offsets.close()

    async def create_topics(self, specs: Sequence[TopicSpec]) -> None:
        await ensure_topics(self._config, specs)

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        config = self._config
        settings: dict[str, ConfValue] = {
            "enable.idempotence": True,
            "acks": "all",
            # Java's (and aiokafka's and the in-memory log's) key hashing, so a key lands on
            # the same partition whichever client wrote it.
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            # A missing topic is an error to report, not one to create with defaults.
            "allow.auto.create.topics": False,
            "message.timeout.ms": config.request_timeout_ms * 2,
            "request.timeout.ms": config.request_timeout_ms,
            "topic.metadata.refresh.interval.ms": config.metadata_max_age_ms,
        }
        if transactional_id is not None:
            settings["transactional.id"] = transactional_id
            settings["transaction.timeout.ms"] = config.transaction_timeout_ms
            # A transaction begun right after the last commit finds the coordinator still
            # writing that one's markers (CONCURRENT_TRANSACTIONS), and waits this long
            # before asking again: 100 ms by default, behind one hop in four when idle
            # (p90 of an idle task 89-119 -> 43-46 ms). The Java client waits 20 ms there.
            settings["retry.backoff.ms"] = 10
            # librdkafka refuses a transactional producer whose messages may outlive it.
            settings["message.timeout.ms"] = min(
                config.request_timeout_ms * 2, config.transaction_timeout_ms
            )
        return _ConfluentProducer(
            with_rdkafka_logger(config.to_librdkafka(settings)),
            transactional_id,
            config.request_timeout_ms / 1000,
        )

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str | None,
        listener: RebalanceListener | None = None,
        start: StartFrom = "earliest",
    ) -> Consumer:
        config = self._config
        settings: dict[str, ConfValue] = {
            # librdkafka insists on a group id; a consumer without a group only assign()s
            # and never commits, so a private one is never joined.
            "group.id": group_id or f"qtasks-unmanaged-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": start,
            "allow.auto.create.topics": False,
            "session.timeout.ms": config.session_timeout_ms,
            "heartbeat.interval.ms": config.heartbeat_interval_ms,
            "max.poll.interval.ms": config.max_poll_interval_ms,
            "fetch.wait.max.ms": config.fetch_max_wait_ms,
            "topic.metadata.refresh.interval.ms": config.metadata_max_age_ms,
            # librdkafka prefetches up to 64 MiB per client by default; the buffer here
            # already holds a few thousand records per partition.
            "queued.max.messages.kbytes": 16_384,
        }
        consumer = _ConfluentConsumer(
            with_rdkafka_logger(config.to_librdkafka(settings)),
            tuple(topics),
            group_id,
            listener,
            start,
            timeout=config.request_timeout_ms / 1000,
            start_timeout=(config.max_poll_interval_ms + config.request_timeout_ms) / 1000,
        )
        consumer.offsets = self._offsets
        return consumer


class _ConfluentProducer(Producer):
    def __init__(self, conf: dict[str, Any], transactional_id: str | None, timeout: float) -> None:
        self._conf = conf
        self._transactional_id = transactional_id
        self._timeout = timeout
        self._producer: ck.Producer | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._start_lock = asyncio.Lock()
        #: Set once the producer is dead (fenced or fatally failed): every later call fails.
        self._fatal: EventLogError | None = None
        self._closed = False
        #: Partitions of the topics written so far (metadata, cached for validation).
        self._partitions: dict[str, set[int]] = {}
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
                raise _map_error(exc, "cannot start the Kafka producer") from exc
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

    def _check_alive(self) -> None:
        if self._closed:
            raise EventLogError("the producer is closed")
        if self._fatal is not None:
            raise type(self._fatal)(str(self._fatal)) from self._fatal

    def _validate(self, records: Sequence[OutRecord]) -> None:
        """Check topics and partitions first, so a bad batch writes nothing (producer thread).

        librdkafka would only fail the record after its metadata propagation timeout.
        """
        assert self._producer is not None
        unknown = {
            r.topic
            for r in records
            if r.topic not in self._partitions
            or (r.partition is not None and r.partition not in self._partitions[r.topic])
        }
        for topic in unknown:
            # With allow.auto.create.topics=false this request creates nothing.
            info = self._producer.list_topics(topic, timeout=self._timeout).topics.get(topic)
            ok = info is not None and info.error is None
            self._partitions[topic] = set(info.partitions) if ok and info is not None else set()
        for rec in records:
            if not self._partitions[rec.topic]:
                raise EventLogError(f"unknown topic {rec.topic!r}: create it first")
            if rec.partition is not None and rec.partition not in self._partitions[rec.topic]:
                raise EventLogError(f"topic {rec.topic!r} has no partition {rec.partition}")

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
                            queued.failure = _map_error(exc, "send failed")
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
            error = self._fail(failure, "send failed")
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

    def _fail(self, exc: KafkaException, what: str) -> EventLogError:
        error = _map_error(exc, what)
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
        if self._transactional_id is None:
            raise EventLogError("commit_transaction needs a producer with a transactional_id")
        if not offsets:
            await self._transact(records, {}, None)
            return
        if not isinstance(consumer, _ConfluentConsumer):
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
                    [_ck_tp(tp, offset) for tp, offset in offsets.items()], group, self._timeout
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


class _ConfluentConsumer(ListedOffsets, Consumer):
    def __init__(
        self,
        conf: dict[str, Any],
        topics: tuple[str, ...],
        group_id: str | None,
        listener: RebalanceListener | None,
        start: StartFrom,
        *,
        timeout: float,
        start_timeout: float,
    ) -> None:
        self._conf = conf
        self._topics = topics
        self._group_id = group_id
        self._listener = listener
        self._start = start
        self._timeout = timeout
        self._start_timeout = start_timeout
        self._slice = _CONSUME_SLICE if group_id is not None else _UNMANAGED_CONSUME_SLICE
        self._consumer: ck.Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._first_assignment: asyncio.Future[None] | None = None
        self._stop = threading.Event()
        #: Work for the consumer thread; None only wakes it (a listener finished).
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        #: Set while closing: rebalance callbacks from close() skip the listener, as aiokafka.
        self._closing = False
        self._closed = False
        # State shared between the consumer thread and the event loop, under _lock.
        self._lock = threading.Lock()
        self._thread_done = False
        self._assigned: set[TopicPartition] = set()
        self._buffers: dict[TopicPartition, deque[Record]] = {}
        #: librdkafka's position per partition after the last consume(): past every record
        #: handed to the buffers and past transaction markers (which are never delivered).
        self._fetch_positions: dict[TopicPartition, int] = {}
        #: A position moved with no record to hand out: poll() returns (empty) at once.
        self._position_moved = False
        #: Partitions sought and not yet delivered from: librdkafka's position for them is
        #: still the one before the seek, so it is not taken.
        self._unsettled: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()  # what the stage asked for
        self._throttled: set[TopicPartition] = set()  # buffer full
        self._pending_seeks: dict[TopicPartition, int] = {}
        #: Bumped by every seek: records fetched before it are dropped.
        self._seek_epochs: dict[TopicPartition, int] = {}
        #: Partitions whose librdkafka pause state must be set again (new assignment).
        self._pause_dirty: set[TopicPartition] = set()
        #: A fatal consumer error: every later poll raises it.
        self._fatal: EventLogError | None = None
        #: The first exception a listener raised; the next poll raises it, once.
        self._listener_error: BaseException | None = None
        #: consumer_group_metadata() as of the last assignment change or consume round, set
        #: together with ``_assigned``: a transaction reads both at once (group_metadata_for).
        self._group_metadata: Any = None
        self._next_tp = 0
        #: A consumer without a group: its assignment (start offsets) until the first poll.
        self._deferred: dict[TopicPartition, int] | None = None
        self._polled = threading.Event()
        # Consumer thread only.
        self._rd_paused: set[TopicPartition] = set()
        self._seek_failures: dict[TopicPartition, int] = {}

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
            loop = asyncio.get_running_loop()
            self._loop = loop
            try:
                consumer = await asyncio.to_thread(ck.Consumer, self._conf)
            except KafkaException as exc:
                raise _map_error(exc, "cannot create the Kafka consumer") from exc
            # No consumer thread yet: these calls may run anywhere.
            try:
                partitions = await asyncio.to_thread(self._partitions, consumer)
                if self._group_id is not None:
                    self._first_assignment = loop.create_future()
                    consumer.subscribe(
                        list(self._topics), on_assign=self._on_assign, on_revoke=self._on_revoke
                    )
                else:
                    await asyncio.to_thread(self._assign_everything, consumer, partitions)
            except BaseException as exc:
                await asyncio.to_thread(consumer.close)
                if isinstance(exc, KafkaException):
                    raise _map_error(exc, f"cannot start a consumer of {self._topics}") from exc
                raise
            self._consumer = consumer
            self._thread = threading.Thread(
                target=self._run, name=f"qtasks-rdkafka-consumer-{self._topics}", daemon=True
            )
            self._thread.start()
            if self._first_assignment is not None:
                # Like aiokafka's start(): a started member already owns its partitions.
                try:
                    await asyncio.wait_for(
                        asyncio.shield(self._first_assignment), self._start_timeout
                    )
                except TimeoutError as exc:
                    await self.close()
                    raise EventLogError(
                        f"group {self._group_id!r} gave no assignment within "
                        f"{self._start_timeout:.0f}s"
                    ) from exc
                except BaseException:
                    await self.close()
                    raise

    def _partitions(self, consumer: ck.Consumer) -> list[TopicPartition]:
        """Every partition of the topics; EventLogError for a missing topic (blocking).

        Asked of the new consumer itself, not of the event log's connected admin client:
        it also fills the consumer's metadata cache, without which partitions assigned next
        have no known leader and their first fetch waits out a 500 ms retry.
        """
        metadata = consumer.list_topics(timeout=self._timeout)
        tps: list[TopicPartition] = []
        for topic in self._topics:
            info = metadata.topics.get(topic)
            if info is None or info.error is not None or not info.partitions:
                raise EventLogError(f"unknown topic {topic!r}: create it first")
            tps.extend(TopicPartition(topic, p) for p in sorted(info.partitions))
        return tps

    def _assign_everything(self, consumer: ck.Consumer, tps: list[TopicPartition]) -> None:
        assignment: list[ck.TopicPartition] = []
        for tp in tps:
            if self._start == "latest":
                # Resolve "latest" now, not at the first fetch, so a record appended after
                # start() is read. A partition created a moment ago may not be served by
                # its leader yet (NOT_LEADER_FOR_PARTITION): that passes, so retry it.
                high = retry_retriable(
                    functools.partial(_high_watermark, consumer, tp),
                    self._timeout,
                    f"reading the end of {tp}",
                )
                assignment.append(_ck_tp(tp, high))
            else:
                assignment.append(_ck_tp(tp, ck.OFFSET_BEGINNING))
        with self._lock:
            self._assigned = set(tps)
            # Assigned by the consumer thread at the first poll, with the seeks and pauses
            # asked for until then: librdkafka's seek of a partition already fetching
            # delivered from the new offset only about a second later.
            self._deferred = {_our_tp(part): part.offset for part in assignment}

    def _assign_deferred(self, consumer: ck.Consumer) -> None:
        """The first assignment of a consumer without a group, at the offsets seeked to
        since start() and with the partitions paused meanwhile (consumer thread)."""
        with self._lock:
            deferred, self._deferred = self._deferred or {}, None
            starts = {**deferred, **self._pending_seeks}
            self._pending_seeks = {}
            paused = (self._paused | self._throttled) & self._assigned
        consumer.assign([_ck_tp(tp, offset) for tp, offset in starts.items()])
        if paused:
            consumer.pause([_ck_tp(tp) for tp in sorted(paused)])
        self._rd_paused = paused

    async def close(self) -> None:
        """Leave the group without committing; the listener is not called (as aiokafka)."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._stop.set()
        if self._thread is not None:
            # The thread closes the consumer itself, as it makes every other call.
            await asyncio.to_thread(self._thread.join)

    # -- commands -------------------------------------------------------------------------

    async def _call(self, fn: Callable[[ck.Consumer], _T]) -> _T:
        """Run ``fn(consumer)`` on the consumer thread and wait for its result."""
        await self.start()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._thread_done or self._closed:
                raise EventLogError("the consumer is closed")
            self._commands.put(_Command(fn, future))
        result: _T = await asyncio.wrap_future(future)
        return result

    def _serve_commands(self, consumer: ck.Consumer, *, block: float = 0.0) -> None:
        """Run queued commands (consumer thread); wait up to ``block`` for the first."""
        try:
            item = self._commands.get(timeout=block) if block else self._commands.get_nowait()
            while True:
                if item is not None:
                    item.run(consumer)
                item = self._commands.get_nowait()
        except queue.Empty:
            return

    # -- the consumer thread --------------------------------------------------------------

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        refresh_due = 0.0
        try:
            while not self._stop.is_set():
                self._serve_commands(consumer)
                if self._deferred is not None:
                    if not self._polled.wait(self._slice):
                        continue
                    self._assign_deferred(consumer)
                with self._lock:
                    epochs = dict(self._seek_epochs)
                    seeks, self._pending_seeks = self._pending_seeks, {}
                self._apply(consumer, seeks)
                try:
                    messages = self._consume_ready(consumer)
                except KafkaException as exc:
                    self._report(exc)
                    continue
                if messages:
                    self._store(messages, epochs)
                self._note_positions(consumer, epochs)
                # The generation may also move without a callback for this member (a
                # rebalance that leaves its partitions alone): keep the cache current, with
                # each batch (its commit is next) and every so often when idle. Every slice
                # cost an idle app about 1.5% of a core (7.5% -> 6.0% in all).
                now = time.monotonic()
                if messages or now >= refresh_due:
                    self._refresh_group_metadata(consumer)
                    refresh_due = now + _IDLE_METADATA_REFRESH
        except Exception as exc:  # a bug here must reach poll(), not vanish
            log.exception("the Kafka consumer thread failed")
            self._set_fatal(EventLogError(f"the Kafka consumer thread failed: {exc!r}"))
        finally:
            self._closing = True
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing the Kafka consumer failed: %s", describe_kafka_error(exc))
            with self._lock:
                self._thread_done = True
            self._fail_commands()

    def _consume_ready(self, consumer: ck.Consumer) -> list[Any]:
        """What is ready, waiting up to one slice for the first message (consumer thread).

        ``consume(n, slice)`` would sit out the whole slice unless ``n`` messages arrive,
        delaying every record and every queued command by up to a slice. Waiting for one
        and then taking what else is ready returns at once when something is there, while
        an idle consumer still sleeps inside librdkafka.
        """
        first = consumer.consume(1, self._slice)
        if not first:
            return first
        return first + consumer.consume(_CONSUME_BATCH - 1, 0)

    def _group_metadata_now(self, consumer: ck.Consumer) -> Any:
        """librdkafka's current group metadata (consumer thread); None without a group."""
        if self._group_id is None:
            return None
        try:
            return consumer.consumer_group_metadata()
        except (KafkaException, RuntimeError) as exc:  # closing: the cached one stays
            log.debug("no group metadata: %s", describe_kafka_error(exc))
            return None

    def _refresh_group_metadata(self, consumer: ck.Consumer) -> None:
        metadata = self._group_metadata_now(consumer)
        if metadata is not None:
            with self._lock:
                self._group_metadata = metadata

    def _fail_commands(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._commands.get_nowait()
                if item is not None:
                    item.future.set_exception(EventLogError("the consumer is closed"))

    def _apply(self, consumer: ck.Consumer, seeks: dict[TopicPartition, int]) -> None:
        """Apply seeks and pause changes asked for since the last consume()."""
        for tp, offset in seeks.items():
            try:
                if self._group_id is None:
                    # Without a group the partition is assigned again at the offset:
                    # librdkafka's seek() of a partition already fetching delivered from
                    # the new offset only about a second later (a history read took 1-2 s).
                    with contextlib.suppress(KafkaException):
                        consumer.incremental_unassign([_ck_tp(tp)])
                    consumer.incremental_assign([_ck_tp(tp, offset)])
                    # librdkafka keeps a partition's pause across the re-assignment: resume
                    # it, and let the pause bookkeeping below pause it again if it must be.
                    consumer.resume([_ck_tp(tp)])
                    self._rd_paused.discard(tp)
                else:
                    consumer.seek(_ck_tp(tp, offset))
                self._seek_failures.pop(tp, None)
            except KafkaException as exc:
                # Just assigned, its fetch not started yet: try again on the next round.
                failures = self._seek_failures[tp] = self._seek_failures.get(tp, 0) + 1
                with self._lock:
                    retry = tp in self._assigned and failures < 100
                    if retry:
                        self._pending_seeks.setdefault(tp, offset)
                if not retry:
                    self._seek_failures.pop(tp, None)
                    log.warning("seek %s to %d failed: %s", tp, offset, describe_kafka_error(exc))
        with self._lock:
            want = (self._paused | self._throttled) & self._assigned
            dirty, self._pause_dirty = self._pause_dirty & self._assigned, set()
        to_pause = (want - self._rd_paused) | (want & dirty)
        to_resume = ((self._rd_paused - want) | (dirty - want)) & self._assigned
        try:
            if to_pause:
                consumer.pause([_ck_tp(tp) for tp in sorted(to_pause)])
            if to_resume:
                consumer.resume([_ck_tp(tp) for tp in sorted(to_resume)])
        except KafkaException as exc:
            log.info("pause/resume skipped: %s", describe_kafka_error(exc))
        self._rd_paused = want

    def _store(self, messages: list[Any], epochs: dict[TopicPartition, int]) -> None:
        errors: list[KafkaError] = []
        with self._lock:
            # Messages come in runs of one partition: its checks are made once per run (the
            # lock keeps them true for the whole batch), not once per message.
            run: tuple[str, int] | None = None
            #: The run's partition and buffer; None while its records are dropped.
            target: tuple[TopicPartition, deque[Record]] | None = None
            for msg in messages:
                err = msg.error()
                if err is not None:
                    errors.append(err)
                    continue
                where = (msg.topic(), msg.partition())
                if where != run:
                    run, tp, target = where, TopicPartition(*where), None
                    # librdkafka drops what a rebalance or seek made stale inside consume();
                    # this drops what a seek asked for meanwhile made stale. A seek
                    # librdkafka refused so far (the partition's fetch had not started) is
                    # retried; until it lands, what arrives is from the old position.
                    if (
                        tp in self._assigned
                        and epochs.get(tp, 0) == self._seek_epochs.get(tp, 0)
                        and tp not in self._pending_seeks
                    ):
                        self._unsettled.discard(tp)
                        target = (tp, self._buffers.setdefault(tp, deque()))
                if target is None:
                    continue
                buffer = target[1]
                buffer.append(
                    record_at(
                        target[0],
                        msg.offset(),
                        msg.key(),
                        msg.value(),
                        _headers(msg),
                        msg.timestamp()[1],
                    )
                )
                if len(buffer) >= _BUFFER_HIGH:
                    self._throttled.add(target[0])
        for err in errors:
            self._report(KafkaException(err))
        self._notify()

    def _note_positions(self, consumer: ck.Consumer, epochs: dict[TopicPartition, int]) -> None:
        with self._lock:
            assigned = list(self._assigned)
        if not assigned:
            return
        try:
            found = consumer.position([_ck_tp(tp) for tp in assigned])
        except KafkaException as exc:
            self._report(exc)
            return
        moved = False
        with self._lock:
            for item in found:
                tp = TopicPartition(item.topic, item.partition)
                # A seek asked for meanwhile wins over what the fetch had reached.
                settled = tp not in self._unsettled
                if (
                    settled
                    and item.offset >= 0
                    and epochs.get(tp, 0) == self._seek_epochs.get(tp, 0)
                ):
                    if self._fetch_positions.get(tp) != item.offset and not self._buffers.get(tp):
                        # Moved with nothing buffered (past a transaction marker): a reader
                        # waiting to reach an end learns it now, not at its poll's timeout.
                        moved = True
                    self._fetch_positions[tp] = item.offset
        if moved:
            self._position_moved = True
            self._notify()

    def _report(self, exc: KafkaException) -> None:
        err = kafka_error_of(exc)
        if err is not None and (err.fatal() or err.code() in _CONSUMER_FATAL_CODES):
            self._set_fatal(_map_error(exc, "the Kafka consumer failed"))
        else:
            # Transient (broker down, timeouts...): librdkafka retries on its own.
            log.info("Kafka consumer: %s", describe_kafka_error(exc))

    def _set_fatal(self, exc: EventLogError) -> None:
        with self._lock:
            if self._fatal is None:
                self._fatal = exc
        self._notify()
        if self._first_assignment is not None:
            self._call_soon(lambda: _settle(self._first_assignment, exc))

    def _notify(self) -> None:
        self._call_soon(self._wakeup.set)

    def _call_soon(self, fn: Callable[[], object]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(fn)

    def _on_assign(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        tps = {_our_tp(p) for p in partitions}
        # The new generation's, stored with its assignment and before the listener runs, so
        # a transaction from the listener or after it carries this generation (KIP-447).
        metadata = self._group_metadata_now(consumer)
        with self._lock:
            if metadata is not None:
                self._group_metadata = metadata
            # Added, not replaced: also right for an incremental (cooperative) assignor.
            self._assigned |= tps
            self._paused &= self._assigned
            self._pause_dirty |= tps
            for tp in tps:
                self._buffers.pop(tp, None)
                self._fetch_positions.pop(tp, None)
        if tps and self._listener is not None and not self._closing:
            self._call_listener(consumer, self._listener.on_assigned, tps)
        if self._first_assignment is not None:
            self._call_soon(lambda: _settle(self._first_assignment, None))

    def _on_revoke(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        tps = {_our_tp(p) for p in partitions}
        # The listener commits the revoked partitions' work in the generation that owns them.
        metadata = self._group_metadata_now(consumer)
        with self._lock:
            if metadata is not None:
                self._group_metadata = metadata
            # Drop what poll() has not handed out yet: the next owner reads it again.
            for tp in tps:
                self._buffers.pop(tp, None)
                self._fetch_positions.pop(tp, None)
                self._throttled.discard(tp)
        if tps and self._listener is not None and not self._closing:
            # Still assigned while the listener runs, so it can commit their work.
            self._call_listener(consumer, self._listener.on_revoked, tps)
        metadata = self._group_metadata_now(consumer)
        with self._lock:
            if metadata is not None:
                self._group_metadata = metadata
            self._assigned -= tps
            self._paused -= tps
        self._rd_paused -= tps

    def _call_listener(
        self,
        consumer: ck.Consumer,
        method: Callable[[list[TopicPartition]], Coroutine[Any, Any, None]],
        tps: set[TopicPartition],
    ) -> None:
        """Run the listener on the event loop; serve commands until it ends (consumer thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(method(sorted(tps)), loop)
        future.add_done_callback(lambda _: self._commands.put(None))
        while not future.done():
            self._serve_commands(consumer, block=0.2)
            if not future.done() and (loop.is_closed() or not loop.is_running()):
                future.cancel()
                return
        try:
            future.result()
        except BaseException as exc:
            log.warning("rebalance listener %r failed: %r", method, exc)
            with self._lock:
                if self._listener_error is None:
                    self._listener_error = exc
            self._notify()

    # -- the event loop side --------------------------------------------------------------

    async def group_metadata_for(self, offsets: Mapping[TopicPartition, int]) -> Any:
        """The group generation to commit ``offsets`` in a transaction with; FencedError
        unless this member holds every partition of ``offsets`` (see :meth:`check_owned`).

        Read from the cache the consumer thread keeps, not through a command that would
        wait for the running consume(). Ownership and generation are read under one lock,
        as the thread sets them together: partitions held in one generation are never
        committed with the metadata of a later one that moved them elsewhere.
        """
        with self._lock:
            self._check_owned_locked(offsets)
            metadata = self._group_metadata
        if metadata is not None:
            return metadata
        # Only before the first assignment stored one (a consumer used before start()).
        metadata = await self._call(lambda consumer: consumer.consumer_group_metadata())
        self.check_owned(offsets)
        return metadata

    async def poll(self, *, max_records: int, timeout: float) -> list[Record]:
        if self._closed:
            raise EventLogError("poll on a closed consumer")
        await self.start()
        self._polled.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._wakeup.clear()
            batch = self._drain(max_records)
            if batch:
                return batch
            with self._lock:
                moved, self._position_moved = self._position_moved, False
            if moved:
                return batch
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _drain(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        with self._lock:
            if self._fatal is not None:
                raise type(self._fatal)(str(self._fatal)) from self._fatal
            if self._listener_error is not None:
                error, self._listener_error = self._listener_error, None
                raise error
            tps = [tp for tp, buf in self._buffers.items() if buf and tp not in self._paused]
            if not tps:
                return out
            # Start where the last drain stopped, so one busy partition cannot starve others.
            self._next_tp = (self._next_tp + 1) % len(tps)
            for tp in tps[self._next_tp :] + tps[: self._next_tp]:
                buffer = self._buffers[tp]
                while buffer and len(out) < max_records:
                    out.append(buffer.popleft())
                if tp in self._throttled and len(buffer) <= _BUFFER_LOW:
                    self._throttled.discard(tp)
                if len(out) >= max_records:
                    break
        return out

    async def position(self, tp: TopicPartition) -> int | None:
        with self._lock:
            if tp in self._pending_seeks:
                return self._pending_seeks[tp]
            buffer = self._buffers.get(tp)
            if buffer:
                return buffer[0].offset
            return self._fetch_positions.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        with self._lock:
            if tp not in self._assigned:
                raise EventLogError(f"cannot seek {tp}: not assigned to this consumer")
            self._seek_epochs[tp] = self._seek_epochs.get(tp, 0) + 1
            self._buffers.pop(tp, None)
            self._throttled.discard(tp)
            self._pending_seeks[tp] = offset
            self._fetch_positions[tp] = offset
            self._unsettled.add(tp)

    def pause(self, tps: Sequence[TopicPartition], paused: bool) -> None:
        with self._lock:
            if paused:
                self._paused.update(tp for tp in tps if tp in self._assigned)
            else:
                self._paused.difference_update(tps)
        if not paused:
            # A poll waiting now may have buffered records of ``tps`` to return: without this
            # it would sleep until new records or its timeout (a drained lane idling).
            self._wakeup.set()

    async def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        if self._group_id is None or not tps:
            return {}
        parts = [_ck_tp(tp) for tp in tps]
        try:
            found = await self._call(
                lambda consumer: consumer.committed(parts, timeout=self._timeout)
            )
        except KafkaException as exc:
            raise _map_error(exc, f"cannot read the offsets of group {self._group_id!r}") from exc
        result: dict[TopicPartition, int] = {}
        for part in found:
            if part.error is not None:
                raise _map_error(KafkaException(part.error), f"cannot read {_our_tp(part)}")
            if part.offset >= 0:  # OFFSET_INVALID: nothing committed
                result[_our_tp(part)] = part.offset
        return result

    def check_owned(self, offsets: Mapping[TopicPartition, int]) -> None:
        """FencedError unless this member still holds every partition of ``offsets``.

        The broker only checks the generation; this also catches a member that rejoined
        the new generation without the partition (as aiokafka does for plain commits).
        """
        with self._lock:
            self._check_owned_locked(offsets)

    def _check_owned_locked(self, offsets: Mapping[TopicPartition, int]) -> None:
        if self._group_id is None:
            raise EventLogError("a consumer without group_id has no offsets to commit")
        lost = sorted(set(offsets) - self._assigned)
        if lost:
            raise FencedError(
                f"partitions {lost} are no longer assigned to this member of group "
                f"{self._group_id!r}; their work is redone by the new owner"
            )

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        self.check_owned(offsets)
        parts = [_ck_tp(tp, offset) for tp, offset in offsets.items()]
        try:
            result = await self._call(
                lambda consumer: consumer.commit(offsets=parts, asynchronous=False)
            )
        except KafkaException as exc:
            raise _map_error(exc, f"commit to group {self._group_id!r} failed") from exc
        for part in result:
            if part.error is not None:
                raise _map_error(KafkaException(part.error), f"commit of {_our_tp(part)} failed")


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


class _Command:
    """A call for the consumer thread, with the future its caller awaits."""

    def __init__(self, fn: Callable[[ck.Consumer], Any], future: concurrent.futures.Future[Any]):
        self.fn = fn
        self.future = future

    def run(self, consumer: ck.Consumer) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn(consumer))
        except BaseException as exc:
            self.future.set_exception(exc)


def _settle(future: asyncio.Future[None] | None, error: BaseException | None) -> None:
    """Resolve ``future`` unless already done (event loop)."""
    if future is None or future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _header_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else bytes(value)


def _headers(msg: Any) -> Headers:
    raw = msg.headers()
    if not raw:
        return ()
    items = raw.items() if isinstance(raw, dict) else raw
    for _, value in items:
        if type(value) is not bytes:
            return tuple((key, _header_bytes(value)) for key, value in items)
    # Every value is bytes (ours always are): the client's (str, bytes) pairs as they are.
    return tuple(items)
