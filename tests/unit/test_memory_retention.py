"""The embedded log honours ``retention.ms`` as Kafka does: old records go, the log start
offset advances, and an embedded app's log stays within its retention."""

from __future__ import annotations

from collections.abc import Callable

from qtasks_stream import QueueTasks
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.records import OutRecord, TopicPartition, TopicSpec


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def spec(name: str, **config: str) -> TopicSpec:
    return TopicSpec(name, partitions=1, config=config)


async def test_records_older_than_the_retention_are_deleted_from_the_start() -> None:
    clock = Clock()
    log = InMemoryEventLog(clock=clock, retention_check=0.0)
    await log.create_topics(
        [
            spec("aged", **{"cleanup.policy": "delete", "retention.ms": "1000"}),
            spec("forever", **{"cleanup.policy": "delete", "retention.ms": "-1"}),
            spec("compacted", **{"cleanup.policy": "compact"}),
        ]
    )
    producer = log.producer()
    topics = ("aged", "forever", "compacted")
    await producer.send([OutRecord(t, b"k", b"old") for t in topics for _ in range(3)])
    clock.now += 0.5
    await producer.send([OutRecord(t, b"k", b"young") for t in topics for _ in range(2)])
    clock.now += 0.7  # the first three are 1.2 s old, the last two 0.7 s
    await producer.send([OutRecord(t, b"k", b"new") for t in topics])

    assert log.start_offsets("aged") == [3]
    assert [r.offset for r in log.records("aged")] == [3, 4, 5]
    assert log.start_offsets("forever") == log.start_offsets("compacted") == [0]
    assert len(log.records("forever")) == len(log.records("compacted")) == 6

    # A reader from the beginning starts at the log start offset.
    consumer = log.consumer(["aged"], group_id=None)
    tp = TopicPartition("aged", 0)
    assert [r.value for r in await consumer.poll(max_records=10, timeout=0)] == [
        b"young",
        b"young",
        b"new",
    ]
    assert (await consumer.end_offsets([tp]))[tp] == 6
    await consumer.close()


async def test_an_embedded_app_keeps_only_what_its_retention_covers() -> None:
    """The log of a long-running embedded app stays bounded: after the retention, the
    records of ended tasks are gone from every topic (issue 12.11: 54 -> 174 MB RSS)."""
    clock = Clock()
    log = InMemoryEventLog(clock=clock, retention_check=0.0)
    app = QueueTasks("ret", event_log=log, retention_ms=60_000)

    @app.task(name="noop")
    async def noop(i: int) -> int:
        return i

    async with app:
        for i in range(20):
            done = await app.add_task("noop", i, timeout=10)
            assert done is not None and done.status == "success"
        topology = app.topology
        before = len(log.records(topology.events))
        assert before >= 20 * 4  # Submitted, Scheduled, Started, Succeeded at least
        clock.now += 61.0
        done = await app.add_task("noop", 99, timeout=10)
        assert done is not None and done.status == "success"
        kept: Callable[[str], int] = lambda topic: len(log.records(topic))  # noqa: E731
        assert kept(topology.events) < 10  # the last task's events only
        assert sum(kept(lane) for lane in topology.lane_topics) == 1
        assert sum(log.start_offsets(topology.events)) >= before
