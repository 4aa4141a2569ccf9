"""The public topic contract (docs/events.md), on the real broker and registry.

a. Another team's client, written without any qtasks_stream code, reconstructs every
   task's lifecycle from the events topic.
b. The shipped TaskEvent schema evolves: a field with a default is accepted and both old and
   new readers read both old and new data; incompatible changes are refused before anything
   is registered or produced.
c. Two teams: team B's consumer group reads team A's events topic, produces its own
   summary, and leaves A's consumer groups untouched.
"""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext, StringSerializer

from qtasks_stream import QueueTasks
from qtasks_stream.app import STAGES
from qtasks_stream.errors import SchemaError
from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from qtasks_stream.events import Succeeded, TaskEvent
from qtasks_stream.serde.avro import AvroSerde, subject_for
from qtasks_stream.serde.compat import (
    DEFAULT_COMPATIBILITY,
    IncompatibleSchemaError,
    check_compatibility,
    register_schemas,
)
from qtasks_stream.serde.schemas import load_schema_text
from tests.e2ehelpers import eventually
from tests.eventlogs import kafka_test_config
from tests.kafka import foreign_consumer
from tests.kafka.foreign_consumer import (
    ForeignEvent,
    consume_in_group,
    lifecycles,
    read_events,
    read_to_end,
    read_values,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

WAIT = 60.0


def _unique(stem: str) -> str:
    return f"{stem}{uuid.uuid4().hex[:8]}."


@pytest.fixture
async def make_app(
    kafka_bootstrap: str, schema_registry_url: str
) -> AsyncIterator[Callable[[str, str], QueueTasks]]:
    apps: list[QueueTasks] = []
    registries: list[SchemaRegistryClient] = []

    def make(name: str, prefix: str) -> QueueTasks:
        registry = SchemaRegistryClient({"url": schema_registry_url, "timeout": 10})
        registries.append(registry)
        app = QueueTasks(
            name,
            event_log=ConfluentEventLog(kafka_test_config(kafka_bootstrap)),
            schema_registry=registry,
            topic_prefix=prefix,
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        async with asyncio.timeout(WAIT):
            await app.close()
        await app.event_log.close()
    for registry in registries:
        registry.__exit__()


# -- a. consumed by clients we did not write ------------------------------------------------


def test_the_foreign_consumer_imports_nothing_of_qtasks_stream() -> None:
    path = Path(foreign_consumer.__file__)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert roots <= {
        "__future__",
        "collections",
        "dataclasses",
        "time",
        "typing",
        "uuid",
        "confluent_kafka",
    }, roots
    # Loaded on its own (no package __init__) in a fresh interpreter: not even indirectly.
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('foreign', {str(path)!r})\n"
        "module = sys.modules['foreign'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'qtasks_stream'))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class Flaky(RuntimeError):
    pass


async def test_a_foreign_consumer_reconstructs_every_lifecycle(
    make_app: Callable[[str, str], QueueTasks], kafka_bootstrap: str, schema_registry_url: str
) -> None:
    app = make_app("contract", _unique("ca"))
    calls: Counter[str] = Counter()

    @app.task
    async def double(x: int) -> int:
        return x * 2

    @app.task(retry=1, retry_backoff=0.01)
    async def flaky(key: str) -> str:
        calls[key] += 1
        if calls[key] == 1:
            raise Flaky("first attempt fails")
        return key.upper()

    @app.task
    async def broken() -> None:
        raise ValueError("always fails")

    @app.task
    async def total(values):  # type: ignore[no-untyped-def]
        return sum(values)

    async with app:
        ok, retried, failed, untyped = await asyncio.gather(
            app.add_task("double", 21, timeout=WAIT),
            app.add_task("flaky", "k", timeout=WAIT),
            app.add_task("broken", timeout=WAIT),
            app.add_task("total", [1, 2], timeout=WAIT),
        )
    assert ok is not None and retried is not None and failed is not None and untyped is not None
    assert (ok.status, retried.status, failed.status) == ("success", "success", "error")
    assert untyped.status == "success"

    events = await asyncio.to_thread(
        read_events, kafka_bootstrap, schema_registry_url, app.topology.events
    )

    assert lifecycles(events) == {
        ok.uuid: ["Submitted", "Scheduled", "Started", "Succeeded"],
        retried.uuid: [
            "Submitted",
            "Scheduled",
            "Started",
            "RetryScheduled",
            "Released",
            "Started",
            "Succeeded",
        ],
        failed.uuid: ["Submitted", "Scheduled", "Started", "Failed"],
        untyped.uuid: ["Submitted", "Scheduled", "Started", "Succeeded"],
    }
    by_task: dict[str, list[ForeignEvent]] = {}
    for event in sorted(events, key=lambda e: (e.partition, e.offset)):
        by_task.setdefault(event.task_id, []).append(event)
    for event in events:
        # The header names the same kind the payload branch does; the key is the task id.
        assert event.header_kind == event.kind
        assert event.envelope["task_id"] == event.task_id
    names = {task_id: {e.envelope["task_name"] for e in evs} for task_id, evs in by_task.items()}
    assert names == {
        ok.uuid: {"double"},
        retried.uuid: {"flaky"},
        failed.uuid: {"broken"},
        untyped.uuid: {"total"},
    }

    # Typed signatures: arguments and results are Avro records with registered schemas,
    # decoded by the same deserializer; untyped ones are JSON text with their content type.
    submitted = by_task[ok.uuid][0]
    assert submitted.payload["content_type"] == "application/vnd.qtasks.avro"
    assert submitted.typed["arguments_avro"] == {"x": 21}
    succeeded = by_task[ok.uuid][-1]
    assert succeeded.payload["content_type"] == "application/vnd.qtasks.avro"
    assert succeeded.typed["result_avro"] == {"value": 42}
    assert by_task[retried.uuid][-1].typed["result_avro"] == {"value": "K"}
    assert (json.loads(by_task[untyped.uuid][0].payload["args"]), "application/json") == (
        [[1, 2]],
        by_task[untyped.uuid][0].payload["content_type"],
    )
    assert json.loads(by_task[untyped.uuid][-1].payload["result"]) == 3
    # Attempts: the retry runs as attempt 2, announced by RetryScheduled.next_attempt.
    retry_events = by_task[retried.uuid]
    assert [e.envelope["attempt"] for e in retry_events if e.kind == "Started"] == [1, 2]
    assert retry_events[3].payload["next_attempt"] == 2
    assert retry_events[3].payload["error_type"].endswith("Flaky")
    assert by_task[failed.uuid][-1].payload["error_type"].endswith("ValueError")

    # Ordering per task comes from key partitioning with murmur2 (Kafka's default
    # partitioner): a librdkafka producer with partitioner=murmur2_random puts each task id
    # in the partition that holds that task's events.
    partitions = {task_id: {e.partition for e in evs} for task_id, evs in by_task.items()}
    assert all(len(p) == 1 for p in partitions.values()), partitions
    chosen = await asyncio.to_thread(
        _partitions_chosen_by_librdkafka, kafka_bootstrap, list(by_task), app.topology.partitions
    )
    assert chosen == {task_id: next(iter(p)) for task_id, p in partitions.items()}


def _create_topics(bootstrap: str, *topics: tuple[str, int]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, partitions, 1) for name, partitions in topics])
    for future in futures.values():
        future.result(timeout=30)


def _produce(bootstrap: str, records: list[tuple[str, str, bytes]]) -> dict[str, int]:
    """Produce (topic, key, value) records; key → partition it landed in."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    landed: dict[str, int] = {}
    errors: list[Any] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            landed[msg.key().decode()] = msg.partition()

    for topic, key, value in records:
        producer.produce(topic, key=key.encode(), value=value, on_delivery=delivered)
    assert producer.flush(30) == 0
    assert errors == []
    return landed


def _partitions_chosen_by_librdkafka(bootstrap: str, keys: list[str], partitions: int) -> dict:
    scratch = f"scratch-{uuid.uuid4().hex[:10]}"
    _create_topics(bootstrap, (scratch, partitions))
    return _produce(bootstrap, [(scratch, key, b"") for key in keys])


# -- b. evolution -----------------------------------------------------------------------------


def _task_event_schema(change: str | None = None) -> str:
    schema = json.loads(load_schema_text("TaskEvent"))
    fields: list[dict[str, Any]] = schema["fields"]
    tenant = {"name": "tenant", "type": ["null", "string"], "default": None}
    if change in ("tenant", "tenant+attempt as string", "tenant+region"):
        fields.insert(len(fields) - 1, tenant)
    if change == "tenant+attempt as string":
        next(f for f in fields if f["name"] == "attempt")["type"] = "string"
    if change == "tenant+region":
        fields.append({"name": "region", "type": "string"})
    return json.dumps(schema)


def _schema_id(data: bytes) -> int:
    assert data[0] == 0
    return int.from_bytes(data[1:5], "big")


async def test_the_events_schema_evolves_only_compatibly(
    kafka_bootstrap: str, schema_registry_url: str
) -> None:
    topic = f"{_unique('evo')}app.events"
    subject = subject_for(topic)
    await asyncio.to_thread(_create_topics, kafka_bootstrap, (topic, 1))
    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as registry:
        shipped = _task_event_schema()
        old_id = register_schemas(registry, {subject: shipped})[subject]
        assert registry.get_versions(subject) == [1]
        assert registry.get_compatibility(subject) == DEFAULT_COMPATIBILITY

        evolved = _task_event_schema("tenant")
        assert check_compatibility(registry, {subject: evolved}) == []
        assert registry.test_compatibility(subject, Schema(evolved, "AVRO")) is True
        new_id = register_schemas(registry, {subject: evolved})[subject]
        assert new_id != old_id
        assert registry.get_versions(subject) == [1, 2]

        # The app's serde holds the shipped (old) schema; registering it again is a no-op.
        old_side = AvroSerde(registry, {topic: "TaskEvent"})
        await old_side.start()
        assert registry.get_versions(subject) == [1, 2]
        event = TaskEvent.new("t-1", "double", 1, "worker:x", Succeeded("42", 1.5))
        old_bytes = old_side.encode(topic, event.to_avro())
        ctx = SerializationContext(topic, MessageField.VALUE)
        new_writer = AvroSerializer(
            registry, evolved, conf={"auto.register.schemas": False, "use.latest.version": False}
        )
        new_bytes = new_writer({**event.to_avro(), "tenant": "acme"}, ctx)
        assert (_schema_id(old_bytes), _schema_id(new_bytes)) == (old_id, new_id)
        await asyncio.to_thread(
            _produce, kafka_bootstrap, [(topic, "t-1", old_bytes), (topic, "t-1", new_bytes)]
        )
        stored: list[bytes] = []
        await asyncio.to_thread(
            read_to_end, kafka_bootstrap, topic, lambda m: stored.append(m.value())
        )
        assert stored == [old_bytes, new_bytes]

        # A reader holding the old schema reads both; the new field is dropped.
        for data in stored:
            decoded = old_side.decode(topic, data)
            assert "tenant" not in decoded
            assert TaskEvent.from_avro(decoded) == event
        # A reader holding the new schema reads both; old data gets the default.
        new_reader = AvroDeserializer(registry, schema_str=evolved, return_record_name=True)
        read_new: list[Any] = [new_reader(data, ctx) for data in stored]
        assert [value["tenant"] for value in read_new] == [None, "acme"]
        assert [value["payload"][0] for value in read_new] == ["qtasks.stream.v1.Succeeded"] * 2
        assert {value["task_id"] for value in read_new} == {"t-1"}

        # Incompatible changes are refused before anything is registered or produced.
        for change, field in (("tenant+attempt as string", "attempt"), ("tenant+region", "region")):
            bad = _task_event_schema(change)
            with pytest.raises(SchemaError, match=f"'{field}'") as caught:
                register_schemas(registry, {subject: bad})
            assert isinstance(caught.value, IncompatibleSchemaError)
            assert {(p.field, p.version) for p in caught.value.problems} == {(field, 1), (field, 2)}
            # The registry agrees, and its versions did not grow.
            assert registry.test_compatibility(subject, Schema(bad, "AVRO")) is False
            assert registry.get_versions(subject) == [1, 2]
        # The level register_schemas pinned is enforced by the registry itself too.
        with pytest.raises(SchemaRegistryError) as refused:
            registry.register_schema(subject, Schema(_task_event_schema("tenant+region"), "AVRO"))
        assert refused.value.http_status_code == 409
        assert registry.get_versions(subject) == [1, 2]
        after: list[bytes] = []
        await asyncio.to_thread(
            read_to_end, kafka_bootstrap, topic, lambda m: after.append(m.value())
        )
        assert after == stored
        await old_side.close()


# -- c. two teams ---------------------------------------------------------------------------

SUMMARY_SCHEMA = json.dumps(
    {
        "type": "record",
        "name": "TaskSummary",
        "namespace": "teamb.billing.v1",
        "fields": [
            {"name": "task_name", "type": "string"},
            {"name": "succeeded", "type": "long"},
            {"name": "source_topic", "type": "string"},
        ],
    }
)


def _committed(admin: AdminClient, group: str) -> dict[tuple[str, int], int]:
    from confluent_kafka import ConsumerGroupTopicPartitions

    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    result = futures[group].result(timeout=30)
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions if tp.offset >= 0}


def _team_b_summarizes(
    bootstrap: str, registry_url: str, source_topic: str, prefix: str, expected: int
) -> tuple[Counter[str], set[str], int, str, str]:
    """Team B's own stage: count Succeeded per task name in A's events, publish a summary."""
    group = f"{prefix}billing.summary"
    summary_topic = f"{prefix}billing.task-summary"
    counts: Counter[str] = Counter()
    seen: set[str] = set()

    def handle(event: ForeignEvent) -> None:
        assert event.kind == "Succeeded"
        counts[event.envelope["task_name"]] += 1
        seen.add(event.task_id)

    decoded = consume_in_group(
        bootstrap,
        registry_url,
        source_topic,
        group,
        handle,
        kinds={"Succeeded"},
        until=lambda: sum(counts.values()) >= expected,
    )
    _create_topics(bootstrap, (summary_topic, 1))
    with SchemaRegistryClient({"url": registry_url, "timeout": 10}) as registry:
        serialize = AvroSerializer(registry, SUMMARY_SCHEMA)
        ctx = SerializationContext(summary_topic, MessageField.VALUE)
        key = StringSerializer()
        producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
        for name, count in sorted(counts.items()):
            value = {"task_name": name, "succeeded": count, "source_topic": source_topic}
            producer.produce(summary_topic, key=key(name), value=serialize(value, ctx))
        assert producer.flush(30) == 0
    return counts, seen, decoded, group, summary_topic


async def test_team_b_consumes_team_a_without_touching_its_groups(
    make_app: Callable[[str, str], QueueTasks], kafka_bootstrap: str, schema_registry_url: str
) -> None:
    app = make_app("orders", _unique("teama"))

    @app.task
    async def ship(order: int) -> str:
        return f"shipped {order}"

    @app.task
    async def bill(order: int) -> int:
        return order * 10

    @app.task
    async def reject(order: int) -> None:
        raise ValueError(f"order {order} rejected")

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    async with app:
        tasks = await asyncio.gather(
            *(app.add_task("ship", i, timeout=WAIT) for i in range(3)),
            *(app.add_task("bill", i, timeout=WAIT) for i in range(2)),
            app.add_task("reject", 9, timeout=WAIT),
        )
        # A task due now reaches its worker from the client directly: the scheduler folds
        # the events beside it and may commit its progress after the tasks have ended.
        await eventually(
            lambda: asyncio.to_thread(_committed, admin, app.topology.group("scheduler")),
            lambda committed: {t for t, _ in committed} == {app.topology.events},
            what="the scheduler committed its progress on the events topic",
            limit=WAIT,
        )
    done = {t.uuid: t for t in tasks if t is not None}
    assert sorted(t.status for t in done.values()) == ["error"] + ["success"] * 5
    succeeded = {u for u, t in done.items() if t.status == "success"}

    a_groups = [app.topology.group(stage) for stage in STAGES]
    before = {g: await asyncio.to_thread(_committed, admin, g) for g in a_groups}
    # A's stages committed their progress (on partitions that got records).
    assert {t for t, _ in before[app.topology.group("scheduler")]} == {app.topology.events}
    assert before[app.topology.group("worker")]

    team_b = _unique("teamb")
    counts, seen, decoded, b_group, summary_topic = await asyncio.to_thread(
        _team_b_summarizes,
        kafka_bootstrap,
        schema_registry_url,
        app.topology.events,
        team_b,
        len(succeeded),
    )
    # B saw every completion of A, decoding nothing but them (the kind header sufficed).
    assert counts == Counter({"ship": 3, "bill": 2})
    assert seen == succeeded
    assert decoded == len(succeeded)
    # B's progress lives in B's own group; A's groups are exactly as they were.
    assert b_group not in a_groups
    b_offsets = await asyncio.to_thread(_committed, admin, b_group)
    assert b_offsets and {topic for topic, _ in b_offsets} == {app.topology.events}
    after = {g: await asyncio.to_thread(_committed, admin, g) for g in a_groups}
    assert after == before
    # B's summary is in B's own topic, readable by anyone through the registry.
    summary = await asyncio.to_thread(
        read_values, kafka_bootstrap, schema_registry_url, summary_topic
    )
    assert {k: v["succeeded"] for k, v in summary} == {"ship": 3, "bill": 2}
    assert {v["source_topic"] for _, v in summary} == {app.topology.events}
