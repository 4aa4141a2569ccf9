"""Projector processes SIGKILLed mid-run on the real broker: the shared view store (a SQLite
file, or a PostgreSQL schema) ends equal to the fold of the whole log, nothing doubled or lost;
a rebuild from offset 0 on the broker gives the same.

Two ``qtasks-stream worker --stages projector`` processes split the partitions of one store
through their consumer group. Each is killed while it applies (its store has moved, the log
is not done), a new one takes over, and the last one reaches the end of the log.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qtasks_stream import QueueTasks
from qtasks_stream.events import Progress, Scheduled, Started, Submitted, Succeeded, TaskEvent
from qtasks_stream.ops.replay import decode_events, rebuild
from qtasks_stream.records import OutRecord, TopicPartition
from qtasks_stream.settings import Settings
from qtasks_stream.state import TaskState, fold
from qtasks_stream.views import open_view
from qtasks_stream.views.base import TaskQuery, ViewStore
from qtasks_stream.views.memory import MemoryViewStore
from tests.processes import stop_processes

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
TASKS = 3000  # 5 events each
LIMIT = 120.0


@pytest.fixture(params=["sqlite", "postgres"])
async def view_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/view.sqlite"
        return
    dsn = request.getfixturevalue("postgres_dsn")
    schema = f"kill_{uuid.uuid4().hex[:10]}"
    yield f"{dsn}?schema={schema}"
    from qtasks_stream.views.postgres import PostgresViewStore

    dropper = PostgresViewStore(dsn, schema=schema, pool_size=1)
    await dropper.start()
    await dropper.drop()
    await dropper.close()


def _events() -> list[TaskEvent]:
    out: list[TaskEvent] = []
    for block in range(0, TASKS, 50):
        ids = [f"kill-{i:06d}" for i in range(block, block + 50)]
        for payload, attempt in [
            (Submitted("[1]", "{}", 0, tags=("k",)), 0),
            (Scheduled(0, 0), 1),
            (Started("w"), 1),
            (Progress(0, "1"), 1),
            (Succeeded("2", 0.01), 1),
        ]:
            out.extend(TaskEvent.new(t, "job", attempt, "test", payload) for t in ids)
    return out


def _spawn(env: dict[str, str], logs: Path, n: int) -> subprocess.Popen[bytes]:
    with open(logs / f"projector-{n}.log", "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qtasks_stream",
                "-v",
                "worker",
                "-A",
                "tests.apps.view_app:app",
                "--stages",
                "projector",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _applied(view: ViewStore) -> int:
    return sum((await view.positions()).values())


async def _wait(probe: object, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    assert callable(probe)
    deadline = time.monotonic() + LIMIT
    while not await probe():
        assert time.monotonic() < deadline, f"not within {LIMIT}s: {what}"
        for proc in procs:
            assert proc.poll() is None, f"projector {proc.pid} exited ({proc.returncode})"
        await asyncio.sleep(0.05)


async def test_killed_projectors_leave_the_fold_of_the_log(
    view_url: str, kafka_bootstrap: str, schema_registry_url: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env.update(
        QTASKS_BOOTSTRAP_SERVERS=kafka_bootstrap,
        QTASKS_SCHEMA_REGISTRY_URL=schema_registry_url,
        QTASKS_TOPIC_PREFIX=f"kill{uuid.uuid4().hex[:8]}.",
        VIEW_APP_URL=view_url,
        VIEW_APP_BATCH="100",
    )
    client = QueueTasks("projkill", partitions=4, settings=Settings.from_env(env))
    topic = client.topology.events
    await client.event_log.create_topics(client.topology.specs())
    await client.serde.start()
    producer = client.event_log.producer()
    await producer.start()
    events = _events()
    for start in range(0, len(events), 2000):
        await producer.send(
            [
                OutRecord(topic, e.task_id.encode(), client.serde.encode(topic, e.to_avro()))
                for e in events[start : start + 2000]
            ]
        )
    await producer.close()
    consumer = client.event_log.consumer([topic], group_id=None)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(4)]
    ends = await consumer.end_offsets(tps)
    assert sum(ends.values()) == len(events)

    view = open_view(view_url)
    await view.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = [_spawn(env, tmp_path, 0), _spawn(env, tmp_path, 1)]
        total = len(events)
        for n, fraction in enumerate([0.15, 0.4]):

            async def moved(fraction: float = fraction) -> bool:
                return await _applied(view) >= fraction * total

            await _wait(moved, f"{fraction:.0%} applied", procs)
            victim = procs.pop(0)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            applied = await _applied(view)
            assert applied < total, "the run ended before the kill: nothing was tested"
            procs.append(_spawn(env, tmp_path, n + 2))

        async def done() -> bool:
            return await view.positions() == ends

        await _wait(done, "the projectors reached the end of the log", procs)
    finally:
        stop_processes(procs)

    # The reference: the whole log read back and folded here.
    states: dict[str, TaskState] = {}
    for tp in tps:
        consumer.seek(tp, 0)
    seen = 0
    deadline = time.monotonic() + LIMIT
    while seen < len(events) and time.monotonic() < deadline:
        for item in decode_events(client.serde, await consumer.poll(max_records=5000, timeout=1)):
            states[item.event.task_id] = fold(states.get(item.event.task_id), item.event)
            seen += 1
    await consumer.close()
    assert seen == len(events)
    try:
        assert await view.positions() == ends
        assert await view.counts() == {"success": TASKS}
        assert len(await view.query(TaskQuery(limit=10_000))) == TASKS
        for task_id, state in states.items():
            # ``events`` counts applied events: a doubled or skipped one shows here.
            assert await view.state(task_id) == state, task_id
        # A rebuild from offset 0 on the broker gives the same view.
        rebuilt = MemoryViewStore()
        assert await rebuild(client.event_log, client.serde, topic, 4, rebuilt) == len(events)
        assert await rebuilt.positions() == ends
        for task_id, state in states.items():
            assert await rebuilt.state(task_id) == state, task_id
    finally:
        await view.close()
        await client.close()
        await client.event_log.close()
