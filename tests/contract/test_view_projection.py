"""The projector and the rebuild against every view store (memory, SQLite, PostgreSQL), on
the embedded event log: crashes between and inside batches, two projectors sharing a store,
and a rebuild from offset 0 that must equal the live view. The reference is always the fold
of the whole log."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.errors import ViewStoreError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import (
    CancelRequested,
    Failed,
    Payload,
    Progress,
    RetryScheduled,
    Scheduled,
    Started,
    Submitted,
    Succeeded,
    TaskEvent,
)
from qtasks_stream.ops.replay import decode_events, rebuild
from qtasks_stream.records import OutRecord, TopicPartition
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.stages.projector import ProjectorStage
from qtasks_stream.stages.runner import StageRunner
from qtasks_stream.state import TaskState, fold
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import TaskQuery, ViewStore
from tests.viewstores import VIEW_KINDS, ViewFactory

LIMIT = 30.0


@pytest.fixture(params=VIEW_KINDS)
async def views(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ViewFactory]:
    factory = ViewFactory(request.param, tmp_path, request)
    yield factory
    await factory.close()


class _Log:
    """An embedded events topic with its serde."""

    def __init__(self, partitions: int = 4) -> None:
        self.log = InMemoryEventLog()
        self.topology = Topology(f"proj{uuid.uuid4().hex[:6]}", "qtasks.", partitions, 3)
        registry = SchemaRegistryClient.new_client({"url": f"mock://{self.topology.app}"})
        self.serde = AvroSerde(registry, self.topology.topic_schemas())
        self.topic = self.topology.events

    async def start(self) -> None:
        await self.log.create_topics(self.topology.specs())
        await self.serde.start()

    async def write(self, events: Sequence[TaskEvent], *, garbage_every: int = 0) -> None:
        producer = self.log.producer()
        records = []
        for i, event in enumerate(events):
            value = self.serde.encode(self.topic, event.to_avro())
            records.append(OutRecord(self.topic, event.task_id.encode(), value))
            if garbage_every and i % garbage_every == 0:
                # Undecodable: the pipeline dead-letters it; views must step over it.
                records.append(OutRecord(self.topic, event.task_id.encode(), b"\x07garbage"))
        await producer.send(records)

    def ends(self) -> dict[TopicPartition, int]:
        out: dict[TopicPartition, int] = {}
        for rec in self.log.records(self.topic):
            out[rec.tp] = rec.offset + 1
        return out

    def folded(self) -> dict[str, TaskState]:
        """The reference: every decodable event of the log folded, in log order."""
        states: dict[str, TaskState] = {}
        for item in decode_events(self.serde, self.log.records(self.topic)):
            task_id = item.event.task_id
            states[task_id] = fold(states.get(task_id), item.event)
        return states


def _lifecycles(n: int, seed: int = 7) -> list[TaskEvent]:
    """``n`` tasks with assorted lifecycles, their events interleaved as in a busy log."""
    rng = random.Random(seed)
    per_task: list[list[TaskEvent]] = []
    for i in range(n):
        tid = f"task-{i:05d}"
        name = ("add", "mul", "div")[i % 3]

        def ev(payload: Payload, attempt: int = 1, tid: str = tid, name: str = name) -> TaskEvent:
            return TaskEvent.new(tid, name, attempt, "test", payload)

        submitted = Submitted("[1]", "{}", i % 3, tags=(f"t{i % 4}",), idempotency_key=None)
        events = [ev(submitted, 0), ev(Scheduled(i % 3, 0)), ev(Started("w1"))]
        kind = i % 5
        if kind == 0:
            events += [ev(Progress(0, "1")), ev(Succeeded(str(i), 0.1))]
        elif kind == 1:
            events += [ev(Failed("E", "boom", "tb", 0.1))]
        elif kind == 2:
            events += [ev(RetryScheduled(0, 1, "E", "m", "tb", 0.1)), ev(Started("w2"), 2)]
            events += [ev(Succeeded("2", 0.1), 2)]
        elif kind == 3:
            events += [ev(CancelRequested("stop"), 0)]
        per_task.append(events)
    out: list[TaskEvent] = []
    while per_task:  # bounded: every turn takes one event out
        pick = rng.randrange(len(per_task))
        out.append(per_task[pick].pop(0))
        if not per_task[pick]:
            per_task.pop(pick)
    return out


class _Crashing(ViewStore):
    """Delegates to ``inner``; its ``crash_at``-th save fails, after committing (a crash
    between the store's commit and the group's) or before (a crash inside the batch)."""

    def __init__(self, inner: ViewStore, crash_at: int | None, *, after_commit: bool) -> None:
        self.inner = inner
        self.crash_at = crash_at
        self.after_commit = after_commit
        self.saves = 0
        self.crashed = asyncio.Event()

    async def positions(self) -> dict[TopicPartition, int]:
        return await self.inner.positions()

    async def counts(self) -> dict[str, int]:
        return await self.inner.counts()

    async def _load(self, task_ids: set[str]) -> dict[str, TaskState]:
        return await self.inner._load(task_ids)

    async def _search(self, query: TaskQuery) -> list[TaskState]:
        return await self.inner._search(query)

    async def _save(
        self,
        states: Sequence[TaskState],
        positions: Mapping[TopicPartition, int],
        expected: Mapping[TopicPartition, int],
    ) -> None:
        self.saves += 1
        if self.saves == self.crash_at:
            if self.after_commit:
                await self.inner._save(states, positions, expected)
            self.crashed.set()
            raise ViewStoreError("injected crash")
        await self.inner._save(states, positions, expected)


def _runner(log: _Log, view: ViewStore, instance: str) -> StageRunner:
    return StageRunner(
        ProjectorStage(log.topology, view),
        event_log=log.log,
        serde=log.serde,
        topology=log.topology,
        instance_id=instance,
        batch_size=37,  # many small batches: many places to crash
        poll_timeout=0.05,
    )


async def _until(probe: Any, what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {LIMIT}s: {what}")
        await asyncio.sleep(0.02)


async def _assert_equals_fold(view: ViewStore, log: _Log) -> None:
    expected = log.folded()
    assert await view.positions() == log.ends()
    everything = await view.query(TaskQuery(limit=10_000))
    assert sorted(t.uuid for t in everything) == sorted(expected)
    for task_id, state in expected.items():
        # ``events`` counts applied events: a doubled or skipped event shows here too.
        assert await view.state(task_id) == state, task_id
    counts: dict[str, int] = {}
    for state in expected.values():
        counts[state.status] = counts.get(state.status, 0) + 1
    assert await view.counts() == counts


async def test_projector_crashes_and_restarts_without_doubling_or_losing(
    views: ViewFactory,
) -> None:
    log = _Log()
    await log.start()
    await log.write(_lifecycles(150), garbage_every=97)
    store = await views.fresh()
    # Each round is a projector process: started, crashed at its n-th save, stopped. The
    # next one starts from what the store (not the group) says was applied.
    for round_no, (crash_at, after_commit) in enumerate(
        [(2, True), (3, False), (1, True), (4, True), (2, False)]
    ):
        handle = await views.handle(store)
        crashing = _Crashing(handle, crash_at, after_commit=after_commit)
        runner = _runner(log, crashing, f"p{round_no}")
        task = asyncio.create_task(runner.run())
        async with asyncio.timeout(LIMIT):
            await crashing.crashed.wait()
        runner.request_stop()
        async with asyncio.timeout(LIMIT):
            await task
    assert await store.positions() != log.ends(), "the crashes came too late to test anything"

    final = _runner(log, await views.handle(store), "last")
    task = asyncio.create_task(final.run())
    try:
        ends = log.ends()
        await _until(lambda: _reached(store, ends), "the last projector reached the end")
    finally:
        final.request_stop()
        async with asyncio.timeout(LIMIT):
            await task
    await _assert_equals_fold(store, log)


async def _reached(store: ViewStore, ends: Mapping[TopicPartition, int]) -> bool:
    return await store.positions() == ends


async def test_two_projectors_split_the_partitions_of_one_store(views: ViewFactory) -> None:
    log = _Log()
    await log.start()
    store = await views.fresh()
    first = _runner(log, await views.handle(store), "a")
    second = _runner(log, await views.handle(store), "b")
    tasks = [asyncio.create_task(first.run())]
    try:
        await log.write(_lifecycles(60, seed=1))
        # The second joins mid-stream: the group moves partitions from the first to it.
        tasks.append(asyncio.create_task(second.run()))
        await log.write(_lifecycles(60, seed=2)[::-1])
        ends = log.ends()
        await _until(lambda: _reached(store, ends), "both projectors reached the end")
        first_stage, second_stage = first.stage, second.stage
        assert isinstance(first_stage, ProjectorStage)
        assert isinstance(second_stage, ProjectorStage)
        assert first_stage.applied > 0 and second_stage.applied > 0, "one projector did it all"
    finally:
        for runner in (first, second):
            runner.request_stop()
        async with asyncio.timeout(LIMIT):
            await asyncio.gather(*tasks)
    await _assert_equals_fold(store, log)


async def test_rebuild_from_offset_zero_equals_the_fold_and_resumes(views: ViewFactory) -> None:
    log = _Log()
    await log.start()
    await log.write(_lifecycles(120, seed=3), garbage_every=50)
    store = await views.fresh()
    applied = await rebuild(log.log, log.serde, log.topic, log.topology.partitions, store)
    assert applied == sum(1 for _ in decode_events(log.serde, log.log.records(log.topic)))
    await _assert_equals_fold(store, log)

    # More events: a second rebuild into the same store continues where the first ended.
    await log.write(_lifecycles(30, seed=4)[::-1])
    more = await rebuild(log.log, log.serde, log.topic, log.topology.partitions, store)
    assert 0 < more < applied
    await _assert_equals_fold(store, log)


async def test_rebuilt_view_equals_the_live_view_of_a_running_app(views: ViewFactory) -> None:
    live = await views.fresh()
    name = f"live{uuid.uuid4().hex[:6]}"
    registry = SchemaRegistryClient.new_client({"url": f"mock://{name}"})
    event_log = InMemoryEventLog()
    # The app closes the handle it is given; the live view is read through ``live`` after.
    app = QueueTasks(
        name, event_log=event_log, schema_registry=registry, view=await views.handle(live)
    )

    @app.task(retry=1, retry_backoff=0.01)
    async def flaky(fail: bool) -> int:
        if fail:
            raise OSError("fails every time")
        return 1

    @app.task
    async def slow() -> None:
        await asyncio.sleep(30)

    try:
        await app.start()
        ids = []
        for i in range(12):
            task = await app.add_task("flaky", i % 3 == 0, tags=[f"g{i % 2}"], timeout=LIMIT)
            assert task is not None and task.final
            ids.append(task.uuid)
        later = await app.add_task("slow", countdown=30)
        assert later is not None
        await app.cancel(later.uuid, "no longer needed")
        done = await app.wait(later.uuid, timeout=LIMIT)
        assert done is not None and done.status == "cancel"
        ends: dict[TopicPartition, int] = {}
        for rec in event_log.records(app.topology.events):
            ends[rec.tp] = rec.offset + 1
        await _until(lambda: _reached(live, ends), "the live projector reached the end")
    finally:
        async with asyncio.timeout(LIMIT):
            await app.close()

    fresh = await views.fresh()
    await rebuild(event_log, app.serde, app.topology.events, app.topology.partitions, fresh)
    everything = TaskQuery(limit=10_000)
    live_ids = [t.uuid for t in await live.query(everything)]
    assert set(ids) | {later.uuid} <= set(live_ids)
    assert [t.uuid for t in await fresh.query(everything)] == live_ids
    for task_id in live_ids:
        assert await fresh.state(task_id) == await live.state(task_id), task_id
    assert await fresh.counts() == await live.counts()
    assert await fresh.positions() == await live.positions()
    for query in (TaskQuery(status="error"), TaskQuery(tag="g1", limit=3, offset=1)):
        assert await fresh.query(query) == await live.query(query)
