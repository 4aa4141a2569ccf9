"""The readers of topics outside the stages: bounded reads and the follow loop."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.eventlog.reading import follow, read_records
from qtasks_stream.records import OutRecord, Record, TopicPartition, TopicSpec

TOPIC = "reading.t"


async def _log() -> InMemoryEventLog:
    log = InMemoryEventLog()
    await log.create_topics([TopicSpec(TOPIC, partitions=3)])
    producer = log.producer()
    await producer.send(
        [OutRecord(TOPIC, f"k{i}".encode(), f"v{i}".encode(), partition=i % 3) for i in range(9)]
    )
    return log


async def test_a_read_of_some_partitions_reads_those_alone() -> None:
    log = await _log()
    read: list[Record] = []

    async def keep(records: list[Record]) -> None:
        read.extend(records)

    ends, count = await read_records(log, TOPIC, 3, keep, only=[1])
    assert ends == {TopicPartition(TOPIC, 1): 3}
    assert count == 3
    assert [r.value for r in read] == [b"v1", b"v4", b"v7"]


async def test_a_read_since_a_time_starts_at_the_first_record_stamped_then() -> None:
    log = await _log()
    read: list[Record] = []

    async def keep(records: list[Record]) -> None:
        read.extend(records)

    future_ms = int(time.time() * 1000) + 3_600_000
    ends, count = await read_records(log, TOPIC, 3, keep, since_ms=future_ms)
    assert (count, read) == (0, [])
    assert ends == {TopicPartition(TOPIC, p): 3 for p in range(3)}
    _, count = await read_records(log, TOPIC, 3, keep, only=[0, 2], since_ms=0)
    assert count == 6
    assert sorted(r.value or b"" for r in read) == [b"v0", b"v2", b"v3", b"v5", b"v6", b"v8"]


async def test_follow_backs_off_on_failed_polls_warns_once_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = await _log()
    consumer = log.consumer([TOPIC], group_id=None)
    await consumer.start()
    real_poll = consumer.poll
    failures = 3

    async def flaky_poll(*, max_records: int, timeout: float) -> list[Record]:
        nonlocal failures
        if failures:
            failures -= 1
            raise EventLogError("the broker is restarting")
        return await real_poll(max_records=max_records, timeout=timeout)

    consumer.poll = flaky_poll  # type: ignore[method-assign]
    got: list[Record] = []
    all_read = asyncio.Event()

    async def keep(records: list[Record]) -> None:
        got.extend(records)
        if len(got) == 9:
            all_read.set()

    caplog.set_level(logging.INFO, logger="qtasks_stream.reading")
    task = asyncio.create_task(
        follow(consumer, keep, what="the test tail", timeout=0.05, backoff=0.01, max_backoff=0.02)
    )
    try:
        async with asyncio.timeout(10):
            await all_read.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.close()
    assert sorted(r.value or b"" for r in got) == [f"v{i}".encode() for i in range(9)]
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            logging.WARNING,
            "the test tail: poll failed (the broker is restarting); "
            "retrying with back-off up to 0.02s",
        ),
        (logging.INFO, "the test tail: polls work again after 3 failed"),
    ]
