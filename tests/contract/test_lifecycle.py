"""One body per path of a task's life, run on every backend: the embedded default (in-memory
event log, ``mock://`` registry) and the real broker and registry through both Kafka event logs.

Each test builds its apps on a topic prefix of its own. The helpers see only what every backend
shows: the app's API, the records of its topics read through the event-log contract, and the
offsets each running stage has committed. Where a test must know that the stages have *passed*
a record (not merely that nothing happened yet), it waits until every stage committed past
every record of its topics (:meth:`Backend.settle`) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks, Task, current
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import TERMINAL_KINDS, TaskEvent
from qtasks_stream.records import OutRecord, Record, TopicPartition
from qtasks_stream.stages.runner import DLQ_ERROR, DLQ_REASON, DLQ_SOURCE, DLQ_STAGE
from qtasks_stream.views.sqlite import SqliteViewStore
from tests import e2ehelpers
from tests.e2ehelpers import decodable_events, kinds
from tests.eventlogs import kafka_test_config

#: Bound of every wait for one outcome: in memory, and on the broker.
MEMORY_LIMIT = 5.0
KAFKA_LIMIT = 30.0
T = TypeVar("T")

_ON_KAFKA = (pytest.mark.kafka, pytest.mark.timeout(180))
BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("aiokafka", id="aiokafka", marks=_ON_KAFKA),
    pytest.param("confluent", id="confluent", marks=_ON_KAFKA),
]


#: :func:`tests.e2ehelpers.eventually` with the Kafka suites' limit (``limit=`` overrides it).
eventually = functools.partial(e2ehelpers.eventually, limit=KAFKA_LIMIT, interval=0.02)


async def _bounded(closing: Awaitable[None]) -> None:
    async with asyncio.timeout(KAFKA_LIMIT):
        await closing


@dataclass
class Backend:
    """One test's backend: its event logs and registry, a topic prefix, the apps it built."""

    kind: str
    registry: SchemaRegistryClient
    new_log: Callable[[], EventLog]
    #: Bound of one wait for an outcome.
    limit: float
    #: A countdown long enough for a test to act on a task before it is due.
    delay: float
    prefix: str = field(default_factory=lambda: f"lc{uuid.uuid4().hex[:8]}.")
    apps: list[QueueTasks] = field(default_factory=list)
    logs: list[EventLog] = field(default_factory=list)

    def app(self, name: str = "lc", **options: Any) -> QueueTasks:
        """A QueueTasks on this test's prefix and registry (an event log client of its own
        on Kafka; the one shared log in memory)."""
        options.setdefault("poll_timeout", 0.1)
        log = self.new_log()
        if log not in self.logs:
            self.logs.append(log)
        app = QueueTasks(
            name, event_log=log, schema_registry=self.registry, topic_prefix=self.prefix, **options
        )
        self.apps.append(app)
        return app

    async def start(self, app: QueueTasks) -> None:
        """Start every stage and wait until each owns all partitions of its topics: on Kafka,
        joining the groups takes a while, and a countdown must not run out meanwhile."""
        await app.start()
        partitions = {spec.name: spec.partitions for spec in app.topology.specs()}
        wanted = {
            runner.group: {
                TopicPartition(topic, p)
                for topic in runner.stage.topics
                for p in range(partitions[topic])
            }
            for runner in app.runners.values()
        }
        await self.eventually(
            lambda: [
                g for g, r in app.runners.items() if set(r.checkpoint.owned()) != wanted[r.group]
            ],
            lambda missing: not missing,
            what="every stage owns its partitions",
        )

    async def close(self) -> None:
        # Bounded, and every app and log gets its turn even when one fails to close.
        async with contextlib.AsyncExitStack() as stack:
            for log in self.logs:
                stack.push_async_callback(_bounded, log.close())
            for app in self.apps:
                stack.push_async_callback(_bounded, app.close())

    async def eventually(
        self, probe: Callable[[], Awaitable[T] | T], ok: Callable[[T], bool] = bool, *, what: str
    ) -> T:
        return await eventually(probe, ok, what=what, limit=self.limit)

    async def finished(self, app: QueueTasks, task_id: str) -> Task:
        """The task once the app's view shows it final (``get`` may answer sooner: from what
        a ``wait`` in this process returned)."""
        task = await self.eventually(
            lambda: app.view.get(task_id, payloads=app.payloads),
            lambda t: t is not None and t.final,
            what=f"{task_id} final",
        )
        assert task is not None
        return task

    async def outcome(self, app: QueueTasks, task_id: str) -> Task:
        task = await app.wait(task_id, timeout=self.limit)
        assert task is not None, f"{task_id} did not end within {self.limit}s"
        return task

    async def read(self, app: QueueTasks, topics: list[str]) -> list[Record]:
        """Every committed record of ``topics``, read to the end offsets known at the call.

        The end is judged by the consumer's position, not by the last offset delivered: a
        transactional partition ends with a commit marker that is never delivered.
        """
        consumer = app.event_log.consumer(topics, group_id=None, start="earliest")
        await consumer.start()
        try:
            partitions = {spec.name: spec.partitions for spec in app.topology.specs()}
            tps = [TopicPartition(t, p) for t in topics for p in range(partitions[t])]
            ends = await consumer.end_offsets(tps)
            records: list[Record] = []
            deadline = time.monotonic() + self.limit
            while True:
                positions = {tp: await consumer.position(tp) or 0 for tp in tps}
                if all(positions[tp] >= ends[tp] for tp in tps):
                    return records
                assert time.monotonic() < deadline, f"could not read {topics} to {ends}"
                records.extend(await consumer.poll(max_records=5000, timeout=0.5))
        finally:
            await consumer.close()

    async def events(self, app: QueueTasks, task_id: str | None = None) -> list[TaskEvent]:
        """The decodable events of the events topic (one task's, if given), in log order."""
        return decodable_events(app, await self.read(app, [app.topology.events]), task_id)

    async def settle(self, app: QueueTasks) -> None:
        """Wait until every running stage has committed past every record of its topics and
        nothing more was appended meanwhile: nothing is in flight."""

        async def lasts() -> dict[TopicPartition, int]:
            topics = sorted({t for r in app.runners.values() for t in r.stage.topics})
            last: dict[TopicPartition, int] = {}
            for rec in await self.read(app, topics):
                last[rec.tp] = max(last.get(rec.tp, -1), rec.offset)
            return last

        async def behind(last: dict[TopicPartition, int]) -> list[str]:
            late = []
            for runner in app.runners.values():
                tps = [tp for tp in last if tp.topic in runner.stage.topics]
                # The stage's own consumer: asking through another member would rebalance.
                consumer = runner._consumer
                committed = await consumer.committed(tps) if consumer is not None else {}
                late += [f"{runner.group} {tp}" for tp in tps if committed.get(tp, 0) <= last[tp]]
            return late

        deadline = time.monotonic() + self.limit
        seen = None
        while (last := await lasts()) != seen:
            assert time.monotonic() < deadline, "the log kept growing"
            await self.eventually(
                lambda last=last: behind(last), lambda late: not late, what="the stages caught up"
            )
            seen = last


def _kafka_log(kind: str, bootstrap: str) -> EventLog:
    config = kafka_test_config(bootstrap)
    if kind == "aiokafka":
        from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog

        return AioKafkaEventLog(config)
    from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog

    return ConfluentEventLog(config)


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with backend_of(request) as backend:
        yield backend


@contextlib.asynccontextmanager
async def backend_of(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The backend ``request.param`` names (see :data:`BACKENDS`), closed on leaving: the body
    of a fixture parametrized with :data:`BACKENDS`, for suites beyond this one."""
    kind: str = request.param
    if kind == "memory":
        shared = InMemoryEventLog()
        registry = SchemaRegistryClient.new_client({"url": f"mock://lc-{uuid.uuid4().hex}"})
        backend = Backend(kind, registry, lambda: shared, limit=MEMORY_LIMIT, delay=0.4)
    else:
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        url = request.getfixturevalue("schema_registry_url")
        registry = SchemaRegistryClient({"url": url, "timeout": 10})
        backend = Backend(
            kind, registry, lambda: _kafka_log(kind, bootstrap), limit=KAFKA_LIMIT, delay=4.0
        )
    with registry:
        try:
            yield backend
        finally:
            await backend.close()


# -- success ----------------------------------------------------------------------------------


async def test_async_task_succeeds(env: Backend) -> None:
    app = env.app()

    @app.task(tags=["math"])
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    await env.start(app)
    submitted = await app.add_task("add", 2, 3)
    assert submitted is not None and submitted.status == "new"
    task = await env.outcome(app, submitted.uuid)
    assert (task.uuid, task.status, task.returning, task.attempt) == (
        submitted.uuid,
        "success",
        5,
        1,
    )
    viewed = await env.finished(app, submitted.uuid)
    assert (viewed.status, viewed.returning, viewed.args, viewed.tags) == (
        "success",
        5,
        [2, 3],
        ["math"],
    )
    assert viewed.worker_id is not None and viewed.worker_id.startswith("worker:")
    assert [t.uuid for t in await app.query(status="success", task_name="add")] == [submitted.uuid]


async def test_sync_task_succeeds_in_a_thread(env: Backend) -> None:
    app = env.app()
    loop_thread = threading.get_ident()

    @app.task
    def greet(name: str, *, punctuation: str = "!") -> dict[str, Any]:
        return {
            "text": f"hello {name}{punctuation}",
            "in_thread": threading.get_ident() != loop_thread,
        }

    await env.start(app)
    task = await app.add_task("greet", "ada", punctuation="?", timeout=env.limit)
    assert task is not None and task.status == "success", task
    assert task.returning == {"text": "hello ada?", "in_thread": True}
    assert task.kwargs == {"punctuation": "?"}


async def test_generators_stream_progress(env: Backend) -> None:
    app = env.app()
    async_gate = asyncio.Event()
    sync_gate = threading.Event()

    @app.task
    async def count_async(n: int) -> AsyncIterator[dict[str, int]]:
        await async_gate.wait()
        for i in range(n):
            yield {"i": i}
            await asyncio.sleep(0)

    @app.task
    def count_sync(n: int) -> Any:
        assert sync_gate.wait(env.limit)
        for i in range(n):
            yield {"i": i}

    await env.start(app)
    watches = app._results._watches
    for name, open_gate in (("count_async", async_gate.set), ("count_sync", sync_gate.set)):
        submitted = await app.add_task(name, 4)
        assert submitted is not None
        items: list[Any] = []

        async def collect(task_id: str = submitted.uuid, into: list[Any] = items) -> None:
            async for item in app.stream(task_id):
                into.append(item)

        collector = asyncio.create_task(collect())
        outcome = asyncio.create_task(app.wait(submitted.uuid, timeout=env.limit))
        # The generator waits until the stream listens: items produced before are not replayed.
        key = submitted.uuid.encode()
        await env.eventually(
            lambda key=key: key in watches and bool(watches[key].queues),  # type: ignore[misc]
            what=f"the stream of {name} listens",
        )
        open_gate()
        async with asyncio.timeout(env.limit):
            await collector
        assert items == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}], name
        task = await outcome
        assert task is not None and (task.status, task.returning) == ("success", items), name
        progress = [e for e in await app.history(submitted.uuid) if e.kind == "Progress"]
        assert [e.payload.seq for e in progress] == [0, 1, 2, 3], name  # type: ignore[union-attr]


async def test_echo_task_sees_its_context(env: Backend) -> None:
    app = env.app()

    @app.task(echo=True)
    async def report(self: Any, steps: int) -> dict[str, Any]:
        assert current() is self.ctx
        for step in range(steps):
            self.ctx.progress({"step": step, "of": steps})
        return {"id": self.ctx.task_id, "attempt": self.ctx.attempt, "name": self.ctx.task_name}

    await env.start(app)
    task = await app.add_task("report", 2, timeout=env.limit)
    assert task is not None and task.status == "success", task
    assert task.returning == {"id": task.uuid, "attempt": 1, "name": "report"}
    progress = [e.payload for e in await app.history(task.uuid) if e.kind == "Progress"]
    assert [(p.seq, p.value) for p in progress] == [  # type: ignore[union-attr]
        (0, '{"step": 0, "of": 2}'),
        (1, '{"step": 1, "of": 2}'),
    ]


# -- retries, failures, timeouts --------------------------------------------------------------


async def test_retry_then_success(env: Backend) -> None:
    app = env.app()
    seen: list[tuple[str, int]] = []

    @app.task(echo=True, retry=3, retry_on_exc=[OSError], retry_backoff=0.05)
    async def flaky(self: Any, failures: int) -> int:
        seen.append((self.ctx.task_id, self.ctx.attempt))
        if self.ctx.attempt <= failures:
            raise ConnectionError(f"attempt {self.ctx.attempt} lost the connection")
        return int(self.ctx.attempt)

    await env.start(app)
    task = await app.add_task("flaky", 2, timeout=env.limit)
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


async def test_failure_after_retries_are_exhausted(env: Backend) -> None:
    app = env.app()
    calls: list[str] = []

    @app.task(retry=2, retry_backoff=0.05)
    def parse(text: str) -> None:
        calls.append(text)
        raise ValueError(f"cannot parse {text!r}")

    await env.start(app)
    task = await app.add_task("parse", "x1", timeout=env.limit)
    assert task is not None and task.status == "error", task
    assert calls == ["x1"] * 3 and task.attempt == 3
    assert (task.error_type, task.error_message) == ("ValueError", "cannot parse 'x1'")
    assert task.traceback is not None
    assert "Traceback" in task.traceback and "in parse" in task.traceback
    assert task.traceback.rstrip().endswith("ValueError: cannot parse 'x1'")
    history = kinds(await app.history(task.uuid))
    assert history.count("RetryScheduled") == 2 and history[-1] == "Failed"
    viewed = await env.finished(app, task.uuid)
    assert (viewed.status, viewed.error_type, viewed.attempt) == ("error", "ValueError", 3)


async def test_max_time_times_out(env: Backend) -> None:
    app = env.app()
    interrupted: list[str] = []

    # The body would sleep far beyond every wait of the test: only max_time ends it in time.
    @app.task(max_time=0.5)
    async def sleepy() -> None:
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            interrupted.append("sleepy")
            raise

    await env.start(app)
    by_definition, per_call = await asyncio.gather(
        app.add_task("sleepy", timeout=env.limit),
        app.add_task("sleepy", max_time=0.3, timeout=env.limit),
    )
    for task, limit in ((by_definition, 0.5), (per_call, 0.3)):
        assert task is not None and task.status == "timeout", task
        assert task.error_type == "TaskTimeout" and f"max_time={limit}" in (
            task.error_message or ""
        )
        assert kinds(await app.history(task.uuid))[-1] == "TimedOut"
    assert interrupted == ["sleepy", "sleepy"], "the timed-out bodies were not interrupted"


# -- cancellation -----------------------------------------------------------------------------


async def test_cancel_of_a_running_async_task(env: Backend) -> None:
    app = env.app()
    started = asyncio.Event()
    saw: list[str] = []

    @app.task
    async def long_job() -> str:
        started.set()
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            saw.append("CancelledError")
            raise
        return "finished anyway"

    await env.start(app)
    submitted = await app.add_task("long_job")
    assert submitted is not None
    outcome = asyncio.create_task(app.wait(submitted.uuid, timeout=env.limit))
    async with asyncio.timeout(env.limit):
        await started.wait()
    await app.cancel(submitted.uuid, "user gave up")
    task = await outcome
    assert task is not None and task.status == "cancel", task
    assert task.cancel_reason == "user gave up"
    assert saw == ["CancelledError"], "the coroutine was not cancelled"
    history = kinds(await app.history(submitted.uuid))
    assert history[-1] == "Cancelled" and "CancelRequested" in history
    assert "Started" in history and "Succeeded" not in history
    viewed = await env.finished(app, submitted.uuid)
    assert viewed.status == "cancel" and viewed.cancel_requested


async def test_cancel_of_a_delayed_task_before_it_runs(env: Backend) -> None:
    app = env.app()
    ran: list[str] = []

    @app.task
    async def reminder() -> None:
        ran.append("reminder")

    await env.start(app)
    # Generous: on a loaded box seconds may pass between the submit and the cancel's outcome.
    countdown = 2 * env.delay
    due = time.monotonic() + countdown
    submitted = await app.add_task("reminder", countdown=countdown)
    assert submitted is not None
    # Cancelled once the scheduler holds the delay.
    waiting = await env.eventually(
        lambda: app.get(submitted.uuid),
        lambda t: t is not None and t.status == "scheduled",
        what="the delayed task shows as scheduled",
    )
    assert waiting is not None and waiting.due_at is not None
    await app.cancel(submitted.uuid, "not needed")
    task = await env.finished(app, submitted.uuid)
    assert time.monotonic() < due, "cancelled only after it was due"
    assert (task.status, task.cancel_reason) == ("cancel", "not needed")

    # Absence needs the due time to pass: wait past it, then let every stage catch up.
    await asyncio.sleep(max(0.0, due + env.delay / 4 - time.monotonic()))
    await env.settle(app)
    assert ran == [], "the cancelled delayed task ran"
    assert kinds(await app.history(submitted.uuid)) == [
        "Submitted",
        "Scheduled",
        "CancelRequested",
        "Cancelled",
    ]
    assert not await env.read(app, app.topology.lane_topics), "a work item reached a lane"


# -- delays and priority ----------------------------------------------------------------------


async def test_countdown_and_eta_delay_the_start(env: Backend) -> None:
    app = env.app()
    started: dict[str, float] = {}

    @app.task
    async def stamp(label: str) -> None:
        started[label] = time.time()

    await env.start(app)
    countdown, eta = env.delay * 3 / 4, env.delay
    before = time.time()
    by_countdown = await app.add_task("stamp", "countdown", countdown=countdown)
    by_eta = await app.add_task("stamp", "eta", eta=datetime.now(UTC) + timedelta(seconds=eta))
    assert by_countdown is not None and by_eta is not None

    waiting = await env.eventually(
        lambda: app.get(by_eta.uuid),
        lambda t: t is not None and t.status == "scheduled",
        what="the delayed task shows as scheduled",
    )
    assert waiting is not None and waiting.due_at is not None
    assert waiting.due_at >= datetime.fromtimestamp(before + eta, UTC) - timedelta(milliseconds=1)
    assert "eta" not in started

    for task in (by_countdown, by_eta):
        assert (await env.finished(app, task.uuid)).status == "success"
    # 1 ms of slack for the microsecond rounding of the due time.
    assert started["countdown"] >= before + countdown - 0.001, "ran before its countdown"
    assert started["eta"] >= before + eta - 0.001, "ran before its eta"
    for task in (by_countdown, by_eta):
        assert kinds(await app.history(task.uuid))[:4] == [
            "Submitted",
            "Scheduled",
            "Released",
            "Started",
        ]


BACKLOG = 60


async def test_high_priority_overtakes_a_low_priority_backlog(env: Backend) -> None:
    app = env.app(concurrency=1)
    order: list[str] = []
    gate = asyncio.Event()

    @app.task(priority=2)
    async def job(label: str) -> None:
        order.append(label)
        # The first job holds the only slot until the whole backlog, then the urgent task,
        # sit in their lanes: what runs next is the worker's choice, not submission timing.
        await gate.wait()
        await asyncio.sleep(0.01)

    async def scheduled(ids: set[str]) -> None:
        async def missing() -> set[str]:
            return ids - {e.task_id for e in await env.events(app) if e.kind == "Scheduled"}

        await env.eventually(missing, lambda m: not m, what=f"{len(ids)} tasks in their lanes")

    await env.start(app)
    backlog = await asyncio.gather(*(app.add_task("job", f"low-{i}") for i in range(BACKLOG)))
    await env.eventually(lambda: len(order), lambda n: n >= 1, what="the backlog is worked on")
    await scheduled({t.uuid for t in backlog if t is not None})
    urgent = await app.add_task("job", "urgent", priority=0)
    assert urgent is not None
    await scheduled({urgent.uuid})
    gate.set()
    assert (await env.outcome(app, urgent.uuid)).status == "success"
    await env.eventually(lambda: len(order), lambda n: n == BACKLOG + 1, what="the backlog ended")
    after = len(order) - 1 - order.index("urgent")
    assert after > BACKLOG // 2, (
        f"the urgent task ran as number {order.index('urgent') + 1} of {BACKLOG + 1}: only "
        f"{after} of the {BACKLOG} low-priority tasks queued before it ran after it"
    )
    assert sorted(order) == sorted([*(f"low-{i}" for i in range(BACKLOG)), "urgent"])
    lanes = {e.payload.lane for e in await app.history(urgent.uuid) if e.kind == "Scheduled"}  # type: ignore[union-attr]
    assert lanes == {0}


# -- submission, history, wait ----------------------------------------------------------------


async def test_idempotency_key_submits_once(env: Backend) -> None:
    app = env.app()
    charged: list[str] = []

    @app.task
    async def charge(order: str, amount: int) -> int:
        charged.append(order)
        return amount

    await env.start(app)
    first = await app.add_task("charge", "o-1", 10, idempotency_key="order-1")
    second = await app.add_task("charge", "o-1", 99, idempotency_key="order-1")
    other = await app.add_task("charge", "o-2", 5, idempotency_key="order-2")
    assert first is not None and second is not None and other is not None
    assert first.uuid == second.uuid != other.uuid

    task = await env.finished(app, first.uuid)
    assert (task.status, task.returning, task.args) == ("success", 10, ["o-1", 10])
    await env.finished(app, other.uuid)
    await env.settle(app)
    assert sorted(charged) == ["o-1", "o-2"]
    once = kinds(await env.events(app, first.uuid))
    assert once.count("Submitted") == 2 and once.count("Started") == 1, once
    items = [
        r for r in await env.read(app, app.topology.lane_topics) if r.key == first.uuid.encode()
    ]
    assert len(items) == 1, "the repeated submit put a second work item in a lane"

    # Submitting the key again after the end answers with the finished task.
    again = await app.add_task("charge", "o-1", 1, idempotency_key="order-1", timeout=env.limit)
    assert again is not None and (again.uuid, again.status, again.returning) == (
        first.uuid,
        "success",
        10,
    )
    await env.settle(app)
    assert charged.count("o-1") == 1


async def test_a_task_due_now_goes_to_its_lane_with_its_submit(env: Backend) -> None:
    # One transactional hop before a worker: the client writes Submitted, Scheduled and the
    # work item; the scheduler routes only what may be a repeat (idempotency key) or waits.
    app = env.app()
    runs: Counter[int] = Counter()

    @app.task
    async def once(i: int) -> int:
        runs[i] += 1
        return i

    await env.start(app)
    now = [await app.add_task("once", i, timeout=env.limit) for i in range(5)]
    delayed = await app.add_task("once", 10, countdown=0, timeout=env.limit)
    keyed = await app.add_task("once", 11, idempotency_key="k", timeout=env.limit)
    tasks = [*now, delayed, keyed]
    assert all(t is not None and t.status == "success" for t in tasks), tasks
    await env.settle(app)
    sources = {
        t.uuid: [e.source for e in await app.history(t.uuid) if e.kind == "Scheduled"]
        for t in tasks
        if t is not None
    }
    assert [sources[t.uuid] for t in tasks if t is not None] == [["client"]] * 5 + [
        ["scheduler"]
    ] * 2
    items = await env.read(app, app.topology.lane_topics)
    assert sorted(Counter(r.key for r in items).values()) == [1] * 7
    assert runs == Counter(dict.fromkeys([0, 1, 2, 3, 4, 10, 11], 1))


async def test_history_returns_the_events_in_order(env: Backend) -> None:
    app = env.app()

    @app.task
    def count(n: int) -> Any:
        yield from range(n)

    await env.start(app)
    task = await app.add_task("count", 2, timeout=env.limit)
    assert task is not None and task.status == "success", task
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
    # Due now: its client routed it (see test_a_task_due_now_goes_to_its_lane_with_its_submit).
    assert history[0].source == "client" and history[1].source == "client"
    assert history[2].source.startswith("worker:")
    times = [e.at_us for e in history]
    assert times == sorted(times)
    assert len({e.event_id for e in history}) == len(history)
    assert history == await env.events(app, task.uuid)
    assert await app.history(str(uuid.uuid4())) == []


async def test_wait_returns_the_task_as_submitted_and_at_once_once_ended(env: Backend) -> None:
    app = env.app()

    @app.task
    async def multiply(a: int, b: int, *, scale: int = 1) -> int:
        return a * b * scale

    await env.start(app)
    submitted = await app.add_task("multiply", 6, 7, scale=2, priority=1, tags=["math"])
    assert submitted is not None
    task = await env.outcome(app, submitted.uuid)
    assert (task.status, task.returning) == ("success", 84)
    assert (task.args, task.kwargs, task.priority, task.tags, task.created_at) == (
        [6, 7],
        {"scale": 2},
        1,
        ["math"],
        submitted.created_at,
    ), "wait() answered with a task that lost what was submitted"
    assert task == await env.finished(app, submitted.uuid)
    # The task has ended: waiting for it again must answer at once, not after the timeout.
    started = time.monotonic()
    again = await app.wait(task.uuid, timeout=2)
    assert again is not None, (
        f"wait() gave up after {time.monotonic() - started:.1f}s on a task that had ended"
    )
    assert (again.uuid, again.status, again.returning) == (task.uuid, "success", 84)


async def test_client_only_app_is_notified_by_completion_events(env: Backend) -> None:
    client_ran: list[int] = []
    server_ran: list[int] = []
    # Built before anything exists for this prefix: building connects nothing.
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

    await env.start(server)
    done = await asyncio.gather(
        *(client.add_task("double", n, timeout=env.limit) for n in range(5))
    )
    assert [(t.status, t.returning) if t else None for t in done] == [
        ("success", n * 2) for n in range(5)
    ]
    assert client._client_ready, "the client never connected"
    assert client.runners == {}, "the client started stages"
    assert client_ran == [] and sorted(server_ran) == list(range(5))
    for n, t in enumerate(done):
        assert t is not None
        # The client has no projector: the outcome came from the log, and so does get().
        got = await client.get(t.uuid)
        assert got is not None and (got.status, got.returning, got.args) == ("success", n * 2, [n])
        assert (await env.finished(server, t.uuid)).status == "success"


# -- dead letters -----------------------------------------------------------------------------


async def test_garbage_in_the_events_topic_is_dead_lettered_and_the_pipeline_goes_on(
    env: Backend,
) -> None:
    app = env.app()

    @app.task
    async def ping() -> str:
        return "pong"

    await env.start(app)
    events = app.topology.events
    headers = (("origin", b"a test"),)
    producer = app.event_log.producer()
    try:
        await producer.send([OutRecord(events, b"not-a-task", b"\x00garbage", headers)])
    finally:
        await producer.close()
    # (The DeadLettered event, keyed by the same id, may already follow it.)
    [garbage] = [r for r in await env.read(app, [events]) if r.value == b"\x00garbage"]
    assert garbage.key == b"not-a-task" and garbage.headers == headers

    task = await app.add_task("ping", timeout=env.limit)
    assert task is not None and (task.status, task.returning) == ("success", "pong")
    marked = await env.finished(app, "not-a-task")
    assert marked.status == "dead_letter"
    await env.settle(app)
    # One dead letter per stage that reads the events topic and decodes it.
    dead = await env.read(app, [app.topology.deadletter])
    assert len(dead) == 2, [rec.headers for rec in dead]
    stages = set()
    for rec in dead:
        assert (rec.key, rec.value) == (b"not-a-task", b"\x00garbage")
        assert rec.headers[:1] == headers, "the original headers are not kept first, untouched"
        extra = dict(rec.headers[1:])
        assert extra[DLQ_REASON].startswith(b"cannot decode")
        assert extra[DLQ_SOURCE] == f"{events}/{garbage.partition}/{garbage.offset}".encode()
        assert extra[DLQ_ERROR] == b"SchemaError"
        stages.add(extra[DLQ_STAGE])
    assert stages == {b"scheduler", b"projector"}
    # Two stages gave up on the record; it is recorded once in the task's history.
    history = await app.history("not-a-task")
    assert kinds(history) == ["DeadLettered"]
    assert history[0].payload.source_topic == events  # type: ignore[union-attr]
    assert history[0].payload.source_offset == garbage.offset  # type: ignore[union-attr]


# -- restarts ---------------------------------------------------------------------------------

SLOW_TASKS = 16


async def test_restart_ends_every_task_exactly_once(env: Backend, tmp_path: Path) -> None:
    # The view outlives the first app too: the second one carries it on.
    view = SqliteViewStore(tmp_path / "view.sqlite")
    runs: Counter[str] = Counter()
    started_at: dict[str, float] = {}
    slow_seconds, countdown = env.delay / 10, env.delay

    def build() -> QueueTasks:
        app = env.app("restart", view=view, concurrency=2)

        @app.task
        async def slow(label: str) -> str:
            runs[label] += 1
            await asyncio.sleep(slow_seconds)
            return label

        @app.task
        async def later(label: str) -> str:
            runs[label] += 1
            started_at[label] = time.time()
            return label

        return app

    first = build()
    await env.start(first)
    ids: dict[str, str] = {}
    for i in range(SLOW_TASKS):
        task = await first.add_task("slow", f"slow-{i}")
        assert task is not None
        ids[f"slow-{i}"] = task.uuid
    await env.eventually(lambda: sum(runs.values()), lambda n: n >= 3, what="a few tasks ran")
    submitted_at = time.monotonic()
    due = time.time() + countdown
    for i in range(3):
        task = await first.add_task("later", f"later-{i}", countdown=countdown)
        assert task is not None
        ids[f"later-{i}"] = task.uuid
    # The first app's scheduler armed the delays before it went away.
    for i in range(3):
        await env.eventually(
            lambda i=i: first.get(ids[f"later-{i}"]),  # type: ignore[misc]
            lambda t: t is not None and t.status == "scheduled",
            what=f"later-{i} scheduled",
        )
    async with asyncio.timeout(env.limit):
        await first.close()
    assert time.monotonic() - submitted_at < countdown, "closed too late to test delays"

    before = await env.events(first)
    ended = Counter(e.task_id for e in before if e.kind in TERMINAL_KINDS)
    outstanding = sorted(label for label, tid in ids.items() if ended[tid] == 0)
    assert any(label.startswith("slow") for label in outstanding), "nothing outstanding"
    assert all(f"later-{i}" in outstanding for i in range(3))
    assert [e for e in before if e.kind == "Released"] == [], "a delay fired before the restart"

    second = build()
    await env.start(second)
    done = await asyncio.gather(*(second.wait(tid, timeout=env.limit) for tid in ids.values()))
    assert all(t is not None for t in done), "not every task ended after the restart"
    await env.settle(second)

    after = await env.events(second)
    ended = Counter(e.task_id for e in after if e.kind in TERMINAL_KINDS)
    assert {label: ended[tid] for label, tid in ids.items()} == dict.fromkeys(ids, 1)
    for label, tid in ids.items():
        history = [e for e in after if e.task_id == tid]
        assert history[-1].kind == "Succeeded", (label, kinds(history))
        if label.startswith("later"):
            assert kinds(history).count("Released") == 1, (label, kinds(history))
            assert started_at[label] >= due - 0.01, f"{label} ran before its countdown"
    assert runs == Counter(dict.fromkeys(ids, 1))
    for tid in ids.values():
        assert (await env.finished(second, tid)).status == "success"
