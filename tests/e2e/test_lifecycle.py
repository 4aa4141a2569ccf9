"""End to end on the embedded default: a QueueTasks with its default components (in-memory
event log, mock:// registry, memory view), every stage in this process, one test per path
of a task's life."""

from __future__ import annotations

import asyncio
import io
import json
import math
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

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
    current,
)
from qtasks_stream.errors import SerdeError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import (
    TERMINAL_KINDS,
    Started,
    Submitted,
    TaskEvent,
    WorkItem,
    now_us,
    task_id_ms,
)
from qtasks_stream.records import OutRecord, TopicPartition
from qtasks_stream.serde.schemas import load_schema_text
from qtasks_stream.stages.runner import DLQ_REASON, DLQ_SOURCE, DLQ_STAGE
from qtasks_stream.views.memory import MemoryViewStore
from qtasks_stream.views.sqlite import SqliteViewStore

LIMIT = 5.0
T = TypeVar("T")

# -- helpers ------------------------------------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    ok: Callable[[T], bool] = bool,
    *,
    what: str,
    limit: float = LIMIT,
) -> T:
    """Poll ``probe`` until ``ok`` holds for its value; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if ok(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit}s: {what} (last: {value!r})")
        await asyncio.sleep(0.01)


def memlog(app: QueueTasks) -> InMemoryEventLog:
    assert isinstance(app.event_log, InMemoryEventLog)
    return app.event_log


def log_events(app: QueueTasks, task_id: str | None = None) -> list[TaskEvent]:
    """The decodable events of the events topic (one task's, in log order, if given)."""
    topic = app.topology.events
    out = []
    for rec in memlog(app).records(topic):
        if rec.value is None or (task_id is not None and rec.key != task_id.encode()):
            continue
        try:
            out.append(TaskEvent.from_avro(app.serde.decode(topic, rec.value)))
        except SerdeError:
            continue
    return out


def terminal_counts(app: QueueTasks) -> Counter[str]:
    return Counter(e.task_id for e in log_events(app) if e.kind in TERMINAL_KINDS)


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
        lambda: app.get(task_id), lambda t: t is not None and t.final, what=f"{task_id} final"
    )
    assert task is not None
    return task


def kinds(events: list[TaskEvent]) -> list[str]:
    return [e.kind for e in events]


# -- success --------------------------------------------------------------------------------------


async def test_async_task_succeeds(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()

    @app.task(tags=["math"])
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    await app.start()
    submitted = await app.add_task("add", 2, 3)
    assert submitted is not None and submitted.status == "new"

    task = await app.wait(submitted.uuid, timeout=LIMIT)
    assert task is not None
    assert (task.uuid, task.status, task.returning, task.attempt) == (
        submitted.uuid,
        "success",
        5,
        1,
    )
    viewed = await finished(app, submitted.uuid)
    assert (viewed.status, viewed.returning, viewed.args, viewed.tags) == (
        "success",
        5,
        [2, 3],
        ["math"],
    )
    assert viewed.worker_id is not None and viewed.worker_id.startswith("worker:")
    assert [t.uuid for t in await app.query(status="success", task_name="add")] == [submitted.uuid]


async def test_sync_task_succeeds_in_a_thread(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    loop_thread = threading.get_ident()

    @app.task
    def greet(name: str, *, punctuation: str = "!") -> dict[str, Any]:
        return {
            "text": f"hello {name}{punctuation}",
            "in_thread": threading.get_ident() != loop_thread,
        }

    await app.start()
    task = await app.add_task("greet", "ada", punctuation="?", timeout=LIMIT)
    assert task is not None and task.status == "success"
    assert task.returning == {"text": "hello ada?", "in_thread": True}
    assert task.kwargs == {"punctuation": "?"}


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_generator_streams_progress(
    make_app: Callable[..., QueueTasks], flavour: str
) -> None:
    app = make_app()
    async_gate = asyncio.Event()
    sync_gate = threading.Event()

    if flavour == "async":

        @app.task(name="count")
        async def count_async(n: int) -> AsyncIterator[dict[str, int]]:
            await async_gate.wait()
            for i in range(n):
                yield {"i": i}
                await asyncio.sleep(0)

    else:

        @app.task(name="count")
        def count_sync(n: int) -> Any:
            assert sync_gate.wait(LIMIT)
            for i in range(n):
                yield {"i": i}

    await app.start()
    submitted = await app.add_task("count", 4)
    assert submitted is not None
    items: list[Any] = []

    async def collect() -> None:
        async for item in app.stream(submitted.uuid):
            items.append(item)

    collector = asyncio.create_task(collect())
    outcome = asyncio.create_task(app.wait(submitted.uuid, timeout=LIMIT))
    # The generator waits until the stream is listening: items produced before are not replayed.
    await eventually(
        lambda: submitted.uuid.encode() in app._results._watches, what="stream registered"
    )
    async_gate.set()
    sync_gate.set()
    async with asyncio.timeout(LIMIT):
        await collector
    assert items == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}]
    task = await outcome
    assert task is not None and task.status == "success"
    assert task.returning == items
    progress = [e for e in log_events(app, submitted.uuid) if e.kind == "Progress"]
    assert [e.payload.seq for e in progress] == [0, 1, 2, 3]  # type: ignore[union-attr]


async def test_echo_task_sees_its_context(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()

    @app.task(echo=True)
    async def report(self: Any, steps: int) -> dict[str, Any]:
        assert current() is self.ctx
        for step in range(steps):
            self.ctx.progress({"step": step, "of": steps})
        return {"id": self.ctx.task_id, "attempt": self.ctx.attempt, "name": self.ctx.task_name}

    await app.start()
    task = await app.add_task("report", 2, timeout=LIMIT)
    assert task is not None and task.status == "success", task
    assert task.returning == {"id": task.uuid, "attempt": 1, "name": "report"}
    progress = [e.payload for e in await app.history(task.uuid) if e.kind == "Progress"]
    assert [(p.seq, p.value) for p in progress] == [  # type: ignore[union-attr]
        (0, '{"step": 0, "of": 2}'),
        (1, '{"step": 1, "of": 2}'),
    ]


# -- retries and failures -------------------------------------------------------------------------


async def test_retry_then_success(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    seen: list[tuple[str, int]] = []

    @app.task(echo=True, retry=3, retry_on_exc=[OSError], retry_backoff=0.01)
    async def flaky(self: Any, failures: int) -> int:
        seen.append((self.ctx.task_id, self.ctx.attempt))
        if self.ctx.attempt <= failures:
            raise ConnectionError(f"attempt {self.ctx.attempt} lost the connection")
        return int(self.ctx.attempt)

    await app.start()
    task = await app.add_task("flaky", 2, timeout=LIMIT)
    assert task is not None and task.status == "success", task
    assert (task.returning, task.attempt, task.error_type) == (3, 3, None)
    assert seen == [(task.uuid, 1), (task.uuid, 2), (task.uuid, 3)]

    history = await app.history(task.uuid)
    assert kinds(history) == [
        "Submitted",
        "Scheduled",
        "Started",
        "RetryScheduled",
        "Released",
        "Started",
        "RetryScheduled",
        "Released",
        "Started",
        "Succeeded",
    ]
    assert {e.task_id for e in history} == {task.uuid}
    retries = [e for e in history if e.kind == "RetryScheduled"]
    assert [(e.attempt, e.payload.next_attempt) for e in retries] == [(1, 2), (2, 3)]  # type: ignore[union-attr]
    assert [e.attempt for e in history if e.kind == "Released"] == [2, 3]
    assert [e.attempt for e in history if e.kind == "Started"] == [1, 2, 3]
    assert retries[0].payload.error_type == "ConnectionError"  # type: ignore[union-attr]


async def test_failure_after_retries_are_exhausted(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    calls = 0

    @app.task(retry=2, retry_backoff=0.01)
    def parse(text: str) -> None:
        nonlocal calls
        calls += 1
        raise ValueError(f"cannot parse {text!r}")

    await app.start()
    task = await app.add_task("parse", "x1", timeout=LIMIT)
    assert task is not None and task.status == "error", task
    assert calls == 3 and task.attempt == 3
    assert task.error_type == "ValueError"
    assert task.error_message == "cannot parse 'x1'"
    assert task.traceback is not None
    assert "Traceback" in task.traceback and "in parse" in task.traceback
    assert task.traceback.rstrip().endswith("ValueError: cannot parse 'x1'")
    history = kinds(await app.history(task.uuid))
    assert history.count("RetryScheduled") == 2 and history[-1] == "Failed"
    viewed = await finished(app, task.uuid)
    assert (viewed.status, viewed.error_type, viewed.attempt) == ("error", "ValueError", 3)


async def test_max_time_times_out(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    interrupted: list[str] = []

    @app.task(max_time=0.1)
    async def sleepy() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            interrupted.append("sleepy")
            raise

    @app.task
    async def also_sleepy() -> None:
        await asyncio.sleep(30)

    await app.start()
    started = time.monotonic()
    task = await app.add_task("sleepy", timeout=LIMIT)
    per_call = await app.add_task("also_sleepy", max_time=0.1, timeout=LIMIT)
    assert time.monotonic() - started < 3
    for t in (task, per_call):
        assert t is not None and t.status == "timeout", t
        assert t.error_type == "TaskTimeout" and "max_time=0.1" in (t.error_message or "")
    assert interrupted == ["sleepy"]
    assert kinds(await app.history(task.uuid))[-1] == "TimedOut"  # type: ignore[union-attr]


# -- cancellation ---------------------------------------------------------------------------------


async def test_cancel_of_a_running_async_task(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    started = asyncio.Event()
    saw: list[str] = []

    @app.task
    async def long_job() -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            saw.append("CancelledError")
            raise
        return "finished anyway"

    await app.start()
    submitted = await app.add_task("long_job")
    assert submitted is not None
    outcome = asyncio.create_task(app.wait(submitted.uuid, timeout=LIMIT))
    async with asyncio.timeout(LIMIT):
        await started.wait()
    await app.cancel(submitted.uuid, "user gave up")
    task = await outcome
    assert task is not None and task.status == "cancel", task
    assert task.cancel_reason == "user gave up"
    assert saw == ["CancelledError"]
    history = kinds(await app.history(submitted.uuid))
    assert history[-1] == "Cancelled" and "CancelRequested" in history
    assert "Succeeded" not in history
    viewed = await finished(app, submitted.uuid)
    assert viewed.status == "cancel" and viewed.cancel_requested


async def test_cancel_of_a_delayed_task_before_it_runs(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    ran: list[str] = []

    @app.task
    async def reminder() -> None:
        ran.append("reminder")

    await app.start()
    countdown = 0.4
    submitted_at = time.monotonic()
    submitted = await app.add_task("reminder", countdown=countdown)
    assert submitted is not None
    await app.cancel(submitted.uuid, "not needed")
    task = await finished(app, submitted.uuid)
    assert time.monotonic() - submitted_at < countdown, "cancelled only after it was due"
    assert (task.status, task.cancel_reason) == ("cancel", "not needed")

    # Absence needs the due time to pass: sleep past it, then let every stage catch up.
    await asyncio.sleep(max(0.0, submitted_at + countdown + 0.1 - time.monotonic()))
    await settle(app)
    assert ran == []
    history = kinds(await app.history(submitted.uuid))
    # Scheduled is missing when the cancel arrived before the scheduler first looked.
    assert [k for k in history if k != "Scheduled"] == ["Submitted", "CancelRequested", "Cancelled"]
    assert history.count("Scheduled") <= 1 and history[-1] == "Cancelled"
    assert not [r for lane in app.topology.lane_topics for r in memlog(app).records(lane)]


# -- delays and priority ------------------------------------------------------------------------


async def test_countdown_and_eta_delay_the_start(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    started: dict[str, float] = {}

    @app.task
    async def stamp(label: str) -> None:
        started[label] = time.time()

    await app.start()
    before = time.time()
    by_countdown = await app.add_task("stamp", "countdown", countdown=0.3)
    by_eta = await app.add_task("stamp", "eta", eta=datetime.now(UTC) + timedelta(seconds=0.4))
    assert by_countdown is not None and by_eta is not None

    waiting = await eventually(
        lambda: app.get(by_eta.uuid),
        lambda t: t is not None and t.status == "scheduled",
        what="the delayed task shows as scheduled",
    )
    assert waiting is not None and waiting.due_at is not None
    assert waiting.due_at >= datetime.fromtimestamp(before + 0.4, UTC) - timedelta(milliseconds=1)
    assert "eta" not in started

    for task in (by_countdown, by_eta):
        assert (await finished(app, task.uuid)).status == "success"
    # 1 ms of slack for the microsecond rounding of the due time.
    assert started["countdown"] >= before + 0.3 - 0.001
    assert started["eta"] >= before + 0.4 - 0.001
    for task in (by_countdown, by_eta):
        assert kinds(await app.history(task.uuid))[:4] == [
            "Submitted",
            "Scheduled",
            "Released",
            "Started",
        ]


async def test_high_priority_overtakes_a_low_priority_backlog(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app(concurrency=1, poll_timeout=0.05)
    order: list[str] = []

    @app.task(priority=2)
    async def job(label: str) -> None:
        order.append(label)
        await asyncio.sleep(0.01)

    await app.start()
    backlog = 40
    for i in range(backlog):
        await app.add_task("job", f"low-{i}")
    await eventually(lambda: len(order), lambda n: n >= 1, what="the backlog is being worked on")
    urgent = await app.add_task("job", "urgent", priority=0, timeout=LIMIT)
    assert urgent is not None and urgent.status == "success"
    await eventually(lambda: len(order), lambda n: n == backlog + 1, what="the backlog finished")
    after = len(order) - 1 - order.index("urgent")
    assert after > backlog // 2, f"only {after} of {backlog} low-priority tasks ran after it"
    assert sorted(order) == sorted([*(f"low-{i}" for i in range(backlog)), "urgent"])


# -- submission -----------------------------------------------------------------------------------


async def test_idempotency_key_submits_once(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    charged: list[str] = []

    @app.task
    async def charge(order: str, amount: int) -> int:
        charged.append(order)
        return amount

    await app.start()
    first = await app.add_task("charge", "o-1", 10, idempotency_key="order-1")
    second = await app.add_task("charge", "o-1", 99, idempotency_key="order-1")
    other = await app.add_task("charge", "o-2", 5, idempotency_key="order-2")
    assert first is not None and second is not None and other is not None
    assert first.uuid == second.uuid != other.uuid

    task = await finished(app, first.uuid)
    assert (task.status, task.returning, task.args) == ("success", 10, ["o-1", 10])
    await finished(app, other.uuid)
    await settle(app)
    assert sorted(charged) == ["o-1", "o-2"]
    assert kinds(log_events(app, first.uuid)).count("Submitted") == 2
    assert kinds(log_events(app, first.uuid)).count("Started") == 1
    items = [
        r
        for lane in app.topology.lane_topics
        for r in memlog(app).records(lane)
        if r.key == first.uuid.encode()
    ]
    assert len(items) == 1

    # Submitting the key again after the end answers with the finished task.
    again = await app.add_task("charge", "o-1", 1, idempotency_key="order-1", timeout=LIMIT)
    assert again is not None and (again.uuid, again.status, again.returning) == (
        first.uuid,
        "success",
        10,
    )
    await settle(app)
    assert charged.count("o-1") == 1


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


async def test_garbage_in_the_events_topic_is_dead_lettered_and_the_pipeline_goes_on(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()

    @app.task
    async def ping() -> str:
        return "pong"

    await app.start()
    producer = app.event_log.producer()
    headers = (("origin", b"a test"),)
    await producer.send([OutRecord(app.topology.events, b"not-a-task", b"\x00garbage", headers)])

    dead = await eventually(
        lambda: memlog(app).records(app.topology.deadletter),
        lambda recs: len(recs) >= 1,
        what="a dead letter",
    )
    for rec in dead:
        assert (rec.key, rec.value) == (b"not-a-task", b"\x00garbage")
        assert rec.headers[:1] == headers
        extra = dict(rec.headers[1:])
        assert extra[DLQ_REASON].startswith(b"cannot decode")
        assert extra[DLQ_STAGE] in (b"scheduler", b"projector")
        assert extra[DLQ_SOURCE].startswith(f"{app.topology.events}/".encode())

    task = await app.add_task("ping", timeout=LIMIT)
    assert task is not None and (task.status, task.returning) == ("success", "pong")
    marked = await finished(app, "not-a-task")
    assert marked.status == "dead_letter"
    await settle(app)
    # Two stages gave up on the record; it is recorded once in the task's history.
    assert kinds(log_events(app, "not-a-task")) == ["DeadLettered"]


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


async def test_history_of_a_dead_lettered_key_skips_the_undecodable_record(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()
    await app.start()
    producer = app.event_log.producer()
    await producer.send([OutRecord(app.topology.events, b"bad-record", b"\x00junk")])
    await finished(app, "bad-record")
    # The record is kept in the dead-letter topic; the history shows what became of it.
    history = await app.history("bad-record")
    assert kinds(history) == ["DeadLettered"]


async def test_work_item_of_an_unregistered_task_ends_dead_lettered(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()

    @app.task
    async def registered() -> None:
        pass

    await app.start()
    task_id = str(uuid.uuid4())
    item = WorkItem(task_id, "ghost", 1, "[]", "{}", 1, now_us())
    lane = app.topology.lane(1)
    producer = app.event_log.producer()
    await producer.send([OutRecord(lane, task_id.encode(), app.serde.encode(lane, item.to_avro()))])

    task = await finished(app, task_id)
    assert task.status == "dead_letter"
    assert "unknown task 'ghost'" in (task.error_message or "")
    [event] = [e for e in log_events(app, task_id)]
    assert event.kind == "DeadLettered"
    assert event.payload.stage == "worker" and event.payload.source_topic == lane  # type: ignore[union-attr]


# -- history --------------------------------------------------------------------------------------


async def test_history_returns_the_events_in_order(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()

    @app.task
    def count(n: int) -> Any:
        yield from range(n)

    await app.start()
    task = await app.add_task("count", 2, timeout=LIMIT)
    assert task is not None and task.status == "success"
    history = await app.history(task.uuid)
    assert kinds(history) == [
        "Submitted",
        "Scheduled",
        "Started",
        "Progress",
        "Progress",
        "Succeeded",
    ]
    assert [e.attempt for e in history] == [0, 1, 1, 1, 1, 1]
    assert history[0].source == "client" and history[1].source == "scheduler"
    assert history[2].source.startswith("worker:")
    times = [e.at_us for e in history]
    assert times == sorted(times)
    assert len({e.event_id for e in history}) == len(history)
    assert history == log_events(app, task.uuid)
    assert await app.history(str(uuid.uuid4())) == []


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
    monkeypatch.setattr("qtasks_stream.app._HISTORY_CLOCK_MARGIN_MS", 0)
    ids = [e.event_id for e in await app.history(task_id)]
    assert ids[0] == submitted.event_id and early.event_id not in ids
    monkeypatch.setattr("qtasks_stream.app._HISTORY_CLOCK_MARGIN_MS", 60_000)
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


async def test_wait_returns_the_task_as_submitted(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()

    @app.task
    async def multiply(a: int, b: int, *, scale: int = 1) -> int:
        return a * b * scale

    await app.start()
    submitted = await app.add_task("multiply", 6, 7, scale=2, priority=1, tags=["math"])
    assert submitted is not None
    task = await app.wait(submitted.uuid, timeout=LIMIT)
    assert task is not None and (task.status, task.returning) == ("success", 84)
    assert (task.args, task.kwargs, task.priority, task.tags, task.created_at) == (
        [6, 7],
        {"scale": 2},
        1,
        ["math"],
        submitted.created_at,
    ), "wait() answered with a task that lost what was submitted"
    assert task == await finished(app, submitted.uuid)


async def test_wait_returns_a_task_that_just_ended(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    await app.start()
    task = await app.add_task("add", 1, 2, timeout=LIMIT)
    assert task is not None and task.status == "success"
    # The task has ended: waiting for it again must answer at once, not after the timeout.
    started = time.monotonic()
    again = await app.wait(task.uuid, timeout=2)
    assert again is not None, (
        f"wait() gave up after {time.monotonic() - started:.1f}s on a task that had ended"
    )
    assert (again.uuid, again.status, again.returning) == (task.uuid, "success", 3)


# -- restarts -------------------------------------------------------------------------------------


async def test_restart_ends_every_task_exactly_once(
    make_app: Callable[..., QueueTasks], tmp_path: Path
) -> None:
    log = InMemoryEventLog()
    registry = SchemaRegistryClient.new_client({"url": f"mock://restart-{uuid.uuid4().hex}"})
    view = SqliteViewStore(tmp_path / "view.sqlite")
    runs: Counter[str] = Counter()

    def build() -> QueueTasks:
        app = make_app("restart", event_log=log, schema_registry=registry, view=view, concurrency=2)

        @app.task
        async def slow(label: str) -> str:
            runs[label] += 1
            await asyncio.sleep(0.05)
            return label

        @app.task
        async def later(label: str) -> str:
            runs[label] += 1
            return label

        return app

    first = build()
    await first.start()
    countdown = 0.6
    submitted_at = time.monotonic()
    ids: dict[str, str] = {}
    for i in range(10):
        task = await first.add_task("slow", f"slow-{i}")
        assert task is not None
        ids[f"slow-{i}"] = task.uuid
    for i in range(3):
        task = await first.add_task("later", f"later-{i}", countdown=countdown)
        assert task is not None
        ids[f"later-{i}"] = task.uuid
    await eventually(lambda: sum(runs.values()), lambda n: n >= 3, what="a few tasks ran")
    async with asyncio.timeout(LIMIT):
        await first.close()
    assert time.monotonic() - submitted_at < countdown, "closed too late to test delayed tasks"

    ended = terminal_counts(first)
    outstanding = sorted(label for label, tid in ids.items() if ended[tid] == 0)
    assert any(label.startswith("slow") for label in outstanding), "nothing outstanding"
    assert all(f"later-{i}" in outstanding for i in range(3))

    second = build()
    await second.start()
    await eventually(
        lambda: terminal_counts(second),
        lambda counts: all(counts[tid] >= 1 for tid in ids.values()),
        what="every task ended",
    )
    await settle(second)

    ended = terminal_counts(second)
    assert {label: ended[tid] for label, tid in ids.items()} == dict.fromkeys(ids, 1)
    for label, tid in ids.items():
        events = log_events(second, tid)
        assert events[-1].kind == "Succeeded", (label, kinds(events))
        if label.startswith("later"):
            assert kinds(events).count("Released") == 1, (label, kinds(events))
    assert runs == Counter(dict.fromkeys(ids, 1))
    for tid in ids.values():
        assert (await finished(second, tid)).status == "success"


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
