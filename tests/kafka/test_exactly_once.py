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

from qtasks_stream.cli import configure
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.events import TERMINAL_KINDS, Succeeded, TaskEvent
from qtasks_stream.records import TopicPartition
from qtasks_stream.state import TaskState, fold
from tests.apps.eos_app import build

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


def _spawn(env: dict[str, str], logs: Path, n: int) -> subprocess.Popen[bytes]:
    out = open(logs / f"worker-{n}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "qtasks_stream", "worker", "-A", "tests.apps.eos_app:app"],
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
            positions[rec.tp] = rec.offset + 1
            events.append(TaskEvent.from_avro(serde.decode(topic, rec.value or b"")))
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
    client_app = configure(build(), env)

    workers = [_spawn(env, tmp_path, n) for n in range(2)]
    killed: list[int] = []
    try:
        submitted = [await client_app.add_task("work", i) for i in range(TASKS)]
        ids = [t.uuid for t in submitted if t is not None]
        assert len(ids) == TASKS
        waits = [asyncio.create_task(client_app.wait(i, timeout=240)) for i in ids]

        async def finished_at_least(fraction: float, limit: float) -> None:
            deadline = time.monotonic() + limit
            while sum(w.done() for w in waits) < fraction * TASKS:
                assert time.monotonic() < deadline, f"stuck below {fraction:.0%}"
                assert all(p.poll() is None for p in workers if p.pid not in killed)
                await asyncio.sleep(0.05)

        # Kill one worker a fifth of the way in, add a fresh one, kill another midway.
        await finished_at_least(0.2, 120)
        workers[0].send_signal(signal.SIGKILL)
        killed.append(workers[0].pid)
        workers.append(_spawn(env, tmp_path, 2))
        await finished_at_least(0.5, 120)
        workers[1].send_signal(signal.SIGKILL)
        killed.append(workers[1].pid)
        workers.append(_spawn(env, tmp_path, 3))
        done = await asyncio.gather(*waits)
        assert all(t is not None and t.status == "success" for t in done), [
            (t.uuid, t.status) if t else None for t in done if t is None or t.status != "success"
        ]

        events = await _read_all(
            client_app.event_log, client_app.topology.events, 4, client_app.serde
        )
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        await client_app.close()

    terminal = collections.Counter(e.task_id for e in events if e.kind in TERMINAL_KINDS)
    assert set(terminal) == set(ids)
    assert all(terminal[i] == 1 for i in ids), {i: n for i, n in terminal.items() if n != 1}

    view: dict[str, TaskState] = {}
    for event in events:
        view[event.task_id] = fold(view.get(event.task_id), event)
    assert {i: view[i].status for i in ids} == dict.fromkeys(ids, "success")
    assert {i: view[i].result for i in ids} == {
        t.uuid: str(n * 2) for n, t in enumerate(done) if t is not None
    }

    # The body behind each committed outcome ran to success once in that process.
    runs = collections.Counter(
        tuple(line.split()) for line in side_effects.read_text().splitlines()
    )
    for event in events:
        if isinstance(event.payload, Succeeded):
            pid = _pid(event.source)
            assert runs[(event.task_id, str(event.attempt), pid)] == 1, event
    # The kills landed mid-run: each killed process had started attempts before it died.
    started_by = {_pid(e.source) for e in events if e.kind == "Started"}
    assert {str(pid) for pid in killed} <= started_by
