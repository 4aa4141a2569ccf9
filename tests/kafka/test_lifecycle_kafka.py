"""The lifecycle paths of ``tests/e2e/test_lifecycle.py``, on the real broker and registry.

Each test runs on both Kafka event logs (aiokafka and confluent-kafka), on a topic prefix
of its own, with a real schema registry client. Starting consumer groups on Kafka costs
seconds, so one app (every stage in this process) serves several paths at once; each path
keeps its own, named assertions. Where a test must know that a stage has *passed* a record
(not merely that nothing happened yet), it reads the stage's committed offset from the
broker instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import confluent_kafka as ck
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks, Task
from qtasks_stream.errors import SerdeError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog
from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from qtasks_stream.events import TERMINAL_KINDS, TaskEvent
from qtasks_stream.records import OutRecord, Record, TopicPartition
from qtasks_stream.stages.runner import DLQ_ERROR, DLQ_REASON, DLQ_SOURCE, DLQ_STAGE
from tests.eventlogs import kafka_test_config

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

#: Bound of every wait for one outcome on the broker.
LIMIT = 30.0
T = TypeVar("T")


# -- environment ----------------------------------------------------------------------------


@dataclass
class KafkaEnv:
    """One test's broker setup: backend, unique prefix, registry client, the apps it built."""

    kind: str
    bootstrap: str
    registry: SchemaRegistryClient
    prefix: str
    apps: list[QueueTasks] = field(default_factory=list)
    logs: list[EventLog] = field(default_factory=list)

    def event_log(self) -> EventLog:
        config = kafka_test_config(self.bootstrap)
        log: EventLog = (
            AioKafkaEventLog(config) if self.kind == "aiokafka" else ConfluentEventLog(config)
        )
        self.logs.append(log)
        return log

    def app(self, name: str = "lc", **options: Any) -> QueueTasks:
        """A QueueTasks on this test's prefix, with an event log of its own."""
        options.setdefault("poll_timeout", 0.1)
        app = QueueTasks(
            name,
            event_log=self.event_log(),
            schema_registry=self.registry,
            topic_prefix=self.prefix,
            **options,
        )
        self.apps.append(app)
        return app


@pytest.fixture(params=["aiokafka", "confluent"])
async def env(
    request: pytest.FixtureRequest, kafka_bootstrap: str, schema_registry_url: str
) -> AsyncIterator[KafkaEnv]:
    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as registry:
        kafka = KafkaEnv(request.param, kafka_bootstrap, registry, f"lc{uuid.uuid4().hex[:8]}.")
        try:
            yield kafka
        finally:
            # Bounded, and every app and log gets its turn even when one fails to close.
            async with contextlib.AsyncExitStack() as stack:
                for log in kafka.logs:
                    stack.push_async_callback(_bounded, log.close())
                for app in kafka.apps:
                    stack.push_async_callback(_bounded, app.close())


async def _bounded(closing: Awaitable[None]) -> None:
    async with asyncio.timeout(LIMIT):
        await closing


# -- helpers --------------------------------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    ok: Callable[[T], bool] = bool,
    *,
    what: str,
    limit: float = LIMIT,
    interval: float = 0.05,
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
        await asyncio.sleep(interval)


async def finished(app: QueueTasks, task_id: str) -> Task:
    """The task once the app's view shows it final."""
    task = await eventually(
        lambda: app.get(task_id), lambda t: t is not None and t.final, what=f"{task_id} final"
    )
    assert task is not None
    return task


async def outcome(app: QueueTasks, task_id: str) -> Task:
    task = await app.wait(task_id, timeout=LIMIT)
    assert task is not None, f"{task_id} did not end within {LIMIT}s"
    return task


async def read_topic(app: QueueTasks, topic: str, *, limit: float = LIMIT) -> list[Record]:
    """Every committed record of ``topic``, read to the end offsets known at the call.

    The end is judged by the consumer's position, not by the last offset delivered: a
    transactional partition ends with a commit marker that is never delivered.
    """
    consumer = app.event_log.consumer([topic], group_id=None, start="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(app.topology.partitions)]
        ends = await consumer.end_offsets(tps)
        records: list[Record] = []
        deadline = time.monotonic() + limit
        while True:
            positions = {tp: await consumer.position(tp) or 0 for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                return records
            assert time.monotonic() < deadline, f"could not read {topic} to {ends}: {positions}"
            records.extend(await consumer.poll(max_records=5000, timeout=0.5))
    finally:
        await consumer.close()


def decode_events(app: QueueTasks, records: list[Record]) -> list[TaskEvent]:
    """The decodable TaskEvents among ``records`` (garbage is left out), in their order."""
    topic = app.topology.events
    events = []
    for rec in records:
        try:
            events.append(TaskEvent.from_avro(app.serde.decode(topic, rec.value or b"")))
        except SerdeError:
            continue
    return events


async def log_events(app: QueueTasks, task_id: str | None = None) -> list[TaskEvent]:
    """The events of the events topic as the broker has them (one task's, if given)."""
    records = await read_topic(app, app.topology.events)
    if task_id is not None:
        records = [r for r in records if r.key == task_id.encode()]
    return decode_events(app, records)


def kinds(events: list[TaskEvent]) -> list[str]:
    return [e.kind for e in events]


def _committed_offset(bootstrap: str, group: str, tp: TopicPartition) -> int:
    # A consumer that never subscribes does not join the group: it only reads its offsets.
    consumer = ck.Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        [found] = consumer.committed([ck.TopicPartition(tp.topic, tp.partition)], timeout=10)
        return int(found.offset)
    finally:
        consumer.close()


async def stage_passed(
    app: QueueTasks, bootstrap: str, stage: str, tp: TopicPartition, offset: int
) -> None:
    """Wait until ``stage``'s group committed past ``offset`` of ``tp``: it handled the record
    (and everything its transaction emitted for it is visible)."""
    group = app.topology.group(stage)
    await eventually(
        lambda: asyncio.to_thread(_committed_offset, bootstrap, group, tp),
        lambda committed: committed > offset,
        what=f"{group} committed past {tp.topic}/{tp.partition}/{offset}",
        interval=0.2,
    )


def _read_deadletters(bootstrap: str, topic: str, want: int, limit: float) -> list[Any]:
    """Dead letters read with a plain consumer (read_committed): at least ``want``, then
    everything else up to the end of each partition, so extra ones show up too."""
    consumer = ck.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"lc-dlq-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        tps = [ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in partitions]
        consumer.assign(tps)
        got: list[Any] = []
        deadline = time.monotonic() + limit
        while len(got) < want:
            assert time.monotonic() < deadline, f"only {len(got)} of {want} dead letters"
            msg = consumer.poll(0.2)
            if msg is not None:
                assert msg.error() is None, msg.error()
                got.append(msg)
        ends = {
            p: consumer.get_watermark_offsets(ck.TopicPartition(topic, p))[1] for p in partitions
        }
        while True:
            positions = consumer.position([ck.TopicPartition(topic, p) for p in partitions])
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in positions):
                return got
            assert time.monotonic() < deadline, f"could not read {topic} to its end {ends}"
            msg = consumer.poll(0.2)
            if msg is not None:
                assert msg.error() is None, msg.error()
                got.append(msg)
    finally:
        consumer.close()


# -- outcomes: success, retries, failure, timeout, idempotency, history, streaming -----------


async def test_task_outcomes_on_kafka(env: KafkaEnv) -> None:
    app = env.app()
    loop_thread = threading.get_ident()
    flaky_seen: list[tuple[str, int]] = []
    parse_calls: list[str] = []
    interrupted: list[str] = []
    charged: list[str] = []
    gate = asyncio.Event()

    @app.task(tags=["math"])
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    @app.task
    def greet(name: str, *, punctuation: str = "!") -> dict[str, Any]:
        return {
            "text": f"hello {name}{punctuation}",
            "in_thread": threading.get_ident() != loop_thread,
        }

    @app.task(echo=True, retry=3, retry_on_exc=[OSError], retry_backoff=0.05)
    async def flaky(self: Any, failures: int) -> int:
        flaky_seen.append((self.ctx.task_id, self.ctx.attempt))
        if self.ctx.attempt <= failures:
            raise ConnectionError(f"attempt {self.ctx.attempt} lost the connection")
        return int(self.ctx.attempt)

    @app.task(retry=2, retry_backoff=0.05)
    def parse(text: str) -> None:
        parse_calls.append(text)
        raise ValueError(f"cannot parse {text!r}")

    @app.task(max_time=0.5)
    async def sleepy() -> None:
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            interrupted.append("sleepy")
            raise

    @app.task
    async def charge(order: str, amount: int) -> int:
        charged.append(order)
        return amount

    @app.task
    def count(n: int) -> Any:
        yield from range(n)

    @app.task
    async def ticker(n: int) -> AsyncIterator[dict[str, int]]:
        await gate.wait()
        for i in range(n):
            yield {"i": i}
            await asyncio.sleep(0)

    await app.start()

    # Generator progress streaming: the generator waits until the stream listens.
    streamed = await app.add_task("ticker", 4)
    assert streamed is not None
    items: list[Any] = []

    async def collect() -> None:
        async for item in app.stream(streamed.uuid):
            items.append(item)

    collector = asyncio.create_task(collect())
    streamed_outcome = asyncio.create_task(app.wait(streamed.uuid, timeout=LIMIT))
    watches = app._results._watches
    key = streamed.uuid.encode()
    await eventually(
        lambda: key in watches and bool(watches[key].queues), what="the stream listens"
    )
    gate.set()

    # Every other path runs meanwhile, each waited for through its completion event.
    (
        async_ok,
        sync_ok,
        retried,
        failed,
        timed_out,
        per_call_timeout,
        counted,
    ) = await asyncio.gather(
        app.add_task("add", 2, 3, timeout=LIMIT),
        app.add_task("greet", "ada", punctuation="?", timeout=LIMIT),
        app.add_task("flaky", 2, timeout=LIMIT),
        app.add_task("parse", "x1", timeout=LIMIT),
        app.add_task("sleepy", timeout=LIMIT),
        app.add_task("sleepy", max_time=0.3, timeout=LIMIT),
        app.add_task("count", 2, timeout=LIMIT),
    )
    first = await app.add_task("charge", "o-1", 10, idempotency_key="order-1")
    second = await app.add_task("charge", "o-1", 99, idempotency_key="order-1")
    other = await app.add_task("charge", "o-2", 5, idempotency_key="order-2")

    # -- success, async and sync
    assert async_ok is not None and (async_ok.status, async_ok.returning, async_ok.attempt) == (
        "success",
        5,
        1,
    ), async_ok
    viewed = await finished(app, async_ok.uuid)
    assert (viewed.status, viewed.returning, viewed.args, viewed.tags) == (
        "success",
        5,
        [2, 3],
        ["math"],
    )
    assert viewed.worker_id is not None and viewed.worker_id.startswith("worker:")
    assert sync_ok is not None and sync_ok.status == "success", sync_ok
    assert sync_ok.returning == {"text": "hello ada?", "in_thread": True}
    assert sync_ok.kwargs == {"punctuation": "?"}

    # -- retry then success: same task id, attempts 1..3, RetryScheduled then Released
    assert retried is not None and retried.status == "success", retried
    assert (retried.returning, retried.attempt, retried.error_type) == (3, 3, None)
    assert flaky_seen == [(retried.uuid, 1), (retried.uuid, 2), (retried.uuid, 3)]
    history = await app.history(retried.uuid)
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
    assert {e.task_id for e in history} == {retried.uuid}
    retries = [e for e in history if e.kind == "RetryScheduled"]
    assert [(e.attempt, e.payload.next_attempt) for e in retries] == [(1, 2), (2, 3)]  # type: ignore[union-attr]
    assert [e.attempt for e in history if e.kind == "Released"] == [2, 3]
    assert [e.attempt for e in history if e.kind == "Started"] == [1, 2, 3]
    assert retries[0].payload.error_type == "ConnectionError"  # type: ignore[union-attr]

    # -- failure once the retries are exhausted
    assert failed is not None and failed.status == "error", failed
    assert parse_calls == ["x1"] * 3 and failed.attempt == 3
    assert (failed.error_type, failed.error_message) == ("ValueError", "cannot parse 'x1'")
    assert failed.traceback is not None and "in parse" in failed.traceback
    failed_history = kinds(await app.history(failed.uuid))
    assert failed_history.count("RetryScheduled") == 2 and failed_history[-1] == "Failed"

    # -- max_time: the definition's and a per-call one
    for t, limit in ((timed_out, 0.5), (per_call_timeout, 0.3)):
        assert t is not None and t.status == "timeout", t
        assert t.error_type == "TaskTimeout" and f"max_time={limit}" in (t.error_message or "")
        assert kinds(await app.history(t.uuid))[-1] == "TimedOut"
    assert interrupted == ["sleepy", "sleepy"], "the timed-out bodies were not interrupted"

    # -- history, in order, equal to the log itself
    assert counted is not None and counted.status == "success", counted
    counted_history = await app.history(counted.uuid)
    assert kinds(counted_history) == [
        "Submitted",
        "Scheduled",
        "Started",
        "Progress",
        "Progress",
        "Succeeded",
    ]
    assert [e.attempt for e in counted_history] == [0, 1, 1, 1, 1, 1]
    assert counted_history[0].source == "client" and counted_history[1].source == "scheduler"
    assert counted_history[2].source.startswith("worker:")
    stamps = [e.at_us for e in counted_history]
    assert stamps == sorted(stamps)
    assert len({e.event_id for e in counted_history}) == len(counted_history)
    assert counted_history == await log_events(app, counted.uuid)
    assert await app.history(str(uuid.uuid4())) == []

    # -- generator progress streaming
    async with asyncio.timeout(LIMIT):
        await collector
    assert items == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}]
    ticked = await streamed_outcome
    assert ticked is not None and (ticked.status, ticked.returning) == ("success", items)
    progress = [e for e in await app.history(streamed.uuid) if e.kind == "Progress"]
    assert [e.payload.seq for e in progress] == [0, 1, 2, 3]  # type: ignore[union-attr]

    # -- idempotency key: same uuid, the body runs once
    assert first is not None and second is not None and other is not None
    assert first.uuid == second.uuid != other.uuid
    charged_task = await finished(app, first.uuid)
    assert (charged_task.status, charged_task.returning, charged_task.args) == (
        "success",
        10,
        ["o-1", 10],
    )
    await finished(app, other.uuid)
    # The scheduler has handled the repeated Submitted: its group committed past it.
    records = await read_topic(app, app.topology.events)
    repeat = [r for r in records if r.key == first.uuid.encode()]
    submits = [
        r for r, e in zip(repeat, decode_events(app, repeat), strict=True) if e.kind == "Submitted"
    ]
    assert len(submits) == 2
    await stage_passed(app, env.bootstrap, "scheduler", submits[-1].tp, submits[-1].offset)
    assert sorted(charged) == ["o-1", "o-2"]
    once = kinds(await log_events(app, first.uuid))
    assert once.count("Submitted") == 2 and once.count("Started") == 1, once
    lane_items = [
        r
        for lane in app.topology.lane_topics
        for r in await read_topic(app, lane)
        if r.key == first.uuid.encode()
    ]
    assert len(lane_items) == 1, "the repeated submit put a second work item in a lane"
    again = await app.add_task("charge", "o-1", 1, idempotency_key="order-1", timeout=LIMIT)
    assert again is not None and (again.uuid, again.status, again.returning) == (
        first.uuid,
        "success",
        10,
    )
    assert charged.count("o-1") == 1


# -- cancellation and delays ----------------------------------------------------------------

#: A delayed task is cancelled well before this; the test then waits past it. Generous,
#: because a loaded CI box may take seconds between the submit and the cancel.
CANCEL_COUNTDOWN = 8.0
COUNTDOWN = 2.0


async def test_cancel_and_countdown_on_kafka(env: KafkaEnv) -> None:
    app = env.app()
    running_started = asyncio.Event()
    saw: list[str] = []
    reminders: list[float] = []
    stamps: dict[str, float] = {}

    @app.task
    async def long_job() -> str:
        running_started.set()
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            saw.append("CancelledError")
            raise
        return "finished anyway"

    @app.task
    async def reminder() -> None:
        reminders.append(time.time())

    @app.task
    async def stamp(label: str) -> None:
        stamps[label] = time.time()

    await app.start()
    warm = await app.add_task("stamp", "warm-up", timeout=LIMIT)
    assert warm is not None and warm.status == "success", "the pipeline never came up"
    # The result comes by the listener; the view below is the projector's, which may still
    # be joining its group. Wait for it too, or the countdown runs out while it catches up.
    await finished(app, warm.uuid)

    before = time.time()
    delayed = await app.add_task("reminder", countdown=CANCEL_COUNTDOWN)
    by_countdown = await app.add_task("stamp", "countdown", countdown=COUNTDOWN)
    running = await app.add_task("long_job")
    assert delayed is not None and by_countdown is not None and running is not None

    # -- cancel of a delayed task before it runs
    waiting = await eventually(
        lambda: app.get(delayed.uuid),
        lambda t: t is not None and t.status == "scheduled",
        what="the delayed task shows as scheduled",
    )
    assert waiting is not None and waiting.due_at is not None
    await app.cancel(delayed.uuid, "not needed")
    assert time.time() < before + CANCEL_COUNTDOWN, "cancelled too late to test a delayed task"
    cancelled_delayed = await outcome(app, delayed.uuid)
    assert cancelled_delayed.status == "cancel", cancelled_delayed
    assert cancelled_delayed.cancel_reason == "not needed"

    # -- cancel of a running async task
    async with asyncio.timeout(LIMIT):
        await running_started.wait()
    running_outcome = asyncio.create_task(app.wait(running.uuid, timeout=LIMIT))
    await app.cancel(running.uuid, "user gave up")
    cancelled_running = await running_outcome
    assert cancelled_running is not None and cancelled_running.status == "cancel", cancelled_running
    assert cancelled_running.cancel_reason == "user gave up"
    assert saw == ["CancelledError"], "the coroutine was not cancelled"
    running_history = kinds(await app.history(running.uuid))
    assert running_history[-1] == "Cancelled" and "CancelRequested" in running_history
    assert "Started" in running_history and "Succeeded" not in running_history
    viewed = await finished(app, running.uuid)
    assert viewed.status == "cancel" and viewed.cancel_requested

    # -- countdown respected
    asked_at = time.time()
    while_waiting = await app.get(by_countdown.uuid)
    if asked_at < before + COUNTDOWN - 0.5:
        # Clearly before its due time: the view may lag, but it can never be past waiting.
        assert while_waiting is not None and while_waiting.status in ("new", "scheduled")
    counted_down = await outcome(app, by_countdown.uuid)
    assert counted_down.status == "success", counted_down
    # 1 ms of slack for the microsecond rounding of the due time.
    assert stamps["countdown"] >= before + COUNTDOWN - 0.001, "ran before its countdown"
    assert kinds(await app.history(by_countdown.uuid))[:4] == [
        "Submitted",
        "Scheduled",
        "Released",
        "Started",
    ]

    # The cancelled delayed task never runs, even once its due time has passed.
    await asyncio.sleep(max(0.0, before + CANCEL_COUNTDOWN + 1.5 - time.time()))
    assert reminders == [], "the cancelled delayed task ran"
    assert kinds(await app.history(delayed.uuid)) == [
        "Submitted",
        "Scheduled",
        "CancelRequested",
        "Cancelled",
    ]


# -- priority lanes ---------------------------------------------------------------------------

BACKLOG = 60
JOB_SECONDS = 0.05


async def scheduled(app: QueueTasks, ids: set[str], expected: int) -> None:
    """Wait until the scheduler has put every one of ``ids`` into its lane."""
    assert len(ids) == expected

    async def missing() -> int:
        return len(ids - {e.task_id for e in await log_events(app) if e.kind == "Scheduled"})

    await eventually(
        missing, lambda n: n == 0, what=f"{expected} tasks in their lanes", interval=0.2
    )


async def test_high_priority_overtakes_a_low_priority_backlog_on_kafka(env: KafkaEnv) -> None:
    app = env.app(concurrency=1)
    order: list[str] = []
    gate = asyncio.Event()

    @app.task(priority=2)
    async def job(label: str) -> None:
        order.append(label)
        # The first job holds the only slot until the whole backlog, then the urgent task,
        # sit in their lanes: what runs next is the worker's choice, not submission timing.
        await gate.wait()
        await asyncio.sleep(JOB_SECONDS)

    @app.task
    async def warm_up() -> None:
        pass

    await app.start()
    warm = await app.add_task("warm_up", timeout=LIMIT)
    assert warm is not None and warm.status == "success", "the pipeline never came up"

    backlog = await asyncio.gather(*(app.add_task("job", f"low-{i}") for i in range(BACKLOG)))
    await eventually(lambda: len(order), lambda n: n >= 1, what="the backlog is being worked on")
    await scheduled(app, {t.uuid for t in backlog if t is not None}, BACKLOG)
    urgent = await app.add_task("job", "urgent", priority=0)
    assert urgent is not None
    await scheduled(app, {urgent.uuid}, 1)
    gate.set()
    done = await outcome(app, urgent.uuid)
    assert done.status == "success", done
    await eventually(lambda: len(order), lambda n: n == BACKLOG + 1, what="the backlog finished")
    after = len(order) - 1 - order.index("urgent")
    assert after > BACKLOG // 2, (
        f"the urgent task ran as number {order.index('urgent') + 1} of {BACKLOG + 1}: only "
        f"{after} of the {BACKLOG} low-priority tasks queued before it ran after it"
    )
    assert sorted(order) == sorted([*(f"low-{i}" for i in range(BACKLOG)), "urgent"])
    lanes = {e.payload.lane for e in await app.history(urgent.uuid) if e.kind == "Scheduled"}  # type: ignore[union-attr]
    assert lanes == {0}


# -- dead letters -----------------------------------------------------------------------------


async def test_garbage_in_the_events_topic_is_dead_lettered_on_kafka(env: KafkaEnv) -> None:
    app = env.app()

    @app.task
    async def ping() -> str:
        return "pong"

    await app.start()
    events = app.topology.events
    headers = (("origin", b"a test"),)
    producer = app.event_log.producer()
    try:
        await producer.send([OutRecord(events, b"not-a-task", b"\x00garbage", headers)])
    finally:
        await producer.close()
    # (The DeadLettered event, keyed by the same id, may already follow it.)
    [garbage] = [r for r in await read_topic(app, events) if r.value == b"\x00garbage"]
    assert garbage.key == b"not-a-task" and garbage.headers == headers

    dead = await asyncio.to_thread(
        _read_deadletters, env.bootstrap, app.topology.deadletter, 2, LIMIT
    )
    # One dead letter per stage that reads the events topic and decodes it.
    assert len(dead) == 2, [m.headers() for m in dead]
    stages = set()
    for msg in dead:
        assert (msg.key(), msg.value()) == (b"not-a-task", b"\x00garbage")
        got = [(k, bytes(v)) for k, v in msg.headers() or []]
        assert got[:1] == list(headers), "the original headers are not kept first, untouched"
        extra = dict(got[1:])
        assert extra[DLQ_REASON].startswith(b"cannot decode")
        assert extra[DLQ_SOURCE] == f"{events}/{garbage.partition}/{garbage.offset}".encode()
        assert extra[DLQ_ERROR] == b"SchemaError"
        stages.add(extra[DLQ_STAGE])
    assert stages == {b"scheduler", b"projector"}

    # The pipeline goes on.
    task = await app.add_task("ping", timeout=LIMIT)
    assert task is not None and (task.status, task.returning) == ("success", "pong")
    marked = await finished(app, "not-a-task")
    assert marked.status == "dead_letter"
    # Once the dead-letter stage has handled both dead letters, the fact is recorded once.
    for msg in dead:
        tp = TopicPartition(msg.topic(), msg.partition())
        await stage_passed(app, env.bootstrap, "deadletter", tp, msg.offset())
    history = await app.history("not-a-task")
    assert kinds(history) == ["DeadLettered"]
    assert history[0].payload.source_topic == events  # type: ignore[union-attr]
    assert history[0].payload.source_offset == garbage.offset  # type: ignore[union-attr]


# -- a client-only app ----------------------------------------------------------------------


async def test_client_only_app_is_notified_by_completion_events_on_kafka(env: KafkaEnv) -> None:
    client_ran: list[int] = []
    server_ran: list[int] = []
    # Built before anything exists on the broker for this prefix: building connects nothing.
    client = env.app()

    @client.task(name="double")
    async def double_in_client(n: int) -> int:
        client_ran.append(n)
        return n * 2

    assert not client._client_ready and client.runners == {}
    assert client._results._task is None

    server = env.app()

    @server.task(name="double")
    async def double_in_server(n: int) -> int:
        server_ran.append(n)
        return n * 2

    await server.start()
    done = await asyncio.gather(*(client.add_task("double", n, timeout=LIMIT) for n in range(5)))
    assert [(t.status, t.returning) if t else None for t in done] == [
        ("success", n * 2) for n in range(5)
    ]
    assert client._client_ready, "the client never connected"
    assert client.runners == {}, "the client started stages"
    assert client_ran == [] and sorted(server_ran) == list(range(5))
    for t in done:
        assert t is not None
        # The client has no projector: its view knows nothing, the outcome came from the log.
        assert await client.get(t.uuid) is None
        assert (await finished(server, t.uuid)).status == "success"


# -- restarts ---------------------------------------------------------------------------------

SLOW_TASKS = 16
SLOW_SECONDS = 0.4
RESTART_COUNTDOWN = 4.0


async def test_restart_ends_every_task_exactly_once_on_kafka(env: KafkaEnv) -> None:
    runs: Counter[str] = Counter()
    started_at: dict[str, float] = {}

    def build() -> QueueTasks:
        app = env.app("restart", concurrency=2)

        @app.task
        async def slow(label: str) -> str:
            runs[label] += 1
            await asyncio.sleep(SLOW_SECONDS)
            return label

        @app.task
        async def later(label: str) -> str:
            runs[label] += 1
            started_at[label] = time.time()
            return label

        return app

    first = build()
    await first.start()
    ids: dict[str, str] = {}
    for i in range(SLOW_TASKS):
        task = await first.add_task("slow", f"slow-{i}")
        assert task is not None
        ids[f"slow-{i}"] = task.uuid
    await eventually(lambda: sum(runs.values()), lambda n: n >= 3, what="a few tasks ran")
    submitted_at = time.monotonic()
    due = time.time() + RESTART_COUNTDOWN
    for i in range(3):
        task = await first.add_task("later", f"later-{i}", countdown=RESTART_COUNTDOWN)
        assert task is not None
        ids[f"later-{i}"] = task.uuid
    # The first app's scheduler armed the delays before it went away.
    for i in range(3):
        await eventually(
            lambda i=i: first.get(ids[f"later-{i}"]),
            lambda t: t is not None and t.status == "scheduled",
            what=f"later-{i} scheduled",
        )
    async with asyncio.timeout(LIMIT):
        await first.close()
    assert time.monotonic() - submitted_at < RESTART_COUNTDOWN, "closed too late to test delays"

    before = await log_events(first)
    ended = Counter(e.task_id for e in before if e.kind in TERMINAL_KINDS)
    outstanding = sorted(label for label, tid in ids.items() if ended[tid] == 0)
    assert any(label.startswith("slow") for label in outstanding), "nothing outstanding"
    assert all(f"later-{i}" in outstanding for i in range(3))
    released_early = [e for e in before if e.kind == "Released"]
    assert released_early == [], "a delay fired before the restart"

    second = build()
    await second.start()
    done = await asyncio.gather(*(second.wait(tid, timeout=LIMIT * 2) for tid in ids.values()))
    assert all(t is not None for t in done), "not every task ended after the restart"
    # Closed: whatever the second app would still write is in the log now.
    async with asyncio.timeout(LIMIT):
        await second.close()

    after = await log_events(second)
    ended = Counter(e.task_id for e in after if e.kind in TERMINAL_KINDS)
    assert {label: ended[tid] for label, tid in ids.items()} == dict.fromkeys(ids, 1)
    for label, tid in ids.items():
        history = [e for e in after if e.task_id == tid]
        assert history[-1].kind == "Succeeded", (label, kinds(history))
        if label.startswith("later"):
            assert kinds(history).count("Released") == 1, (label, kinds(history))
            assert started_at[label] >= due - 0.01, f"{label} ran before its countdown"
    assert runs == Counter(dict.fromkeys(ids, 1))
