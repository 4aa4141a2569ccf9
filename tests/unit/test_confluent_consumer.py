"""The confluent consumer's event-loop side, without a broker: what a poll does with its
buffers and with a cancel, and which pauses reach librdkafka."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pytest

from qtasks_stream.eventlog.kafka_confluent_consumer import ConfluentConsumer
from qtasks_stream.records import TopicPartition, record_at


async def test_a_cancelled_poll_ends_even_when_a_wakeup_meets_the_cancel() -> None:
    # The consumer thread wakes a poll when records arrive; a close() that cancels the poll at
    # that moment must still end it (asyncio.wait_for on 3.11 swallowed such a cancel, and a
    # client's close() then waited forever on its result listener).
    consumer = ConfluentConsumer({}, ("t",), None, None, "earliest", timeout=1.0, start_timeout=1.0)
    consumer._consumer = object()  # type: ignore[assignment]  # "started": poll reads buffers
    poll = asyncio.create_task(consumer.poll(max_records=10, timeout=5.0))
    await asyncio.sleep(0.01)
    consumer._wakeup.set()
    poll.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(2.0):
            await poll


def _started() -> ConfluentConsumer:
    consumer = ConfluentConsumer({}, ("t",), None, None, "earliest", timeout=1.0, start_timeout=1.0)
    consumer._consumer = object()  # type: ignore[assignment]  # "started": poll reads buffers
    return consumer


def _store_one(consumer: ConfluentConsumer, offset: int) -> None:
    """What the consumer thread does with a fetched record: buffer it, then notify."""
    tp = TopicPartition("t", 0)
    with consumer._lock:
        consumer._buffers.setdefault(tp, deque()).append(record_at(tp, offset, None, b"v"))
    consumer._notify()


async def test_the_thread_wakes_the_loop_only_for_a_waiting_poll() -> None:
    # Under load every consume round woke the event loop through its self-pipe (7% of a
    # worker process's CPU), though the next poll() looks at the buffers anyway.
    consumer = _started()
    wakeups: list[object] = []
    consumer._call_soon = wakeups.append  # type: ignore[method-assign]
    _store_one(consumer, 0)
    _store_one(consumer, 1)
    assert wakeups == []  # nobody polls: nothing to wake
    assert [r.offset for r in await consumer.poll(max_records=10, timeout=1.0)] == [0, 1]
    assert wakeups == []


async def test_a_waiting_poll_is_woken_by_what_the_thread_stores() -> None:
    consumer = _started()
    poll = asyncio.create_task(consumer.poll(max_records=10, timeout=60.0))
    await asyncio.sleep(0.01)  # the poll found nothing and waits
    loop = asyncio.get_running_loop()
    consumer._loop = loop
    await loop.run_in_executor(None, _store_one, consumer, 7)
    async with asyncio.timeout(10.0):  # a lost wakeup would sleep the poll's 60 s
        got = await poll
    assert [r.offset for r in got] == [7]


class _Librdkafka:
    """What the consumer thread asks librdkafka to pause and resume."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, int]]]] = []

    def pause(self, parts: list[Any]) -> None:
        self.calls.append(("pause", [(p.topic, p.partition) for p in parts]))

    def resume(self, parts: list[Any]) -> None:
        self.calls.append(("resume", [(p.topic, p.partition) for p in parts]))


def _consumer(group_id: str | None, tp: TopicPartition) -> ConfluentConsumer:
    consumer = ConfluentConsumer(
        {}, (tp.topic,), group_id, None, "earliest", timeout=1.0, start_timeout=1.0
    )
    consumer._consumer = object()  # type: ignore[assignment]  # "started": poll reads buffers
    consumer._assigned = {tp}
    return consumer


async def test_a_group_member_pauses_in_its_buffer_and_keeps_fetching() -> None:
    # Its fetch waits long at the broker (an idle worker's lanes wake less): a partition
    # paused in librdkafka would be fetched again only after the fetch in flight, so the
    # pause holds records back in the buffer and librdkafka goes on fetching them.
    tp = TopicPartition("lane", 0)
    consumer = _consumer("g", tp)
    rdkafka = _Librdkafka()
    consumer.pause([tp], True)
    consumer._apply(rdkafka, {})  # type: ignore[arg-type]
    assert rdkafka.calls == []
    consumer._buffers[tp] = deque([record_at(tp, 7, b"k", b"v")])
    assert await consumer.poll(max_records=10, timeout=0) == []
    consumer.pause([tp], False)
    assert [r.offset for r in await consumer.poll(max_records=10, timeout=0)] == [7]
    # A full buffer still stops the fetch, and a drained one starts it again.
    consumer._throttled.add(tp)
    consumer._apply(rdkafka, {})  # type: ignore[arg-type]
    consumer._throttled.discard(tp)
    consumer._apply(rdkafka, {})  # type: ignore[arg-type]
    assert rdkafka.calls == [("pause", [("lane", 0)]), ("resume", [("lane", 0)])]


def test_a_reader_without_a_group_pauses_in_librdkafka() -> None:
    # Readers pause the partitions they do not read or have read to their end: those must
    # not be fetched at all.
    tp = TopicPartition("events", 3)
    consumer = _consumer(None, tp)
    rdkafka = _Librdkafka()
    consumer.pause([tp], True)
    consumer._apply(rdkafka, {})  # type: ignore[arg-type]
    consumer.pause([tp], False)
    consumer._apply(rdkafka, {})  # type: ignore[arg-type]
    assert rdkafka.calls == [("pause", [("events", 3)]), ("resume", [("events", 3)])]
