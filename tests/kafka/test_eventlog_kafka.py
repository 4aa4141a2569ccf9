"""What only a real broker can show: topic configs, aborted transactions, zombie members,
and a rebalance listener that commits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from aiokafka import AIOKafkaProducer
from confluent_kafka.admin import AdminClient

from qtasks_stream.errors import EventLogError, FencedError, TopicConfigError
from qtasks_stream.eventlog.base import Consumer, EventLog, Producer
from qtasks_stream.records import OutRecord, Record, TopicPartition, TopicSpec
from tests.eventlogs import EVENT_LOG_KINDS, make_event_log

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

KAFKA_KINDS = [p for p in EVENT_LOG_KINDS if p.values[0] != "memory"]


@pytest.fixture(params=KAFKA_KINDS)
async def log(request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    event_log = make_event_log(request)
    yield event_log
    await event_log.close()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _drain(consumer: Consumer, want: int, *, limit: float = 20.0) -> list[Record]:
    got: list[Record] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while len(got) < want and loop.time() < deadline:
        got.extend(await consumer.poll(max_records=500, timeout=0.5))
    return got


async def test_topic_config_contradiction_names_topic_and_setting(log: EventLog) -> None:
    topic = _name("cfg")
    compact = {"cleanup.policy": "compact", "retention.ms": "3600000"}
    await log.create_topics([TopicSpec(topic, partitions=2, config=compact)])
    await log.create_topics([TopicSpec(topic, partitions=2, config=compact)])
    # A config the spec does not mention is not compared.
    await log.create_topics([TopicSpec(topic, partitions=2, config={"retention.ms": "3600000"})])
    with pytest.raises(TopicConfigError, match=rf"{topic}.*cleanup\.policy='compact'"):
        await log.create_topics(
            [TopicSpec(topic, partitions=2, config={"cleanup.policy": "delete"})]
        )
    with pytest.raises(TopicConfigError, match=rf"{topic}.*2 partitions instead of 4"):
        await log.create_topics([TopicSpec(topic, partitions=4, config=compact)])


async def test_read_committed_hides_an_aborted_transaction(
    log: EventLog, kafka_bootstrap: str
) -> None:
    topic = _name("txn")
    await log.create_topics([TopicSpec(topic, partitions=1)])
    # Write an aborted transaction with a raw client: the event log's API never aborts
    # on purpose.
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=_name("raw"))
    await raw.start()
    try:
        await raw.begin_transaction()
        await raw.send_and_wait(topic, b"aborted", key=b"k")
        await raw.abort_transaction()
        async with raw.transaction():
            await raw.send_and_wait(topic, b"committed", key=b"k")
    finally:
        await raw.stop()
    consumer = log.consumer([topic], group_id=None)
    await consumer.start()
    values = [r.value for r in await _drain(consumer, 1)]
    values += [r.value for r in await consumer.poll(max_records=10, timeout=1.0)]
    assert values == [b"committed"]
    await consumer.close()


class _CommitOnRevoke:
    """Commits, from on_revoked, what the stage read of the revoked partitions."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.consumer: Consumer | None = None
        self.positions: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}

    async def on_assigned(self, partitions: Sequence[TopicPartition]) -> None:
        pass

    async def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        assert self.consumer is not None
        offsets = {tp: self.positions[tp] for tp in partitions if tp in self.positions}
        await self.producer.commit_transaction([], offsets, self.consumer)
        self.committed.update(offsets)


async def test_listener_commits_from_on_revoked_and_zombie_offsets_are_fenced(
    log: EventLog,
) -> None:
    topic, group = _name("reb"), _name("g")
    await log.create_topics([TopicSpec(topic, partitions=2)])
    producer = log.producer()
    await producer.start()
    await producer.send(
        [OutRecord(topic, None, b"v", partition=p) for p in (0, 1) for _ in range(5)]
    )
    txn = log.producer(transactional_id=_name("txn"))
    await txn.start()
    listener = _CommitOnRevoke(txn)
    first = log.consumer([topic], group_id=group, listener=listener)
    listener.consumer = first
    await first.start()  # alone in the group: both partitions
    for rec in await _drain(first, 10):
        listener.positions[rec.tp] = rec.offset + 1
    assert listener.positions == {TopicPartition(topic, 0): 5, TopicPartition(topic, 1): 5}
    assert await first.committed(list(listener.positions)) == {}

    # A second member joins: the first gives up its partitions, committing from the listener
    # while the second waits in start(). A listener that could not commit here would hang.
    second = log.consumer([topic], group_id=group)
    await second.start()
    assert listener.committed == listener.positions
    assert await second.committed(list(listener.positions)) == listener.positions
    # Whatever the second member got starts at the committed offsets: nothing is redone.
    assert await second.poll(max_records=10, timeout=1.0) == []

    # The first member kept one partition at most; committing the other is a zombie's.
    lost = [tp for tp in listener.positions if tp not in _owned(first)]
    assert lost
    with pytest.raises(FencedError):
        await txn.commit_transaction(
            [OutRecord(topic, None, b"zombie", partition=lost[0].partition)],
            {lost[0]: 5},
            first,
        )
    with pytest.raises(FencedError):
        await first.commit({lost[0]: 5})
    reader = log.consumer([topic], group_id=None)
    await reader.start()
    assert b"zombie" not in [r.value for r in await _drain(reader, 11, limit=3.0)]
    for consumer in (first, second, reader):
        await consumer.close()
    for p in (producer, txn):
        await p.close()


def _owned(consumer: Consumer) -> set[TopicPartition]:
    """The partitions a Kafka consumer holds now (test helper; not part of the contract)."""
    assigned = getattr(consumer, "_assigned", None)
    if assigned is not None:
        return set(assigned)
    return {TopicPartition(tp.topic, tp.partition) for tp in consumer._consumer.assignment()}  # type: ignore[attr-defined]


async def test_unknown_topic_is_an_error_and_never_auto_created(
    log: EventLog, kafka_bootstrap: str
) -> None:
    topic = _name("missing")
    producer = log.producer()
    await producer.start()
    with pytest.raises(EventLogError, match=topic):
        await producer.send([OutRecord(topic, b"k", b"v")])
    await producer.close()
    for group_id in (None, _name("g")):
        consumer = log.consumer([topic], group_id=group_id)
        with pytest.raises(EventLogError, match=topic):
            await consumer.start()
        await consumer.close()
    # The test broker has auto.create.topics.enable=true: nothing may have asked for it.
    metadata = await asyncio.to_thread(
        AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics, timeout=10
    )
    assert topic not in metadata.topics
