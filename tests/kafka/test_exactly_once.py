"""Exactly once across stage hops, on the real broker, with workers killed mid-run.

Several ``qtasks-stream worker`` processes share one app through their consumer groups.
The test SIGKILLs workers in the middle of the run (twice), adds new ones, and then checks
the log itself: every task has exactly one terminal event, a view folded from the log
agrees, and the body whose outcome committed ran to success once in that worker process.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.events import TERMINAL_KINDS, Succeeded, TaskEvent
from qtasks_stream.records import TopicPartition
from qtasks_stream.settings import Settings
from qtasks_stream.state import TaskState, fold
from tests.apps.eos_app import build
from tests.processes import stop_processes

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
TASKS = 240


def _env(kind: str, bootstrap: str, prefix: str, side_effects: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env.update(
        QTASKS_BOOTSTRAP_SERVERS=bootstrap,
        QTASKS_EVENT_LOG=kind,
        QTASKS_TOPIC_PREFIX=prefix,
        QTASKS_TRANSACTION_TIMEOUT_MS="10000",
        EOS_SIDE_EFFECTS=str(side_effects),
    )
    registry = os.environ.get("QTASKS_TEST_SCHEMA_REGISTRY_URL")
    if registry:
        env["QTASKS_SCHEMA_REGISTRY_URL"] = registry
    return env


def _pid(worker_id: str) -> str:
    """``worker:<host>-<pid>-<random>`` → pid."""
    return worker_id.split(":")[-1].rsplit("-", 2)[-2]


def _working_pids(side_effects: Path) -> set[str]:
    if not side_effects.exists():
        return set()
    return {line.split()[2] for line in side_effects.read_text().splitlines() if line.strip()}


def _spawn(env: dict[str, str], logs: Path, n: int) -> subprocess.Popen[bytes]:
    # The child keeps its own descriptor of the log; ours is closed at once.
    with open(logs / f"worker-{n}.log", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qtasks_stream", "-v", "worker", "-A", "tests.apps.eos_app:app"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _read_all(log: EventLog, topic: str, partitions: int, serde: object) -> list[TaskEvent]:
    from qtasks_stream.serde.base import Serde

    assert isinstance(serde, Serde)
    consumer = log.consumer([topic], group_id=None, start="earliest")
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    ends = await consumer.end_offsets(tps)
    events: list[TaskEvent] = []
    positions = dict.fromkeys(tps, 0)
    deadline = time.monotonic() + 60
    while any(positions[tp] < ends[tp] for tp in tps) and time.monotonic() < deadline:
        for rec in await consumer.poll(max_records=5000, timeout=1.0):
            events.append(TaskEvent.from_avro(serde.decode(topic, rec.value or b"")))
        for tp in tps:
            # Not the last offset seen: a transactional log ends with a marker never delivered.
            positions[tp] = await consumer.position(tp) or 0
    await consumer.close()
    assert all(positions[tp] >= ends[tp] for tp in tps), "could not read the whole log"
    return events


@pytest.mark.parametrize("kind", ["confluent", "aiokafka"])
async def test_killed_workers_leave_exactly_one_outcome_per_task(
    kind: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = f"eos{uuid.uuid4().hex[:8]}."
    side_effects = tmp_path / "side-effects.txt"
    env = _env(kind, kafka_bootstrap, prefix, side_effects)
    # The test process is a client only: it submits and waits without running any stage.
    client_app = build().configure(Settings.from_env(env))

    workers = [_spawn(env, tmp_path, n) for n in range(2)]
    killed: list[int] = []
    try:
        # Each submit waits for its outcome, pushed by the completion event.
        waits = [
            asyncio.create_task(client_app.add_task("work", i, timeout=240)) for i in range(TASKS)
        ]

        async def finished_at_least(fraction: float, limit: float) -> None:
            deadline = time.monotonic() + limit
            while sum(w.done() for w in waits) < fraction * TASKS:
                assert time.monotonic() < deadline, f"stuck below {fraction:.0%}"
                assert all(p.poll() is None for p in workers if p.pid not in killed)
                await asyncio.sleep(0.05)

        def busy_worker() -> subprocess.Popen[bytes] | None:
            """A live worker that has run bodies: killing it interrupts real work."""
            working = _working_pids(side_effects)
            return next((p for p in workers if p.poll() is None and str(p.pid) in working), None)

        async def kill_busy(limit: float) -> None:
            deadline = time.monotonic() + limit
            while (victim := busy_worker()) is None:
                assert time.monotonic() < deadline, "no worker ever ran a task"
                await asyncio.sleep(0.05)
            victim.send_signal(signal.SIGKILL)
            killed.append(victim.pid)

        # Kill a busy worker a fifth of the way in, add a fresh one, kill another midway.
        await finished_at_least(0.2, 120)
        await kill_busy(60)
        workers.append(_spawn(env, tmp_path, 2))
        await finished_at_least(0.5, 120)
        await kill_busy(60)
        workers.append(_spawn(env, tmp_path, 3))
        done = await asyncio.gather(*waits)
        ids = [t.uuid for t in done if t is not None]
        assert all(t is not None and t.status == "success" for t in done), [
            (t.uuid, t.status) if t else None for t in done if t is None or t.status != "success"
        ]

        events = await _read_all(
            client_app.event_log, client_app.topology.events, 4, client_app.serde
        )
    finally:
        stop_processes(workers)
        await client_app.close()

    terminal = collections.Counter(e.task_id for e in events if e.kind in TERMINAL_KINDS)
    assert set(terminal) == set(ids)
    assert all(terminal[i] == 1 for i in ids), {i: n for i, n in terminal.items() if n != 1}

    view: dict[str, TaskState] = {}
    for event in events:
        view[event.task_id] = fold(view.get(event.task_id), event)
    assert {i: view[i].status for i in ids} == dict.fromkeys(ids, "success")
    # `work(n: int) -> int` is typed: the result is decoded from its Avro record.
    assert {i: view[i].to_task(client_app.payloads).returning for i in ids} == {
        t.uuid: n * 2 for n, t in enumerate(done) if t is not None
    }

    # The body behind each committed outcome ran to success once in that process.
    runs = collections.Counter(
        tuple(line.split()) for line in side_effects.read_text().splitlines()
    )
    for event in events:
        if isinstance(event.payload, Succeeded):
            pid = _pid(event.source)
            assert runs[(event.task_id, str(event.attempt), pid)] == 1, event
    # The kills landed mid-run: two different busy workers died before the run ended.
    assert len(set(killed)) == 2
