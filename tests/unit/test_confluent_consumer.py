"""The confluent consumer's event-loop side, without a broker: what a poll does with its
buffers and with a cancel."""

from __future__ import annotations

import asyncio

import pytest

from qtasks_stream.eventlog.kafka_confluent_consumer import ConfluentConsumer


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
