"""What only a real broker can show: topic configs, aborted transactions, zombie members,
and a rebalance listener that commits."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from aiokafka import AIOKafkaProducer
from confluent_kafka.admin import AdminClient

from qtasks_stream.errors import ConfigurationError, EventLogError, FencedError, TopicConfigError
from qtasks_stream.eventlog.base import Consumer, EventLog, Producer
from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from qtasks_stream.records import OutRecord, Record, TopicPartition, TopicSpec
from tests.eventlogs import EVENT_LOG_KINDS, make_event_log

pytestmark = pytest.mark.timeout(120)

#: The Kafka kinds carry the ``kafka`` mark; the config tests below need no broker.
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


class _SeekOnAssign:
    """Keeps offsets "elsewhere": on assignment, reads them and seeks there."""

    def __init__(self, start_at: int) -> None:
        self.start_at = start_at
        self.consumer: Consumer | None = None
        self.seen: list[tuple[dict[TopicPartition, int], dict[TopicPartition, int]]] = []

    async def on_assigned(self, partitions: Sequence[TopicPartition]) -> None:
        assert self.consumer is not None
        # Called during start(): the consumer must already serve these calls.
        committed = await self.consumer.committed(partitions)
        ends = await self.consumer.end_offsets(partitions)
        self.seen.append((committed, ends))
        for tp in partitions:
            self.consumer.seek(tp, self.start_at)

    async def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        pass


async def test_listener_uses_the_consumer_during_the_first_assignment(log: EventLog) -> None:
    topic, group = _name("seek"), _name("g")
    tp = TopicPartition(topic, 0)
    await log.create_topics([TopicSpec(topic, partitions=1)])
    producer = log.producer()
    await producer.start()
    await producer.send([OutRecord(topic, b"k", str(i).encode()) for i in range(6)])
    listener = _SeekOnAssign(start_at=4)
    consumer = log.consumer([topic], group_id=group, listener=listener)
    listener.consumer = consumer
    await asyncio.wait_for(consumer.start(), 30)
    assert listener.seen == [({}, {tp: 6})]
    assert [r.offset for r in await _drain(consumer, 2)] == [4, 5]
    await consumer.commit({tp: 6})
    assert await consumer.committed([tp]) == {tp: 6}
    await consumer.close()
    await producer.close()


def test_config_masks_secrets_and_maps_to_both_clients() -> None:
    config = KafkaConfig(
        "broker:9093",
        security_protocol="sasl_ssl",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="app",
        sasl_password="s3cret",
        extra={"compression.type": "lz4", "max.poll.records": "50", "linger.ms": "20"},
    )
    assert "s3cret" not in repr(config) and "sasl_password='***'" in repr(config)
    rd = config.to_librdkafka({"linger.ms": 5, "acks": "all"})
    assert rd["security.protocol"] == "sasl_ssl"
    assert rd["sasl.mechanism"] == "SCRAM-SHA-512" and rd["sasl.password"] == "s3cret"
    assert rd["linger.ms"] == "20"  # extra wins over what the event log sets
    assert rd["acks"] == "all"
    aio = config.to_aiokafka_kwargs(
        {"linger_ms": 5}, accepted={"linger_ms", "compression_type", "max_poll_records"}
    )
    assert aio["sasl_plain_password"] == "s3cret" and aio["ssl_context"] is not None
    assert aio["linger_ms"] == 20 and aio["max_poll_records"] == 50
    assert aio["compression_type"] == "lz4"


def test_config_refuses_what_no_client_understands() -> None:
    with pytest.raises(ConfigurationError):
        KafkaConfig("b:9092", security_protocol="TLS")
    with pytest.raises(ConfigurationError):
        KafkaConfig("b:9092", sasl_mechanism="PLAIN")
    with pytest.raises(ConfigurationError, match=r"statistics\.interval\.ms"):
        AioKafkaEventLog(KafkaConfig("b:9092", extra={"statistics.interval.ms": "1000"}))


def test_building_clients_does_no_io() -> None:
    # Port 9 (discard) on loopback: any connection attempt would fail or hang.
    config = KafkaConfig("127.0.0.1:9")
    for event_log in (AioKafkaEventLog(config), ConfluentEventLog(config)):
        event_log.producer()
        event_log.producer(transactional_id="t")
        event_log.consumer(["t"], group_id="g")
        event_log.consumer(["t"], group_id=None, start="latest")


async def test_librdkafka_log_lines_reach_python_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A transactional producer on a closed port: librdkafka's connection failures (FAIL),
    # written to stderr without a logger, must reach logging under the package's logger,
    # also when start() gives up before the producer ever polled.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    log = ConfluentEventLog(KafkaConfig(f"127.0.0.1:{port}", request_timeout_ms=2000))
    producer = log.producer(transactional_id=_name("nobroker"))
    with caplog.at_level(logging.DEBUG, logger="qtasks_stream"):
        with pytest.raises(EventLogError, match="cannot start the Kafka producer"):
            await producer.start()
        await producer.close()
        await log.close()
    fails = [
        r.getMessage()
        for r in caplog.records
        if r.name == "qtasks_stream.rdkafka" and r.getMessage().startswith("FAIL")
    ]
    assert any(f"127.0.0.1:{port}" in line for line in fails), caplog.text
