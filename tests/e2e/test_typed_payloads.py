"""Typed Avro task arguments and results, on the embedded default.

A task whose signature gives Avro-mappable types sends its arguments and result as Avro
records registered under per-task subjects; the worker calls it with real instances
(dataclasses, Pydantic models, enums, datetimes) and the client gets typed results back.
Other tasks keep JSON. The bytes in the log decode with fastavro and the registry alone.
"""

from __future__ import annotations

import asyncio
import enum
import io
import json
import re
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fastavro
import pydantic
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import ConfigurationError, QueueTasks
from qtasks_stream.errors import SchemaError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import Submitted, Succeeded, TaskEvent
from qtasks_stream.records import TopicPartition
from qtasks_stream.serde.payloads import AVRO, JSON, task_subjects
from qtasks_stream.serde.typed import NoAvroMapping, compile_hint
from tests.e2e.test_lifecycle import RegistryDown

LIMIT = 5.0


class Tier(enum.Enum):
    BASIC = "basic"
    GOLD = "gold"


@dataclass
class Line:
    sku: str
    quantity: int
    unit_price: float


@dataclass
class Order:
    """An order to charge."""

    order_id: uuid.UUID
    lines: list[Line]
    tier: Tier
    placed_at: datetime
    note: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


class Receipt(pydantic.BaseModel):
    order_id: uuid.UUID
    total: float
    tier: Tier
    lines: int


def an_order() -> Order:
    return Order(
        order_id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        lines=[Line("apple", 3, 0.5), Line("pear", 1, 1.25)],
        tier=Tier.GOLD,
        placed_at=datetime(2026, 11, 27, 12, 30, tzinfo=UTC),
        labels={"channel": "web"},
    )


def sharing_log_and_registry(
    make_app: Callable[..., QueueTasks], name: str
) -> tuple[QueueTasks, QueueTasks, SchemaRegistryClient]:
    """Two apps of one name on one log and registry: two versions of the same code."""
    log = InMemoryEventLog()
    registry = SchemaRegistryClient.new_client({"url": f"mock://{name}-{uuid.uuid4().hex}"})
    return (
        make_app(name, event_log=log, schema_registry=registry),
        make_app(name, event_log=log, schema_registry=registry),
        registry,
    )


async def records_in(app: QueueTasks, topic: str) -> int:
    consumer = app.event_log.consumer([topic], group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(app.topology.partitions)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.close()


async def log_events(app: QueueTasks, task_id: str) -> list[TaskEvent]:
    return await app.history(task_id)


def test_hints_map_to_avro_and_unmappable_ones_say_why() -> None:
    schema = compile_hint(Order, {}, "order").schema
    parsed = fastavro.parse_schema(schema)  # a valid Avro schema
    assert parsed["name"].endswith("Order")
    by_name = {f["name"]: f for f in schema["fields"]}
    assert by_name["order_id"]["type"] == {"type": "string", "logicalType": "uuid"}
    assert by_name["lines"]["type"]["type"] == "array"
    assert by_name["tier"]["type"]["symbols"] == ["BASIC", "GOLD"]
    assert by_name["placed_at"]["type"]["logicalType"] == "timestamp-micros"
    assert by_name["note"] == {"name": "note", "type": ["null", "string"], "default": None}
    assert "default" not in by_name["labels"]  # a factory is not an Avro default
    assert schema["doc"] == "An order to charge."
    with pytest.raises(NoAvroMapping, match=re.escape("only `X | None` unions")):
        compile_hint(int | str, {}, "x")
    with pytest.raises(NoAvroMapping, match="object has no Avro mapping"):
        compile_hint(object, {}, "x")


async def test_typed_task_gets_instances_and_returns_a_typed_result(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()
    seen: list[Any] = []

    @app.task
    async def charge(order: Order, *, discount: float = 0.0) -> Receipt:
        seen.append(order)
        total = sum(line.quantity * line.unit_price for line in order.lines) - discount
        return Receipt(
            order_id=order.order_id, total=total, tier=order.tier, lines=len(order.lines)
        )

    await app.start()
    order = an_order()
    done = await app.add_task("charge", order, discount=0.25, timeout=LIMIT)
    assert done is not None and done.status == "success", done
    assert seen == [order], "the worker did not get an equal Order instance"
    assert isinstance(seen[0].lines[0], Line) and seen[0].tier is Tier.GOLD
    assert seen[0].placed_at == order.placed_at and seen[0].placed_at.tzinfo is not None
    assert done.returning == Receipt(order_id=order.order_id, total=2.5, tier=Tier.GOLD, lines=2)
    # The client's Task shows the call in one normal form: positional where allowed.
    assert done.args == [order] and done.kwargs == {"discount": 0.25}

    history = await log_events(app, done.uuid)
    submitted = history[0].payload
    assert isinstance(submitted, Submitted)
    assert submitted.content_type == AVRO and (submitted.args, submitted.kwargs) == ("[]", "{}")
    assert submitted.arguments_avro is not None and submitted.arguments_avro[0] == 0
    succeeded = history[-1].payload
    assert isinstance(succeeded, Succeeded) and succeeded.content_type == AVRO
    assert succeeded.result == "" and succeeded.result_avro is not None

    for _ in range(int(LIMIT / 0.01)):
        viewed = await app.get(done.uuid)
        if viewed is not None and viewed.final:
            break
        await asyncio.sleep(0.01)
    assert viewed is not None and viewed.final, "the view never showed the task final"
    assert viewed.returning == done.returning and viewed.args == done.args


async def test_typed_bytes_decode_with_the_registry_alone(
    make_app: Callable[..., QueueTasks],
) -> None:
    """What another team does: schema id from the wire format, schema from the registry."""
    registry = SchemaRegistryClient.new_client({"url": f"mock://typed-{uuid.uuid4().hex}"})
    app = make_app(schema_registry=registry)

    @app.task
    async def charge(order: Order) -> Receipt:
        return Receipt(order_id=order.order_id, total=1.0, tier=order.tier, lines=0)

    await app.start()
    done = await app.add_task("charge", an_order(), timeout=LIMIT)
    assert done is not None and done.status == "success"
    history = await log_events(app, done.uuid)
    submitted, succeeded = history[0].payload, history[-1].payload
    assert isinstance(submitted, Submitted) and isinstance(succeeded, Succeeded)

    def plain_decode(data: bytes) -> Any:
        magic, schema_id = struct.unpack_from(">bI", data)
        assert magic == 0
        schema = json.loads(registry.get_schema(schema_id).schema_str)
        return fastavro.schemaless_reader(io.BytesIO(data[5:]), fastavro.parse_schema(schema))

    assert submitted.arguments_avro is not None and succeeded.result_avro is not None
    arguments = plain_decode(submitted.arguments_avro)
    assert arguments["order"]["tier"] == "GOLD"
    assert arguments["order"]["lines"][1] == {"sku": "pear", "quantity": 1, "unit_price": 1.25}
    assert plain_decode(succeeded.result_avro)["value"]["total"] == 1.0
    arguments_subject, result_subject = task_subjects(app.topology.events, "charge")
    assert registry.get_latest_version(arguments_subject).schema.schema_str is not None
    assert registry.get_latest_version(result_subject).schema.schema_str is not None


async def test_untyped_tasks_keep_json(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()

    @app.task
    async def loose(a, b=2):  # type: ignore[no-untyped-def]
        return {"sum": a + b}

    @app.task
    async def any_result(a: int):  # type: ignore[no-untyped-def]
        return [a]

    await app.start()
    loose_done = await app.add_task("loose", 1, timeout=LIMIT)
    half_done = await app.add_task("any_result", 4, timeout=LIMIT)
    assert loose_done is not None and loose_done.returning == {"sum": 3}
    assert half_done is not None and half_done.returning == [4]
    assert half_done.args == [4]
    loose_events = await log_events(app, loose_done.uuid)
    assert isinstance(loose_events[0].payload, Submitted)
    assert loose_events[0].payload.content_type == JSON
    half_events = await log_events(app, half_done.uuid)
    # Typed arguments, JSON result: each part goes its own way.
    assert isinstance(half_events[0].payload, Submitted)
    assert half_events[0].payload.content_type == AVRO
    assert isinstance(half_events[-1].payload, Succeeded)
    assert half_events[-1].payload.content_type == JSON


async def test_an_argument_of_the_wrong_type_is_refused_before_anything_is_written(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()

    @app.task
    async def charge(order: Order) -> None:
        return None

    @app.task
    async def count(n: int) -> int:
        return n

    await app.start()
    before = await records_in(app, app.topology.events)
    with pytest.raises(ConfigurationError, match=r"argument 'n' of task 'count'.*expected an int"):
        await app.add_task("count", "seven")
    with pytest.raises(ConfigurationError, match=r"task 'charge'.*missing.*order"):
        await app.add_task("charge")
    with pytest.raises(ConfigurationError, match="argument 'order' of task 'charge'"):
        await app.add_task("charge", {"order_id": "x"})
    assert await records_in(app, app.topology.events) == before


def greet_v1_and_v2(
    make_app: Callable[..., QueueTasks], name: str
) -> tuple[QueueTasks, QueueTasks, SchemaRegistryClient]:
    """A client with version 1 of ``greet`` and a worker with version 2, which adds a
    parameter with a default (see :func:`sharing_log_and_registry`)."""
    old_client, new_worker, registry = sharing_log_and_registry(make_app, name)

    @old_client.task(name="greet")
    async def greet_v1(name: str) -> str:
        raise AssertionError("the old version never runs here")

    @new_worker.task(name="greet")
    async def greet_v2(name: str, punctuation: str = "!") -> str:
        return f"hello {name}{punctuation}"

    return old_client, new_worker, registry


async def test_worker_reads_an_older_clients_arguments_by_schema_resolution(
    make_app: Callable[..., QueueTasks],
) -> None:
    """Version 2 of a task adds a parameter with a default; a version-1 client still works."""
    old_client, new_worker, registry = greet_v1_and_v2(make_app, "evolve")
    await new_worker.start()
    done = await old_client.add_task("greet", "ada", timeout=LIMIT)
    assert done is not None and done.status == "success", done
    assert done.returning == "hello ada!"
    subject = task_subjects(old_client.topology.events, "greet")[0]
    assert len(registry.get_versions(subject)) == 2


async def test_a_worker_waits_out_a_registry_outage_instead_of_failing_the_attempt(
    make_app: Callable[..., QueueTasks],
) -> None:
    """The worker must fetch an older client's argument schema while the registry refuses."""
    old_client, new_worker, registry = greet_v1_and_v2(make_app, "outage")
    await new_worker.start()
    await old_client.connect()  # registers version 1 of the arguments while the registry is up
    down = RegistryDown(registry, failures=3)
    done = await old_client.add_task("greet", "ada", timeout=LIMIT)
    assert done is not None and (done.status, done.returning) == ("success", "hello ada!"), done
    assert done.attempt == 1 and down.refused == 3
    kinds = [e.kind for e in await old_client.history(done.uuid)]
    assert kinds == ["Submitted", "Scheduled", "Started", "Succeeded"]


async def test_an_incompatible_task_signature_is_refused_at_start(
    make_app: Callable[..., QueueTasks],
) -> None:
    first, second, _ = sharing_log_and_registry(make_app, "refuse")

    @first.task(name="greet")
    async def greet_v1(name: str) -> str:
        return name

    @second.task(name="greet")
    async def greet_v2(name: str, loud: bool) -> str:  # a new parameter without a default
        return name

    await first.start()
    with pytest.raises(SchemaError, match="loud"):
        await second.start()


async def test_pages_and_counts_through_the_app_decode_typed_results(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()

    @app.task
    async def square(n: int) -> int:
        return n * n

    await app.start()
    done = [await app.add_task("square", n, timeout=LIMIT) for n in range(5)]
    assert all(t is not None and t.status == "success" for t in done)
    for _ in range(int(LIMIT / 0.01)):
        if (await app.counts()).get("success") == 5:
            break
        await asyncio.sleep(0.01)
    assert await app.counts() == {"success": 5}
    seen: list[int] = []
    cursor: str | None = None
    for _ in range(5):
        page = await app.page(task_name="square", limit=2, after=cursor)
        seen.extend(t.returning for t in page.tasks)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == [0, 1, 4, 9, 16], "pages missed or repeated a task"
