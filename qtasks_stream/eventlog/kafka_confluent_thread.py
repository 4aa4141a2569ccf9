"""The thread of a confluent-kafka consumer, and the state it shares with the event loop.

One thread loops ``consume()`` and buffers what it gets; each round waits at most a short
slice for the first message and takes what else is ready. Every other call on the consumer
runs on this thread too, between two ``consume()`` calls, as a command (see
:mod:`.kafka_confluent`). Rebalance callbacks fire inside ``consume()``: they hand the
listener's coroutine to the event loop and serve commands until it ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import confluent_kafka as ck
from confluent_kafka import KafkaError, KafkaException

from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.base import RebalanceListener, StartFrom
from qtasks_stream.eventlog.kafka_admin import describe_kafka_error, kafka_error_of
from qtasks_stream.eventlog.kafka_confluent_convert import ck_tp, headers_of, map_error, our_tp
from qtasks_stream.records import Record, TopicPartition, record_at

__all__ = ["BUFFER_LOW", "Command", "ConsumerThread"]

log = logging.getLogger(__name__)

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
#: After this long (seconds) with no record, command, seek or pause change, a consumer is
#: idle and waits ``_IDLE_CONSUME_SLICE`` per consume() instead: an idle process's
#: consumers woke 20-100 times a second each (an idle worker process used 3.7% of a core,
#: a client 1.7%). The first record ends idleness at once (consume() returns when one
#: arrives); a command or close() waits at most one idle slice. 1 s, not 0.5 or 0.25:
#: each halving of the wakeups of the seven or so consumers of a worker process cost a close
#: up to 0.25 or 0.5 s later (an empty consume() costs about 80 us of CPU: at 0.5 s, the
#: consumer threads were 0.20% of an idle worker's 0.67% of a core).
_IDLE_AFTER = 1.0
_IDLE_CONSUME_SLICE = 1.0
_CONSUME_BATCH = 500
#: How often (seconds) a group consumer re-reads its group metadata (generation) besides
#: at each assignment change, which the rebalance callbacks store (the default assignor
#: revokes everything on each rebalance); this only catches one that moves without them.
#: ``consumer_group_metadata()`` is a round trip to librdkafka's main thread answered while
#: the caller holds the GIL: read with every batch it was 28% of a worker process's GIL
#: time one task at a time, every other thread stalled meanwhile; once a second it made an
#: idle group consumer's thread wake 4 times a second instead of 2.
_METADATA_REFRESH = 5.0
#: Past this many buffered records a partition stops fetching until poll() drains it.
_BUFFER_HIGH = 2_000
BUFFER_LOW = _BUFFER_HIGH // 2


class ConsumerThread:
    """A consumer's thread (``_run``) and the state it shares with the event loop."""

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
        self._commands: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
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
        #: poll() found nothing and waits: the next :meth:`_notify` wakes it. Otherwise the
        #: next poll() looks at the buffers anyway, so the thread does not wake the loop:
        #: under load a wakeup per consume round was 7% of a worker process's CPU.
        self._waiting = False
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
        #: The partitions whose positions are asked for after each round, and the query.
        self._position_tps: list[TopicPartition] | None = None
        self._position_query: list[ck.TopicPartition] = []
        self._seek_failures: dict[TopicPartition, int] = {}

    def _assign_deferred(self, consumer: ck.Consumer) -> None:
        """The first assignment of a consumer without a group, at the offsets seeked to
        since start() and with the partitions paused meanwhile (consumer thread)."""
        with self._lock:
            deferred, self._deferred = self._deferred or {}, None
            starts = {**deferred, **self._pending_seeks}
            self._pending_seeks = {}
            paused = (self._held_back() | self._throttled) & self._assigned
        consumer.assign([ck_tp(tp, offset) for tp, offset in starts.items()])
        if paused:
            consumer.pause([ck_tp(tp) for tp in sorted(paused)])
        self._rd_paused = paused

    def _held_back(self) -> set[TopicPartition]:
        """The partitions the caller paused that librdkafka must stop fetching (under
        ``_lock``).

        A group member's pause only holds its records back in the buffer (``poll()`` skips
        them), and librdkafka keeps fetching until the buffer is full: a partition resumed
        in librdkafka is fetched only once the fetch in flight returns, so its pauses kept
        the worker's lanes on a 50 ms broker wait, the main wake-up of an idle worker
        process (a lane resumed now finds its records already buffered). A consumer
        without a group pauses in librdkafka: readers pause the partitions they do not
        read, or have read to their end, and must not fetch them.
        """
        return set() if self._group_id is not None else self._paused

    def _serve_commands(self, consumer: ck.Consumer, *, block: float = 0.0) -> bool:
        """Run queued commands (consumer thread); wait up to ``block`` for the first.
        Returns whether there was any."""
        served = False
        try:
            item = self._commands.get(timeout=block) if block else self._commands.get_nowait()
            while True:
                served = True
                if item is not None:
                    item.run(consumer)
                item = self._commands.get_nowait()
        except queue.Empty:
            return served

    # -- the consumer thread --------------------------------------------------------------

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        refresh_due = 0.0
        active = time.monotonic()  # the last round that had something to do
        try:
            while not self._stop.is_set():
                served = self._serve_commands(consumer)
                if self._deferred is not None:
                    if not self._polled.wait(self._slice):
                        continue
                    self._assign_deferred(consumer)
                with self._lock:
                    epochs = dict(self._seek_epochs)
                    seeks, self._pending_seeks = self._pending_seeks, {}
                changed = self._apply(consumer, seeks)
                now = time.monotonic()
                if served or changed:
                    active = now
                slice_ = self._slice if now - active < _IDLE_AFTER else _IDLE_CONSUME_SLICE
                try:
                    messages = self._consume_ready(consumer, slice_)
                except KafkaException as exc:
                    self._report(exc)
                    continue
                if messages:
                    self._store(messages, epochs)
                self._note_positions(consumer, epochs)
                # The rebalance callbacks store each new generation's metadata. Should the
                # generation move without one for this member, a transaction with the old
                # one is refused as a whole (fenced: nothing visible, the runner rejoins), so
                # a re-read every so often bounds that, and none runs per batch.
                now = time.monotonic()
                if messages:
                    active = now
                if now >= refresh_due:
                    self._refresh_group_metadata(consumer)
                    refresh_due = now + _METADATA_REFRESH
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

    def _consume_ready(self, consumer: ck.Consumer, slice_: float) -> list[Any]:
        """What is ready, waiting up to ``slice_`` for the first message (consumer thread).

        ``consume(n, slice)`` would sit out the whole slice unless ``n`` messages arrive,
        delaying every record and every queued command by up to a slice. Waiting for one
        and then taking what else is ready returns at once when something is there, while
        an idle consumer still sleeps inside librdkafka.
        """
        first = consumer.consume(1, slice_)
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

    def _apply(self, consumer: ck.Consumer, seeks: dict[TopicPartition, int]) -> bool:
        """Apply seeks and pause changes asked for since the last consume(); returns
        whether there was any."""
        for tp, offset in seeks.items():
            try:
                if self._group_id is None:
                    # Without a group the partition is assigned again at the offset:
                    # librdkafka's seek() of a partition already fetching delivered from
                    # the new offset only about a second later (a history read took 1-2 s).
                    with contextlib.suppress(KafkaException):
                        consumer.incremental_unassign([ck_tp(tp)])
                    consumer.incremental_assign([ck_tp(tp, offset)])
                    # librdkafka keeps a partition's pause across the re-assignment: resume
                    # it, and let the pause bookkeeping below pause it again if it must be.
                    consumer.resume([ck_tp(tp)])
                    self._rd_paused.discard(tp)
                else:
                    consumer.seek(ck_tp(tp, offset))
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
            want = (self._held_back() | self._throttled) & self._assigned
            dirty, self._pause_dirty = self._pause_dirty & self._assigned, set()
        to_pause = (want - self._rd_paused) | (want & dirty)
        to_resume = ((self._rd_paused - want) | (dirty - want)) & self._assigned
        try:
            if to_pause:
                consumer.pause([ck_tp(tp) for tp in sorted(to_pause)])
            if to_resume:
                consumer.resume([ck_tp(tp) for tp in sorted(to_resume)])
        except KafkaException as exc:
            log.info("pause/resume skipped: %s", describe_kafka_error(exc))
        self._rd_paused = want
        return bool(seeks or to_pause or to_resume)

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
                        headers_of(msg),
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
            # The query is built again only when the assignment changed (every round built
            # one librdkafka partition per assigned partition); answers come in its order.
            if self._position_tps is None or set(self._position_tps) != self._assigned:
                self._position_tps = list(self._assigned)
                self._position_query = [ck_tp(tp) for tp in self._position_tps]
            assigned, query = self._position_tps, self._position_query
        if not assigned:
            return
        try:
            found = consumer.position(query)
        except KafkaException as exc:
            self._report(exc)
            return
        moved = False
        with self._lock:
            for tp, item in zip(assigned, found, strict=False):
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
            self._set_fatal(
                map_error(
                    exc,
                    "the Kafka consumer failed",
                    conf=self._conf,
                    operation="READ",
                    names={"topic": ", ".join(self._topics), "group": self._group_id or ""},
                )
            )
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
        """Wake a waiting poll() (never called holding ``_lock``)."""
        with self._lock:
            if not self._waiting:
                return
            self._waiting = False
        self._call_soon(self._wakeup.set)

    def _call_soon(self, fn: Callable[[], object]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(fn)

    def _on_assign(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        tps = {our_tp(p) for p in partitions}
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
        tps = {our_tp(p) for p in partitions}
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


class Command:
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
