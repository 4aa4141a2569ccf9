"""Replay, snapshots and resubmit on the real broker and registry (confluent-kafka log):
snapshot plus tail equals a full replay equals the live view, over transactional
partitions (commit markers the replay must step over by position)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from qtasks_stream.ops.replay import compare_views, replay_into
from qtasks_stream.ops.rerun import ResubmitFilter
from qtasks_stream.ops.snapshot import read_snapshot, seed_view, write_snapshot
from qtasks_stream.records import TopicPartition
from qtasks_stream.views.memory import MemoryViewStore
from tests.contract.test_lifecycle import KAFKA_LIMIT as LIMIT
from tests.contract.test_lifecycle import eventually
from tests.eventlogs import kafka_test_config

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


@pytest.fixture
async def app(kafka_bootstrap: str, schema_registry_url: str) -> AsyncIterator[QueueTasks]:
    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as registry:
        log = ConfluentEventLog(kafka_test_config(kafka_bootstrap))
        app = QueueTasks(
            "rp",
            event_log=log,
            schema_registry=registry,
            topic_prefix=f"rp{uuid.uuid4().hex[:8]}.",
            poll_timeout=0.1,
        )
        fixed = False

        @app.task(retry=1, retry_on_exc=[OSError], retry_backoff=0.01)
        async def flaky(n: int) -> int:
            if n % 3 == 0 and not fixed:
                raise OSError(f"{n} fails")
            return n

        def fix() -> None:
            nonlocal fixed
            fixed = True

        app.fix = fix  # type: ignore[attr-defined]
        try:
            yield app
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(LIMIT):
                    await app.close()
            async with asyncio.timeout(LIMIT):
                await log.close()


async def ends(app: QueueTasks) -> dict[TopicPartition, int]:
    topic = app.topology.events
    consumer = app.event_log.consumer([topic], group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(app.topology.partitions)]
        return {tp: o for tp, o in (await consumer.end_offsets(tps)).items() if o}
    finally:
        await consumer.close()


async def run_batch(app: QueueTasks, numbers: range) -> dict[int, Any]:
    tasks = await asyncio.gather(*(app.add_task("flaky", n, timeout=LIMIT) for n in numbers))
    assert all(t is not None for t in tasks)
    return {n: t for n, t in zip(numbers, tasks, strict=True)}


async def test_snapshot_plus_tail_equals_full_replay_and_resubmit_on_kafka(
    app: QueueTasks,
) -> None:
    await app.start()
    first = await run_batch(app, range(9))
    assert {n for n, t in first.items() if t.status == "error"} == {0, 3, 6}

    taken, _ = await write_snapshot(app.event_log, app.serde, app.topology)
    assert len(taken.states) == 9
    read = await read_snapshot(app.event_log, app.serde, app.topology)
    assert read is not None and read.snapshot_id == taken.snapshot_id
    assert sorted(read.states, key=lambda s: s.task_id) == taken.states

    app.fix()  # type: ignore[attr-defined]
    chosen = [r for r in await app.resubmit(ResubmitFilter(task_name="flaky")) if r.event]
    assert sorted(r.task_id for r in chosen) == sorted(first[n].uuid for n in (0, 3, 6))
    for n in (0, 3, 6):
        await eventually(
            lambda n=n: app.get(first[n].uuid),
            lambda t: t is not None and t.status == "success" and t.attempt == 3,
            what=f"task {n} resubmitted and succeeded",
        )
    await run_batch(app, range(9, 15))

    topic, partitions = app.topology.events, app.topology.partitions
    full, from_snapshot = MemoryViewStore(), MemoryViewStore()
    everything = await replay_into(full, app.event_log, app.serde, topic, partitions)
    await seed_view(from_snapshot, read)
    tail = await replay_into(from_snapshot, app.event_log, app.serde, topic, partitions)
    assert 0 < tail.records < everything.records
    assert await compare_views(full, from_snapshot) == []
    assert await full.positions() == await from_snapshot.positions() == await ends(app)
    # The live projector never reports a position past a partition's trailing commit
    # marker, so it is compared by content once it has applied the last record.
    await eventually(
        lambda: compare_views(app.view, full), lambda d: d == [], what="the live view caught up"
    )
    assert len(await full.counts()) == 1 and (await full.counts())["success"] == 15
