"""Stream triggers on the dev broker: every record of a foreign Avro topic (its schema in the
registry, read by the workers through its id) starts one task, with a worker process
SIGKILLed mid-way and another taking over; poison records are dead-lettered."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema

from qtasks_stream.events import TERMINAL_KINDS, Submitted, TaskEvent
from qtasks_stream.records import OutRecord, Record, TopicPartition, TopicSpec
from qtasks_stream.serde import wire
from qtasks_stream.settings import Settings
from qtasks_stream.stages.runner import DLQ_SOURCE, DLQ_STAGE
from qtasks_stream.triggers import trigger_task_id
from tests.apps.trigger_app import build
from tests.kafka.test_exactly_once import _env
from tests.processes import stop_processes

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

RECORDS = 1000
#: Not Avro, too short, and a schema id the registry does not know.
POISON = [b'{"n": 1}', b"\x00\x00", b"\x00\x7f\xff\xff\xf0\x02"]
#: The other team's schema, registered by them, not by the app.
ORDER = {
    "type": "record",
    "name": "Order",
    "namespace": "sales",
    "fields": [{"name": "n", "type": "long"}, {"name": "note", "type": "string"}],
}


def _spawn(env: dict[str, str], logs: Path, n: int) -> subprocess.Popen[bytes]:
    import sys

    with open(logs / f"worker-{n}.log", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qtasks_stream", "worker", "-A", "tests.apps.trigger_app:app"],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _ran(side_effects: Path) -> list[tuple[str, str]]:
    if not side_effects.exists():
        return []
    lines = side_effects.read_text().splitlines()
    return [(parts[0], parts[1]) for line in lines if len(parts := line.split()) == 2]


async def _read(app_log: object, topic: str, partitions: int) -> list[Record]:
    from qtasks_stream.eventlog.base import EventLog

    assert isinstance(app_log, EventLog)
    consumer = app_log.consumer([topic], group_id=None, start="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        records: list[Record] = []
        positions = dict.fromkeys(tps, 0)
        deadline = time.monotonic() + 60
        while any(positions[tp] < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic}"
            records.extend(await consumer.poll(max_records=5000, timeout=1.0))
            for tp in tps:
                positions[tp] = await consumer.position(tp) or 0
        return records
    finally:
        await consumer.close()


async def test_a_thousand_records_start_a_thousand_tasks_across_a_kill(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = f"trig{uuid.uuid4().hex[:8]}."
    topic = f"{prefix}foreign.orders"
    side_effects = tmp_path / "side-effects.txt"
    env = _env("confluent", kafka_bootstrap, prefix, side_effects)
    env.update(TRIGGER_TOPIC=topic, TRIGGER_SIDE_EFFECTS=str(side_effects))
    app = build(topic).configure(Settings.from_env(env))
    await app.connect()  # the app's topics and schemas, to read its log at the end
    log = app.event_log
    await log.create_topics([TopicSpec(topic, 4)])
    producer = log.producer()  # the other team's plain producer
    await producer.start()
    schema_id = app._registry.register_schema(f"{topic}-value", Schema(json.dumps(ORDER), "AVRO"))
    parsed = fastavro.parse_schema(ORDER)

    async def write(numbers: range, poison: Sequence[bytes]) -> None:
        records = [
            OutRecord(
                topic,
                f"o{n}".encode(),
                wire.write(parsed, wire.header(schema_id), {"n": n, "note": "x"}, "order"),
            )
            for n in numbers
        ]
        records += [OutRecord(topic, b"poison", value) for value in poison]
        await producer.send(records)

    async def ran_at_least(count: int, limit: float) -> None:
        deadline = time.monotonic() + limit
        while len({task for task, _ in _ran(side_effects)}) < count:
            assert time.monotonic() < deadline, f"fewer than {count} tasks ran in {limit}s"
            assert all(p.poll() is None for p in workers if p.pid not in killed)
            await asyncio.sleep(0.1)

    workers = [_spawn(env, tmp_path, n) for n in range(2)]
    killed: list[int] = []
    try:
        await write(range(RECORDS // 2), POISON[:1])
        await ran_at_least(RECORDS // 4, 60)
        # Kill a worker that ran bodies, so it held trigger partitions mid-way.
        busy = {pid for _, pid in _ran(side_effects)}
        victim = next(p for p in workers if str(p.pid) in busy)
        victim.send_signal(signal.SIGKILL)
        killed.append(victim.pid)
        await write(range(RECORDS // 2, RECORDS), POISON[1:])
        workers.append(_spawn(env, tmp_path, 2))
        await ran_at_least(RECORDS, 90)

        # Every task ended once (bodies may rerun after the kill; outcomes may not).
        deadline = time.monotonic() + 30
        while True:
            read = await _read(log, app.topology.events, app.topology.partitions)
            events = [
                TaskEvent.from_avro(app.serde.decode(app.topology.events, r.value or b""))
                for r in read
            ]
            terminal = collections.Counter(e.task_id for e in events if e.kind in TERMINAL_KINDS)
            if len(terminal) >= RECORDS or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        dead = await _read(log, app.topology.deadletter, app.topology.partitions)
        source = await _read(log, topic, 4)
    finally:
        await producer.close()
        stop_processes(workers)
        await app.close()

    good = [r for r in source if r.key != b"poison"]
    assert len(good) == RECORDS
    expected = {trigger_task_id("trig", "ship", topic, r.partition, r.offset) for r in good}
    submits = collections.Counter(e.task_id for e in events if isinstance(e.payload, Submitted))
    assert set(submits) == expected
    assert all(n == 1 for n in submits.values()), {t: n for t, n in submits.items() if n != 1}
    twice = {t: n for t, n in terminal.items() if n != 1}
    # Where each event of a task that ended twice sits in the log, with its payload: which
    # worker wrote which outcome, in which order.
    assert not twice, "\n".join(
        f"{r.partition}/{r.offset} {e.at_us} {e.task_id} {e.kind} {e.source} "
        f"attempt={e.attempt} event_id={e.event_id} {e.payload!r}"
        for r, e in zip(read, events, strict=True)
        if e.task_id in twice
    )
    assert set(terminal) == expected
    assert all(e.source == "trigger" for e in events if isinstance(e.payload, Submitted))

    poison = {f"{r.topic}/{r.partition}/{r.offset}": r.value for r in source if r.key == b"poison"}
    letters = {
        dict(r.headers)[DLQ_SOURCE].decode(): r.value
        for r in dead
        if dict(r.headers).get(DLQ_STAGE) == b"trigger"
    }
    assert letters == poison and sorted(poison.values()) == sorted(POISON)
    assert len(killed) == 1
