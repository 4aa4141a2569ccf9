"""The confluent-kafka consumer: the event loop's side of a :class:`ConsumerThread`.

Its calls only read and change the state the thread serves (buffers, seeks, pauses) or
hand the thread a command; none blocks the event loop on librdkafka.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import confluent_kafka as ck
from confluent_kafka import KafkaException

from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.base import Consumer
from qtasks_stream.eventlog.kafka_admin import ListedOffsets, retry_retriable
from qtasks_stream.eventlog.kafka_common import check_owned
from qtasks_stream.eventlog.kafka_confluent_convert import ck_tp, map_error, our_tp
from qtasks_stream.eventlog.kafka_confluent_thread import BUFFER_LOW, Command, ConsumerThread
from qtasks_stream.records import Record, TopicPartition

__all__ = ["ConfluentConsumer"]

_T = TypeVar("_T")


class ConfluentConsumer(ConsumerThread, ListedOffsets, Consumer):
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
                raise map_error(exc, "cannot create the Kafka consumer") from exc
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
                    raise map_error(exc, f"cannot start a consumer of {self._topics}") from exc
                raise
            self._consumer = consumer
            self._thread = threading.Thread(
                target=self._run, name=f"qtasks-rdkafka-consumer-{self._topics}", daemon=True
            )
            self._thread.start()
            if self._first_assignment is not None:
                # Like aiokafka's start(): a started member already owns its partitions.
                try:
                    async with asyncio.timeout(self._start_timeout):
                        await asyncio.shield(self._first_assignment)
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
                assignment.append(ck_tp(tp, high))
            else:
                assignment.append(ck_tp(tp, ck.OFFSET_BEGINNING))
        with self._lock:
            self._assigned = set(tps)
            # Assigned by the consumer thread at the first poll, with the seeks and pauses
            # asked for until then: librdkafka's seek of a partition already fetching
            # delivered from the new offset only about a second later.
            self._deferred = {our_tp(part): part.offset for part in assignment}

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
            self._commands.put(Command(fn, future))
        result: _T = await asyncio.wrap_future(future)
        return result

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
            batch, moved = self._drain(max_records)
            if batch or moved:
                return batch
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that meets a
            # wakeup, and the poll loop (and the close() that cancelled it) then ran forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()

    def _drain(self, max_records: int) -> tuple[list[Record], bool]:
        """Up to ``max_records`` buffered records, and whether a position moved with none.
        Finding neither, it marks poll() as waiting, in the same locked look, so the
        consumer thread wakes it for what it stores next (and only then)."""
        out: list[Record] = []
        with self._lock:
            if self._fatal is not None:
                raise type(self._fatal)(str(self._fatal)) from self._fatal
            if self._listener_error is not None:
                error, self._listener_error = self._listener_error, None
                raise error
            tps = [tp for tp, buf in self._buffers.items() if buf and tp not in self._paused]
            if not tps:
                moved, self._position_moved = self._position_moved, False
                self._waiting = not moved
                return out, moved
            # Start where the last drain stopped, so one busy partition cannot starve others.
            self._next_tp = (self._next_tp + 1) % len(tps)
            for tp in tps[self._next_tp :] + tps[: self._next_tp]:
                buffer = self._buffers[tp]
                while buffer and len(out) < max_records:
                    out.append(buffer.popleft())
                if tp in self._throttled and len(buffer) <= BUFFER_LOW:
                    self._throttled.discard(tp)
                if len(out) >= max_records:
                    break
            self._waiting = False
        return out, False

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
        parts = [ck_tp(tp) for tp in tps]
        try:
            found = await self._call(
                lambda consumer: consumer.committed(parts, timeout=self._timeout)
            )
        except KafkaException as exc:
            raise map_error(exc, f"cannot read the offsets of group {self._group_id!r}") from exc
        result: dict[TopicPartition, int] = {}
        for part in found:
            if part.error is not None:
                raise map_error(KafkaException(part.error), f"cannot read {our_tp(part)}")
            if part.offset >= 0:  # OFFSET_INVALID: nothing committed
                result[our_tp(part)] = part.offset
        return result

    def check_owned(self, offsets: Mapping[TopicPartition, int]) -> None:
        """FencedError unless this member still holds every partition of ``offsets``.

        The broker only checks the generation; this also catches a member that rejoined
        the new generation without the partition (as aiokafka does for plain commits).
        """
        with self._lock:
            self._check_owned_locked(offsets)

    def _check_owned_locked(self, offsets: Mapping[TopicPartition, int]) -> None:
        check_owned(self._group_id, self._assigned, offsets)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        self.check_owned(offsets)
        parts = [ck_tp(tp, offset) for tp, offset in offsets.items()]
        try:
            result = await self._call(
                lambda consumer: consumer.commit(offsets=parts, asynchronous=False)
            )
        except KafkaException as exc:
            raise map_error(exc, f"commit to group {self._group_id!r} failed") from exc
        for part in result:
            if part.error is not None:
                raise map_error(KafkaException(part.error), f"commit of {our_tp(part)} failed")


def _high_watermark(consumer: ck.Consumer, tp: TopicPartition, timeout: float) -> int:
    """Where the next record of ``tp`` will go (blocking)."""
    _low, high = consumer.get_watermark_offsets(ck_tp(tp), timeout=timeout)
    return high
