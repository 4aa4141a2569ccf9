"""Stream triggers on the embedded default: a record of a foreign topic starts one task."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from qtasks_stream import QueueTasks
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import Submitted, TaskEvent
from qtasks_stream.records import OutRecord, TopicSpec
from qtasks_stream.serde import wire
from qtasks_stream.stages.deadletter import DeadLetterStage
from qtasks_stream.stages.runner import DLQ_REASON, DLQ_SOURCE, DLQ_STAGE
from qtasks_stream.telemetry import MetricsInterceptor
from qtasks_stream.triggers import Topic, TriggerRecord, trigger_task_id
from qtasks_stream.triggers.stage import TriggerStage
from tests.e2e.test_lifecycle import eventually, memlog
from tests.telemetry.test_telemetry_embedded import _sums

ORDERS = "shop.orders"


async def foreign_topic(log: InMemoryEventLog, partitions: int = 2) -> None:
    await log.create_topics([TopicSpec(ORDERS, partitions)])


async def write(log: InMemoryEventLog, records: list[OutRecord]) -> None:
    producer = log.producer()
    await producer.start()
    await producer.send(records)
    await producer.close()


def submitted(app: QueueTasks) -> list[TaskEvent]:
    events = [
        TaskEvent.from_avro(app.serde.decode(app.topology.events, r.value or b""))
        for r in memlog(app).records(app.topology.events)
    ]
    return [e for e in events if isinstance(e.payload, Submitted)]


def stage(app: QueueTasks) -> TriggerStage:
    trigger = app.runners["trigger"].stage
    assert isinstance(trigger, TriggerStage)
    return trigger


async def test_each_record_starts_one_task_also_after_a_restart(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    await foreign_topic(log)
    seen: list[tuple[Any, dict[str, Any]]] = []

    def register(app: QueueTasks) -> None:
        @app.task(name="ship", trigger=Topic(ORDERS, value="json"))
        async def ship(order, trigger: TriggerRecord):  # type: ignore[no-untyped-def]
            seen.append((order, trigger))
            return order["n"]

    first = make_app("trig", event_log=log)
    register(first)
    await write(
        log,
        [
            OutRecord(ORDERS, f"o{n}".encode(), json.dumps({"n": n}).encode(), (("h", b"v"),))
            for n in range(20)
        ],
    )
    await first.start()
    await eventually(lambda: len(seen) == 20, what="len(seen) == 20")
    await first.close()

    # A second process on the same log, same group: only the new records start tasks.
    second = make_app("trig", event_log=log, schema_registry=first._registry)
    register(second)
    await write(log, [OutRecord(ORDERS, b"o20", json.dumps({"n": 20}).encode())])
    await second.start()
    await eventually(lambda: len(seen) == 21, what="len(seen) == 21")
    await asyncio.sleep(0.3)  # give a wrong redelivery the time to show

    events = submitted(second)
    assert len(events) == 21 == len({e.task_id for e in events})
    assert sorted(order["n"] for order, _ in seen) == list(range(21))
    record = next(r for o, r in seen if o["n"] == 3)
    assert record["topic"] == ORDERS and record["key"] == "o3"
    assert record["headers"] == {"h": "v"}
    expected = trigger_task_id("trig", "ship", ORDERS, record["partition"], record["offset"])
    task = await second.get(expected)
    assert task is not None and task.status == "success" and task.returning == 3


@dataclass
class Order:
    id: str
    amount: int


async def test_avro_records_decode_with_the_writer_schema_from_the_registry(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    await foreign_topic(log)
    got: list[tuple[Order, TriggerRecord]] = []
    app = make_app("avro", event_log=log)

    @app.task(name="bill", trigger=Topic(ORDERS, value="avro"))
    async def bill(order: Order, trigger: TriggerRecord) -> int:
        got.append((order, trigger))
        return order.amount

    # The other team's schema: more fields than the task reads, registered by them.
    schema = {
        "type": "record",
        "name": "Order",
        "namespace": "shop",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "amount", "type": "long"},
            {"name": "note", "type": "string"},
        ],
    }
    schema_id = app._registry.register_schema(f"{ORDERS}-value", Schema(json.dumps(schema), "AVRO"))
    import fastavro

    parsed = fastavro.parse_schema(schema)
    value = wire.write(parsed, wire.header(schema_id), {"id": "A1", "amount": 7, "note": "x"}, "t")
    await write(log, [OutRecord(ORDERS, b"A1", value)])
    await app.start()
    await eventually(lambda: len(got) == 1, what="len(got) == 1")
    order, trigger = got[0]
    assert order == Order("A1", 7)
    assert isinstance(trigger, TriggerRecord) and trigger.key == "A1"


async def test_a_poison_record_is_dead_lettered_with_its_bytes(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    await foreign_topic(log, partitions=1)
    ran: list[int] = []
    app = make_app("poison", event_log=log)

    @app.task(name="ship", trigger=Topic(ORDERS, value="avro"))
    async def ship(order: dict[str, int]) -> None:
        ran.append(order["n"])

    poison = b"\x00\x00\x00\x99not avro at all"
    await write(log, [OutRecord(ORDERS, b"bad", poison, (("origin", b"team-b"),))])
    await app.start()
    await eventually(
        lambda: stage(app).counts["ship"]["dead_lettered"] == 1,
        what="stage(app).counts['ship']['dead_lettered'] == 1",
    )
    await eventually(
        lambda: bool(log.records(app.topology.deadletter)),
        what="bool(log.records(app.topology.deadletter))",
    )
    (dead,) = log.records(app.topology.deadletter)
    headers = dict(dead.headers)
    assert dead.value == poison and dead.key == b"bad"
    assert headers["origin"] == b"team-b"
    assert headers[DLQ_STAGE] == b"trigger"
    assert headers[DLQ_SOURCE] == f"{ORDERS}/0/0".encode()
    assert b"ship" in headers[DLQ_REASON]
    # The dead-letter stage read it, and made no task of the foreign key "bad".
    dead_stage = app.runners["deadletter"].stage
    assert isinstance(dead_stage, DeadLetterStage)
    await eventually(lambda: dead_stage.count == 1, what="the dead letter read")
    await asyncio.sleep(0.2)
    assert not ran and not submitted(app)
    assert not memlog(app).records(app.topology.events)


async def test_a_filter_skips_records_and_counts_them(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    await foreign_topic(log, partitions=1)
    ran: list[int] = []
    reader = InMemoryMetricReader()
    metrics = MetricsInterceptor(MeterProvider(metric_readers=[reader]))
    app = make_app("filt", event_log=log, interceptors=[metrics])

    @app.task(
        name="big",
        trigger=Topic(ORDERS, filter=lambda value, record: value["amount"] >= 100),
    )
    async def big(order: dict[str, int]) -> None:
        ran.append(order["amount"])

    await write(
        log,
        [OutRecord(ORDERS, None, json.dumps({"amount": a}).encode()) for a in (5, 150, 99, 100)],
    )
    await app.start()
    await eventually(lambda: sorted(ran) == [100, 150], what="sorted(ran) == [100, 150]")
    await eventually(
        lambda: stage(app).counts["big"]["skipped"] == 2,
        what="stage(app).counts['big']['skipped'] == 2",
    )
    assert stage(app).counts["big"]["submitted"] == 2
    assert len(submitted(app)) == 2
    sums = _sums(reader)
    assert sums["qtasks.triggers.skipped"] == {"big": 2}
    assert sums["qtasks.tasks.submitted"] == {"big": 2}


async def test_two_tasks_on_one_topic_and_a_refusal_dead_letters_once(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    await foreign_topic(log, partitions=1)
    ran: list[tuple[str, int]] = []
    app = make_app("two", event_log=log)

    def boom(value: Any, record: TriggerRecord) -> bool:
        if value["n"] == 2:
            raise RuntimeError("no twos")
        return True

    @app.task(name="count", trigger=Topic(ORDERS))
    async def count(order: dict[str, int]) -> None:
        ran.append(("count", order["n"]))

    @app.task(name="audit", trigger=Topic(ORDERS, filter=boom))
    async def audit(order: dict[str, int]) -> None:
        ran.append(("audit", order["n"]))

    await write(log, [OutRecord(ORDERS, None, json.dumps({"n": n}).encode()) for n in (1, 2)])
    await app.start()
    await eventually(lambda: len(ran) == 3, what="three tasks ran")
    await eventually(lambda: bool(log.records(app.topology.deadletter)), what="a dead letter")
    assert sorted(ran) == [("audit", 1), ("count", 1), ("count", 2)]
    (dead,) = log.records(app.topology.deadletter)
    reason = dict(dead.headers)[DLQ_REASON].decode()
    assert "'audit'" in reason and "no twos" in reason
    assert {e.task_id for e in submitted(app)} == {
        trigger_task_id("two", name, ORDERS, 0, offset)
        for name, offset in (("count", 0), ("count", 1), ("audit", 0))
    }


def test_a_trigger_is_refused_when_the_task_cannot_take_the_value() -> None:
    app = QueueTasks("refuse")
    with pytest.raises(ConfigurationError, match="first parameter must be positional"):

        @app.task(trigger=Topic(ORDERS))
        async def keyword_only(*, order: dict[str, int]) -> None: ...

    with pytest.raises(ConfigurationError, match=r"must be a qtasks_stream\.triggers\.Topic"):
        app.task(trigger="orders")(lambda order: None)  # type: ignore[typeddict-item]
    with pytest.raises(ConfigurationError, match="value format 'xml'"):
        Topic(ORDERS, value="xml")  # type: ignore[arg-type]
