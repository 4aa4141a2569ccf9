"""The confluent consumer's event-loop side, without a broker: what a poll does with its
buffers and with a cancel."""

from __future__ import annotations

import asyncio
from collections import deque

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
