"""End to end on the embedded default (in-memory event log, mock:// registry, memory view),
every stage in this process: checks that read the in-memory log directly, patch the process or
rebuild a view, and the helpers the other e2e tests share. The paths of a task's life run on
every backend, this one included, in ``tests/contract/test_lifecycle.py``."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import math
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from qtasks_stream import (
    ConfigurationError,
    QueueTasks,
    Router,
    Task,
    TaskQuery,
    UnknownTaskError,
)
from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import (
    Started,
    Submitted,
    TaskEvent,
    WorkItem,
    now_us,
    task_id_ms,
)
from qtasks_stream.records import OutRecord, TopicPartition
from qtasks_stream.serde.schemas import load_schema_text
from qtasks_stream.views.memory import MemoryViewStore
from tests import e2ehelpers
from tests.e2ehelpers import decodable_events, kinds

LIMIT = 5.0

# -- helpers ------------------------------------------------------------------------------------


#: :func:`tests.e2ehelpers.eventually` with this suite's limit (``limit=`` still overrides it).
eventually = functools.partial(e2ehelpers.eventually, limit=LIMIT)


def memlog(app: QueueTasks) -> InMemoryEventLog:
    assert isinstance(app.event_log, InMemoryEventLog)
    return app.event_log


def log_events(app: QueueTasks, task_id: str | None = None) -> list[TaskEvent]:
    """The decodable events of the events topic (one task's, in log order, if given)."""
    return decodable_events(app, memlog(app).records(app.topology.events), task_id)


def ends(log: InMemoryEventLog, topic: str) -> dict[TopicPartition, int]:
    sizes = Counter(r.partition for r in log.records(topic))
    return {TopicPartition(topic, p): n for p, n in sizes.items()}


def quiet(app: QueueTasks) -> bool:
    """Every running stage has committed every record of its topics (nothing in flight)."""
    log = memlog(app)
    for runner in app.runners.values():
        committed = log.committed(runner.group)
        for topic in runner.stage.topics:
            for tp, end in ends(log, topic).items():
                if committed.get(tp, 0) != end:
                    return False
    return True


async def settle(app: QueueTasks) -> None:
    await eventually(lambda: quiet(app), what="every stage caught up with the log")


async def finished(app: QueueTasks, task_id: str) -> Task:
    """The task once the view shows it final."""
    task = await eventually(
        lambda: app.view.get(task_id, payloads=app.payloads),
        lambda t: t is not None and t.final,
        what=f"{task_id} final",
    )
    assert task is not None
    return task


# -- submission -----------------------------------------------------------------------------------


async def test_unknown_task_name_raises_at_the_call(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()

    @app.task
    async def known() -> None:
        pass

    await app.start()
    with pytest.raises(UnknownTaskError, match=r"no task named 'unknown' \(registered: known\)"):
        await app.add_task("unknown", 1)
    assert log_events(app) == []


async def test_non_json_argument_is_refused_before_anything_is_written(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()

    @app.task
    async def store(key: str, value: Any = None, **extra: Any) -> None:
        pass

    await app.start()
    with pytest.raises(
        ConfigurationError, match=r"argument 1 of task 'store' cannot be sent as JSON"
    ):
        await app.add_task("store", "k", object())
    with pytest.raises(ConfigurationError, match=r"keyword argument 'when' of task 'store'"):
        await app.add_task("store", "k", when=datetime.now(UTC))
    with pytest.raises(ConfigurationError, match=r"argument 1 of task 'store'"):
        await app.add_task("store", "k", math.nan)
    assert memlog(app).records(app.topology.events) == []
    ok = await app.add_task("store", "k", {"nested": [1, 2]}, timeout=LIMIT)
    assert ok is not None and ok.status == "success"


async def test_include_router(make_app: Callable[..., QueueTasks]) -> None:
    router = Router()

    @router.task(priority=1, tags=["billing"])
    async def invoice(amount: int) -> int:
        return amount * 2

    with pytest.raises(ConfigurationError, match="not yet included"):
        await invoice.add_task(1)
    app = make_app()
    app.include_router(router)
    with pytest.raises(ConfigurationError, match="already registered"):
        app.include_router(router)
    await app.start()

    by_handle = await invoice.add_task(21, timeout=LIMIT)
    by_name = await app.add_task("invoice", 5, timeout=LIMIT)
    assert by_handle is not None and by_name is not None
    assert (by_handle.status, by_handle.returning) == ("success", 42)
    assert (by_name.status, by_name.returning) == ("success", 10)
    viewed = await finished(app, by_handle.uuid)
    assert (viewed.priority, viewed.tags) == (1, ["billing"])
    assert await invoice(3) == 6  # calling the handle runs the function itself


# -- dead letters ---------------------------------------------------------------------------------


class RegistryDown:
    """Makes ``registry`` fail its next ``failures`` schema fetches as a network would."""

    def __init__(self, registry: SchemaRegistryClient, failures: int) -> None:
        self.get, self.failures, self.refused = registry.get_schema, failures, 0
        registry.get_schema = self  # type: ignore[method-assign]

    def __call__(self, schema_id: int, *args: Any, **kwargs: Any) -> Any:
        if self.refused < self.failures:
            self.refused += 1
            raise ConnectionRefusedError(111, "Connection refused")
        return self.get(schema_id, *args, **kwargs)


async def test_a_registry_outage_delays_a_record_and_dead_letters_nothing(
    make_app: Callable[..., QueueTasks],
) -> None:
    registry = SchemaRegistryClient.new_client({"url": f"mock://outage-{uuid.uuid4().hex}"})
    app = make_app(schema_registry=registry)

    @app.task
    async def ping() -> str:
        return "pong"

    await app.start()
    # Another team's client writes with version 2 of the events schema (one more field):
    # the stages must fetch that writer schema, and the registry is down for a while.
    v2 = json.loads(load_schema_text("TaskEvent"))
    v2["fields"].append({"name": "region", "type": ["null", "string"], "default": None})
    subject = f"{app.topology.events}-value"
    v2_id = registry.register_schema(subject, Schema(json.dumps(v2), "AVRO"))
    flaky = RegistryDown(registry, failures=3)
    event = TaskEvent.new(str(uuid.uuid4()), "ping", 0, "client", Submitted("[]", "{}", 0))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(v2), {**event.to_avro(), "region": "eu"})
    value = struct.pack(">bI", 0, v2_id) + body.getvalue()
    await app.event_log.producer().send(
        [OutRecord(app.topology.events, event.task_id.encode(), value, event.record_headers())]
    )

    task = await finished(app, event.task_id)
    assert (task.status, task.returning) == ("success", "pong")
    assert flaky.refused == 3, "the registry was never asked while it was down"
    await settle(app)
    assert memlog(app).records(app.topology.deadletter) == [], "a fine record was dead-lettered"
    assert kinds(log_events(app, event.task_id)) == [
        "Submitted",
        "Scheduled",
        "Started",
        "Succeeded",
    ]


async def test_work_item_of_an_unregistered_task_ends_dead_lettered(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()

    @app.task
    async def registered() -> None:
        pass

    # Put back in its lane for a worker that knows it, then dead-lettered past the deadline.
    app.unknown_task_deadline = 0.3
    await app.start()
    task_id = str(uuid.uuid4())
    item = WorkItem(task_id, "ghost", 1, "[]", "{}", 1, now_us())
    lane = app.topology.lane(1)
    producer = app.event_log.producer()
    await producer.send([OutRecord(lane, task_id.encode(), app.serde.encode(lane, item.to_avro()))])

    task = await finished(app, task_id)
    assert task.status == "dead_letter"
    assert "unknown_task: unknown task 'ghost'" in (task.error_message or "")
    assert "since it was first refused (unknown_task_deadline 0.3s)" in (task.error_message or "")
    assert len([r for r in app.event_log.records(lane) if r.key == task_id.encode()]) == 2
    [event] = [e for e in log_events(app, task_id)]
    assert event.kind == "DeadLettered"
    assert event.payload.stage == "worker" and event.payload.source_topic == lane  # type: ignore[union-attr]


# -- history --------------------------------------------------------------------------------------


async def test_task_ids_carry_their_time_and_a_history_read_starts_there(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()

    @app.task
    async def noop() -> None:
        return None

    await app.start()
    task = await app.add_task("noop", timeout=LIMIT)
    assert task is not None and uuid.UUID(task.uuid).version == 7
    assert abs(task_id_ms(task.uuid) - task.created_at.timestamp() * 1000) < 1000  # type: ignore[operator]
    # A record under the id's key from before the id's time is before where the read starts
    # (without the clock margin); with the margin it is read too.
    key_ms = time.time_ns() // 1_000_000 + 30
    text = f"{key_ms << 80 | 0x7000_8000_0000_0000_0000:032x}"
    task_id = f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
    assert task_id_ms(task_id) == key_ms
    early = TaskEvent.new(task_id, "noop", 1, "test", Started("early"))
    submitted = TaskEvent.new(task_id, "noop", 0, "test", Submitted("[]", "{}", 0))
    producer = app.event_log.producer()
    for event in (early, submitted):
        value = app.serde.encode(app.topology.events, event.to_avro())
        await producer.send([OutRecord(app.topology.events, task_id.encode(), value)])
        await asyncio.sleep(0.06)  # the early one is appended before key_ms, the other after
    await finished(app, task_id)
    monkeypatch.setattr("qtasks_stream.client._HISTORY_CLOCK_MARGIN_MS", 0)
    ids = [e.event_id for e in await app.history(task_id)]
    assert ids[0] == submitted.event_id and early.event_id not in ids
    monkeypatch.setattr("qtasks_stream.client._HISTORY_CLOCK_MARGIN_MS", 60_000)
    assert [e.event_id for e in await app.history(task_id)][:2] == [early.event_id, ids[0]]


async def test_close_returns_promptly_after_results_were_awaited(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()

    @app.task
    async def noop() -> None:
        pass

    await app.start()
    for _ in range(3):
        task = await app.add_task("noop", timeout=LIMIT)
        assert task is not None and task.status == "success"
    async with asyncio.timeout(3):
        await app.close()


@dataclass
class GatedTask:
    """A started app whose task ``multiply(6, 7)`` (tags ``math``) waits for :meth:`finish`."""

    app: QueueTasks
    gate: asyncio.Event
    submitted: Task

    async def finish(self) -> None:
        """Let the task end, and wait until the result listener has seen it end (Started,
        Succeeded: not the Submitted with the arguments)."""
        self.gate.set()
        watches, key = self.app._results._watches, self.submitted.uuid.encode()

        def seen_ended() -> bool:
            state = watches[key].state if key in watches else None
            return key not in watches or (state is not None and state.final)

        await eventually(seen_ended, what="the listener saw the end")

    def assert_as_submitted(self, task: Task | None) -> None:
        assert task is not None and (task.status, task.returning) == ("success", 42)
        expected = ([6, 7], ["math"], self.submitted.created_at)
        assert (task.args, task.tags, task.created_at) == expected


async def gated_multiply(make_app: Callable[..., QueueTasks]) -> GatedTask:
    app = make_app()
    gate = asyncio.Event()

    @app.task
    async def multiply(a: int, b: int) -> int:
        await gate.wait()
        return a * b

    await app.start()
    submitted = await app.add_task("multiply", 6, 7, tags=["math"])
    assert submitted is not None
    return GatedTask(app, gate, submitted)


async def test_wait_keeps_what_was_submitted_when_the_task_ends_during_its_history_read(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    gated = await gated_multiply(make_app)
    read = gated.app._history_events

    async def slow_read(uuid: str, **options: Any) -> list[TaskEvent]:
        # On Kafka the read takes a while: the task ends, and the listener sees its end
        # before it returns.
        events = await read(uuid, **options)
        await gated.finish()
        return events

    monkeypatch.setattr(gated.app, "_history_events", slow_read)
    gated.assert_as_submitted(await gated.app.wait(gated.submitted.uuid, timeout=LIMIT))


async def test_a_failed_history_read_of_one_wait_does_not_cut_another_short(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two waits on one task; the first one's history read fails while the second one's is
    under way, and then the task ends: the second still gets the task as submitted."""
    gated = await gated_multiply(make_app)
    app, uuid_ = gated.app, gated.submitted.uuid
    read = app._history_events
    second_reads = asyncio.Event()
    first: asyncio.Task[Task | None] | None = None

    async def reads(uuid: str, **options: Any) -> list[TaskEvent]:
        if asyncio.current_task() is first:
            await second_reads.wait()
            raise EventLogError("the broker went away")
        second_reads.set()
        events = await read(uuid, **options)
        await eventually(lambda: first is not None and first.done(), what="the first wait failed")
        await gated.finish()
        return events

    monkeypatch.setattr(app, "_history_events", reads)
    first = asyncio.create_task(app.wait(uuid_, timeout=LIMIT))
    await asyncio.sleep(0)  # the first wait registers and starts its read
    task = await app.wait(uuid_, timeout=LIMIT)
    with pytest.raises(EventLogError, match="went away"):
        await first
    gated.assert_as_submitted(task)


# -- restarts -------------------------------------------------------------------------------------


async def test_dead_letter_is_recorded_once_across_a_restart(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    registry = SchemaRegistryClient.new_client({"url": f"mock://dlq-{uuid.uuid4().hex}"})

    def build() -> QueueTasks:
        app = make_app("dlq-restart", event_log=log, schema_registry=registry)

        @app.task
        async def ping() -> str:
            return "pong"

        return app

    first = build()
    await first.start()
    producer = log.producer()
    await producer.send([OutRecord(first.topology.events, b"broken-task", b"\x00\x01garbage")])
    await eventually(
        lambda: kinds(log_events(first, "broken-task")),
        lambda k: k == ["DeadLettered"],
        what="the record dead-lettered",
    )
    await settle(first)
    async with asyncio.timeout(LIMIT):
        await first.close()

    second = build()
    await second.start()
    task = await second.add_task("ping", timeout=LIMIT)
    assert task is not None and task.status == "success"
    await settle(second)
    assert kinds(log_events(second, "broken-task")) == ["DeadLettered"], (
        "the same undecodable record was dead-lettered again after the restart"
    )


async def test_view_rebuilt_from_the_log_equals_the_live_view(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    registry = SchemaRegistryClient.new_client({"url": f"mock://rebuild-{uuid.uuid4().hex}"})
    live = MemoryViewStore()
    app = make_app("rebuild", event_log=log, schema_registry=registry, view=live)

    @app.task(retry=1, retry_backoff=0.01, echo=True)
    async def flaky(self: Any, fail: bool) -> int:
        self.ctx.progress("trying")
        if fail and self.ctx.attempt == 1:
            raise OSError("first attempt fails")
        return int(self.ctx.attempt)

    @app.task
    def broken() -> None:
        raise KeyError("missing")

    @app.task
    async def forever() -> None:
        await asyncio.sleep(30)

    await app.start()
    ids = []
    for fail in (False, True):
        task = await app.add_task("flaky", fail, tags=["t"])
        assert task is not None
        ids.append(task.uuid)
    for name, options in [
        ("broken", {}),
        ("forever", {"max_time": 0.05}),
        ("forever", {"countdown": 5}),
    ]:
        task = await app.add_task(name, **options)
        assert task is not None
        ids.append(task.uuid)
    await app.cancel(ids[-1], "changed my mind")
    ids.append((await app.add_task("flaky", False, idempotency_key="same")).uuid)  # type: ignore[union-attr]
    await app.add_task("flaky", True, idempotency_key="same")
    statuses = [(await finished(app, tid)).status for tid in ids]
    assert statuses == ["success", "success", "error", "timeout", "cancel", "success"]
    await settle(app)
    async with asyncio.timeout(LIMIT):
        await app.close()

    fresh = MemoryViewStore()
    rebuilt = make_app("rebuild", event_log=log, schema_registry=registry, view=fresh)
    await rebuilt.start(stages=["projector"])
    target = ends(log, app.topology.events)
    await eventually(fresh.positions, lambda p: p == target, what="the rebuild reached the end")

    everything = TaskQuery(limit=10_000)
    live_ids = sorted(t.uuid for t in await live.query(everything))
    assert sorted(t.uuid for t in await fresh.query(everything)) == live_ids
    assert set(ids) <= set(live_ids)
    for tid in live_ids:
        assert await fresh.state(tid) == await live.state(tid), tid
    assert await fresh.counts() == await live.counts()
    assert await fresh.positions() == await live.positions()
