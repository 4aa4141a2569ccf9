"""One body, every event log: in-memory, aiokafka and confluent-kafka."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from qtasks_stream.errors import FencedError, TopicConfigError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.records import OutRecord, Record, TopicPartition, TopicSpec
from tests.eventlogs import EVENT_LOG_KINDS, make_event_log

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=EVENT_LOG_KINDS)
async def log(request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    event_log = make_event_log(request)
    yield event_log
    await event_log.close()


def _topic() -> str:
    return f"contract-{uuid.uuid4().hex[:10]}"


async def _drain(consumer: object, want: int, *, limit: float = 20.0) -> list[Record]:
    from qtasks_stream.eventlog.base import Consumer

    assert isinstance(consumer, Consumer)
    got: list[Record] = []
    deadline = asyncio.get_running_loop().time() + limit
    while len(got) < want and asyncio.get_running_loop().time() < deadline:
        got.extend(await consumer.poll(max_records=500, timeout=0.5))
    return got


class _Recorder:
    def __init__(self) -> None:
        self.assigned: list[TopicPartition] = []
        self.revoked: list[TopicPartition] = []

    async def on_assigned(self, partitions: Sequence[TopicPartition]) -> None:
        self.assigned.extend(partitions)

    async def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        self.revoked.extend(partitions)


async def test_keys_pick_partitions_and_order_holds_per_partition(log: EventLog) -> None:
    topic = _topic()
    await log.create_topics([TopicSpec(topic, partitions=3)])
    producer = log.producer()
    await producer.start()
    keys = [f"k{i % 7}".encode() for i in range(70)]
    await producer.send(
        [OutRecord(topic, k, str(i).encode(), (("h", b"v"),)) for i, k in enumerate(keys)]
    )
    consumer = log.consumer([topic], group_id=None)
    await consumer.start()
    got = await _drain(consumer, 70)
    assert len(got) == 70
    partition_of: dict[bytes | None, int] = {}
    for rec in got:
        # One key, one partition: this is what keeps one task's events in order.
        assert partition_of.setdefault(rec.key, rec.partition) == rec.partition
        assert rec.headers == (("h", b"v"),)
    assert len(set(partition_of.values())) > 1
    for part in range(3):
        values = [int(r.value or b"") for r in got if r.partition == part]
        assert values == sorted(values)
        offsets = [r.offset for r in got if r.partition == part]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    await consumer.close()
    await producer.close()


async def test_same_key_same_partition_number_as_kafka_default_partitioner(log: EventLog) -> None:
    # murmur2, like Kafka's Java clients: a key's partition does not depend on the client.
    from qtasks_stream.eventlog.partitioning import murmur2_partition

    topic = _topic()
    await log.create_topics([TopicSpec(topic, partitions=4)])
    producer = log.producer()
    await producer.start()
    keys = [f"task-{i}".encode() for i in range(20)]
    await producer.send([OutRecord(topic, k, b"x") for k in keys])
    consumer = log.consumer([topic], group_id=None)
    await consumer.start()
    got = await _drain(consumer, 20)
    assert {r.key: r.partition for r in got} == {k: murmur2_partition(k, 4) for k in keys}
    await consumer.close()
    await producer.close()


async def test_committed_offsets_survive_a_consumer_restart(log: EventLog) -> None:
    topic, group = _topic(), f"g-{uuid.uuid4().hex[:8]}"
    await log.create_topics([TopicSpec(topic, partitions=1)])
    producer = log.producer()
    await producer.start()
    await producer.send([OutRecord(topic, b"k", str(i).encode()) for i in range(10)])
    first = log.consumer([topic], group_id=group)
    await first.start()
    got = await _drain(first, 10)
    assert len(got) == 10
    await first.commit({TopicPartition(topic, 0): 6})
    await first.close()
    second = log.consumer([topic], group_id=group)
    await second.start()
    again = await _drain(second, 4)
    assert [r.offset for r in again] == [6, 7, 8, 9]
    await second.close()
    await producer.close()


async def test_group_members_split_partitions_and_uncommitted_work_is_redelivered(
    log: EventLog,
) -> None:
    topic, group = _topic(), f"g-{uuid.uuid4().hex[:8]}"
    await log.create_topics([TopicSpec(topic, partitions=4)])
    producer = log.producer()
    await producer.start()
    await producer.send([OutRecord(topic, f"k{i}".encode(), b"v") for i in range(40)])
    rec_a, rec_b = _Recorder(), _Recorder()
    a = log.consumer([topic], group_id=group, listener=rec_a)
    b = log.consumer([topic], group_id=group, listener=rec_b)
    await a.start()
    await b.start()
    seen_a: list[Record] = []
    seen_b: list[Record] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while len(seen_a) + len(seen_b) < 40 and loop.time() < deadline:
        seen_a += await a.poll(max_records=100, timeout=0.3)
        seen_b += await b.poll(max_records=100, timeout=0.3)
    assert len(seen_a) + len(seen_b) == 40
    parts_a = {r.partition for r in seen_a}
    parts_b = {r.partition for r in seen_b}
    assert parts_a and parts_b and not parts_a & parts_b
    # a commits nothing and dies: its partitions come back, from the start, to b.
    await a.close()
    redelivered: list[Record] = []
    deadline = loop.time() + 60
    while len(redelivered) < len(seen_a) and loop.time() < deadline:
        redelivered += [
            r for r in await b.poll(max_records=100, timeout=0.3) if r.partition in parts_a
        ]
    assert sorted((r.partition, r.offset) for r in redelivered) == sorted(
        (r.partition, r.offset) for r in seen_a
    )
    assert set(rec_b.assigned) >= {TopicPartition(topic, p) for p in parts_a}
    await b.close()
    await producer.close()


async def test_transaction_commits_records_and_offsets_together(log: EventLog) -> None:
    src, dst, group = _topic(), _topic(), f"g-{uuid.uuid4().hex[:8]}"
    await log.create_topics([TopicSpec(src, partitions=1), TopicSpec(dst, partitions=1)])
    plain = log.producer()
    await plain.start()
    await plain.send([OutRecord(src, b"k", str(i).encode()) for i in range(5)])
    consumer = log.consumer([src], group_id=group)
    await consumer.start()
    got = await _drain(consumer, 5)
    txn = log.producer(transactional_id=f"txn-{uuid.uuid4().hex[:8]}")
    await txn.start()
    await txn.commit_transaction(
        [OutRecord(dst, r.key, r.value) for r in got], {TopicPartition(src, 0): 5}, consumer
    )
    await consumer.close()
    reader = log.consumer([dst], group_id=None)
    await reader.start()
    assert [r.value for r in await _drain(reader, 5)] == [str(i).encode() for i in range(5)]
    resumed = log.consumer([src], group_id=group)
    await resumed.start()
    assert await resumed.poll(max_records=10, timeout=1.0) == []
    for c in (reader, resumed):
        await c.close()
    for p in (plain, txn):
        await p.close()


async def test_newer_producer_with_same_transactional_id_fences_the_old(log: EventLog) -> None:
    src, dst, group = _topic(), _topic(), f"g-{uuid.uuid4().hex[:8]}"
    await log.create_topics([TopicSpec(src, partitions=1), TopicSpec(dst, partitions=1)])
    consumer = log.consumer([src], group_id=group)
    await consumer.start()
    await consumer.poll(max_records=1, timeout=2.0)
    txn_id = f"txn-{uuid.uuid4().hex[:8]}"
    old = log.producer(transactional_id=txn_id)
    await old.start()
    new = log.producer(transactional_id=txn_id)
    await new.start()
    with pytest.raises(FencedError):
        await old.commit_transaction([OutRecord(dst, b"k", b"zombie")], {}, consumer)
    await new.commit_transaction([OutRecord(dst, b"k", b"live")], {}, consumer)
    reader = log.consumer([dst], group_id=None)
    await reader.start()
    values = [r.value for r in await _drain(reader, 1)]
    await asyncio.sleep(0.5)
    values += [r.value for r in await reader.poll(max_records=10, timeout=0.5)]
    assert values == [b"live"]
    for c in (consumer, reader):
        await c.close()
    for p in (old, new):
        await p.close()


async def test_end_offsets_seek_and_pause(log: EventLog) -> None:
    topic = _topic()
    await log.create_topics([TopicSpec(topic, partitions=1)])
    producer = log.producer()
    await producer.start()
    await producer.send([OutRecord(topic, b"k", str(i).encode()) for i in range(6)])
    consumer = log.consumer([topic], group_id=None)
    await consumer.start()
    tp = TopicPartition(topic, 0)
    assert (await consumer.end_offsets([tp]))[tp] == 6
    await _drain(consumer, 6)
    consumer.seek(tp, 4)
    assert [r.offset for r in await _drain(consumer, 2)] == [4, 5]
    consumer.pause([tp], True)
    await producer.send([OutRecord(topic, b"k", b"later")])
    assert await consumer.poll(max_records=10, timeout=0.5) == []
    consumer.pause([tp], False)
    assert [r.value for r in await _drain(consumer, 1)] == [b"later"]
    await consumer.close()
    await producer.close()


async def test_a_group_member_paused_hands_out_nothing_of_it_until_resumed(
    log: EventLog,
) -> None:
    # The worker's lanes: confluent's member holds records back in its buffer (librdkafka
    # keeps fetching them), the others stop fetching; either way the pause is exact.
    topic = _topic()
    await log.create_topics([TopicSpec(topic, partitions=2)])
    producer = log.producer()
    await producer.start()
    consumer = log.consumer([topic], group_id=f"g-{topic}")
    await consumer.start()
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    await producer.send([OutRecord(topic, b"k", b"first", partition=1)])
    # Polled first: the in-memory log assigns a member its partitions at a poll.
    assert [r.value for r in await _drain(consumer, 1)] == [b"first"]
    consumer.pause([tp0], True)
    await producer.send([OutRecord(topic, b"k", str(i).encode(), partition=0) for i in range(3)])
    await producer.send([OutRecord(topic, b"k", b"other", partition=1)])
    assert [r.tp for r in await _drain(consumer, 1)] == [tp1]
    assert await consumer.poll(max_records=10, timeout=0.5) == []
    assert await consumer.position(tp0) == 0
    consumer.pause([tp0], False)
    assert [r.value for r in await _drain(consumer, 3)] == [b"0", b"1", b"2"]
    await consumer.close()
    await producer.close()


async def test_offsets_for_time_find_the_first_record_at_or_after_a_moment(
    log: EventLog,
) -> None:
    topic = _topic()
    await log.create_topics([TopicSpec(topic, partitions=2)])
    producer = log.producer()
    await producer.start()
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    await producer.send([OutRecord(topic, b"k", b"before", partition=0) for _ in range(2)])
    await asyncio.sleep(0.05)
    moment = time.time_ns() // 1_000_000
    await asyncio.sleep(0.01)
    await producer.send([OutRecord(topic, b"k", b"after", partition=0) for _ in range(3)])
    consumer = log.consumer([topic], group_id=None)
    await consumer.start()
    assert await consumer.offsets_for_time([tp0, tp1], 0) == {tp0: 0, tp1: 0}
    assert (await consumer.offsets_for_time([tp0], moment))[tp0] == 2
    # Nothing at or after: the end offset, where a reader would wait for what comes next.
    later = moment + 3_600_000
    assert await consumer.offsets_for_time([tp0, tp1], later) == {tp0: 5, tp1: 0}
    consumer.seek(tp0, (await consumer.offsets_for_time([tp0], moment))[tp0])
    consumer.pause([tp1], True)
    assert [r.value for r in await _drain(consumer, 3)] == [b"after"] * 3
    await consumer.close()
    await producer.close()


def _delete_before(
    log: EventLog, request: pytest.FixtureRequest, tp: TopicPartition, at: int
) -> None:
    """Advance the log start offset, as retention does (Kafka's DeleteRecords)."""
    if isinstance(log, InMemoryEventLog):
        log.delete_records(tp, at)
        return
    from confluent_kafka import TopicPartition as KafkaTopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": request.getfixturevalue("kafka_bootstrap")})
    for future in admin.delete_records([KafkaTopicPartition(tp.topic, tp.partition, at)]).values():
        future.result(timeout=30)


async def test_positions_before_the_log_start_are_reset_to_it(
    log: EventLog, request: pytest.FixtureRequest
) -> None:
    """Records deleted by retention: a committed offset or a seek before the log start
    offset resumes at the start (auto.offset.reset=earliest), never fails nor waits."""
    topic = _topic()
    await log.create_topics([TopicSpec(topic, partitions=1)])
    tp = TopicPartition(topic, 0)
    producer = log.producer()
    await producer.start()
    await producer.send([OutRecord(topic, b"k", str(i).encode()) for i in range(6)])
    group = f"g-{topic}"
    first = log.consumer([topic], group_id=group)
    await first.start()
    assert [r.offset for r in await _drain(first, 6)] == list(range(6))
    await first.commit({tp: 1})
    await first.close()
    _delete_before(log, request, tp, 3)

    member = log.consumer([topic], group_id=group)
    await member.start()
    assert [r.offset for r in await _drain(member, 3)] == [3, 4, 5]
    await member.close()
    reader = log.consumer([topic], group_id=None)
    await reader.start()
    await _drain(reader, 3)
    reader.seek(tp, 1)
    assert [r.offset for r in await _drain(reader, 3)] == [3, 4, 5]
    assert (await reader.end_offsets([tp]))[tp] == 6
    assert (await reader.offsets_for_time([tp], 0))[tp] == 3
    await reader.close()
    await producer.close()


async def test_latest_start_skips_history(log: EventLog) -> None:
    topic = _topic()
    await log.create_topics([TopicSpec(topic, partitions=2)])
    producer = log.producer()
    await producer.start()
    await producer.send([OutRecord(topic, b"old", b"old")])
    consumer = log.consumer([topic], group_id=None, start="latest")
    await consumer.start()
    await consumer.poll(max_records=10, timeout=0.5)
    await producer.send([OutRecord(topic, b"new", b"new")])
    assert [r.value for r in await _drain(consumer, 1)] == [b"new"]
    await consumer.close()
    await producer.close()


async def test_create_topics_is_idempotent_and_refuses_contradictions(log: EventLog) -> None:
    topic = _topic()
    spec = TopicSpec(topic, partitions=2, config={"cleanup.policy": "delete"})
    await log.create_topics([spec])
    await log.create_topics([spec])
    with pytest.raises(TopicConfigError, match=topic):
        await log.create_topics([TopicSpec(topic, partitions=3, config=spec.config)])
