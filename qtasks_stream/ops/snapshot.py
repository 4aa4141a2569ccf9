"""The compacted snapshot topic: every task's state at a known position of the events log.

``<prefix><app>.snapshots`` is keyed by task id and compacted, so it keeps the latest state
of each task. A snapshot is written in **one transaction**: a ``TaskSnapshot`` per task,
then, under the key ``@manifest``, the manifest naming the snapshot and the events offsets
it covers (per partition, the first event not folded in). A reader keeps the latest value
per key, as compaction will, and takes the task records of the manifest's snapshot; as
each snapshot rewrites every task (a new one is built from the previous one plus the log
tail, never smaller), those are all of them. A view then starts from the snapshot and folds
the events topic from the covered offsets on, instead of from offset 0, which also lets the
events topic's retention be shorter than the life of the tasks the views must know.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from qtasks_stream.errors import EventLogError, QTasksStreamError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.reading import read_records
from qtasks_stream.events import now_us
from qtasks_stream.ops.replay import ReplayResult, all_states, replay_into
from qtasks_stream.records import OutRecord, Record, TopicPartition
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.codec import RecordCodec
from qtasks_stream.state import STATE_FIELDS, TaskState
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import ViewStore
from qtasks_stream.views.memory import MemoryViewStore

__all__ = [
    "MANIFEST_KEY",
    "Snapshot",
    "read_snapshot",
    "seed_view",
    "snapshot_every",
    "write_snapshot",
]

log = logging.getLogger("qtasks_stream.ops.snapshot")

MANIFEST_KEY = "@manifest"


@dataclass(frozen=True, slots=True)
class Snapshot:
    snapshot_id: str
    taken_at_us: int
    #: Per events partition, the first offset not folded into the snapshot.
    covers: dict[TopicPartition, int]
    states: list[TaskState]


def _state_to_avro(state: TaskState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in STATE_FIELDS}


def _state_from_avro(data: Mapping[str, Any]) -> TaskState:
    return TaskState(**{name: data[name] for name in STATE_FIELDS})


async def read_snapshot(event_log: EventLog, serde: Serde, topology: Topology) -> Snapshot | None:
    """The latest complete snapshot, or None when none was written.

    Raises:
        EventLogError: the topic holds a manifest whose task records are not all there.
        RecordDecodeError: a record of the latest snapshot cannot be decoded.
    """
    topic = topology.snapshots
    latest: dict[bytes, Record] = {}

    async def keep(records: list[Record]) -> None:
        for rec in records:
            if rec.key is not None:
                if rec.value is None:
                    latest.pop(rec.key, None)  # a tombstone, as compaction reads it
                else:
                    latest[rec.key] = rec

    await read_records(event_log, topic, topology.partitions, keep)
    manifest_record = latest.pop(MANIFEST_KEY.encode(), None)
    if manifest_record is None or manifest_record.value is None:
        return None
    codec = RecordCodec(serde)
    manifest = codec.value(manifest_record)
    snapshot_id = manifest["snapshot_id"]
    states = []
    for rec in latest.values():
        value = codec.value(rec)
        if value["snapshot_id"] == snapshot_id and value["task"] is not None:
            states.append(_state_from_avro(value["task"]))
    if len(states) != manifest["tasks"]:
        raise EventLogError(
            f"snapshot {snapshot_id} in {topic} has {len(states)} of its "
            f"{manifest['tasks']} task records"
        )
    events = manifest["events_topic"]
    covers = {TopicPartition(events, c["partition"]): c["next_offset"] for c in manifest["covers"]}
    return Snapshot(snapshot_id, manifest["taken_at_us"], covers, states)


async def seed_view(view: ViewStore, snapshot: Snapshot) -> None:
    """Put ``snapshot`` into an empty, started ``view``: its states, and its covered offsets
    as the view's positions (so applying the log tail goes on from there)."""
    if await view.positions():
        raise EventLogError("a snapshot can only seed an empty view")
    # (A view leaves out partitions it has applied nothing of: no position is position 0.)
    await view.seed(snapshot.states, {tp: o for tp, o in snapshot.covers.items() if o > 0})


async def write_snapshot(
    event_log: EventLog, serde: Serde, topology: Topology, *, out: TextIO | None = None
) -> tuple[Snapshot, ReplayResult]:
    """Build a snapshot from the latest one plus the events that followed it (from offset 0
    without one) and write it to the snapshot topic in one transaction."""
    base = await read_snapshot(event_log, serde, topology)
    view = MemoryViewStore()
    if base is not None:
        await seed_view(view, base)
    result = await replay_into(
        view, event_log, serde, topology.events, topology.partitions, out=out
    )
    positions = await view.positions()
    covers = {
        TopicPartition(topology.events, p): positions.get(TopicPartition(topology.events, p), 0)
        for p in range(topology.partitions)
    }
    states = sorted((await all_states(view)).values(), key=lambda s: s.task_id)
    snapshot = Snapshot(f"{random.getrandbits(128):032x}", now_us(), covers, states)
    await _write(event_log, serde, topology, snapshot)
    return snapshot, result


async def snapshot_every(
    seconds: float, event_log: EventLog, serde: Serde, topology: Topology, stop: asyncio.Event
) -> int:
    """Write a snapshot every ``seconds`` until ``stop`` is set; returns how many were written.

    A failed snapshot (the log, or another writer that fenced this one) is logged and tried
    again at the next turn: the previous snapshot stays the latest, nothing is half written.
    """
    written = 0
    while not stop.is_set():
        try:
            async with asyncio.timeout(seconds):
                await stop.wait()
            break
        except TimeoutError:
            pass
        try:
            snapshot, result = await write_snapshot(event_log, serde, topology)
        except QTasksStreamError as exc:
            log.warning("snapshot of %s failed, next try in %.0fs: %s", topology.app, seconds, exc)
            continue
        written += 1
        log.info(
            "snapshot %s: %d tasks, %d events folded in %.1fs",
            snapshot.snapshot_id,
            len(snapshot.states),
            result.records,
            result.seconds,
        )
    return written


async def _write(event_log: EventLog, serde: Serde, topology: Topology, snapshot: Snapshot) -> None:
    topic = topology.snapshots
    common = {
        "snapshot_id": snapshot.snapshot_id,
        "taken_at_us": snapshot.taken_at_us,
        "events_topic": topology.events,
    }
    records = [
        OutRecord(
            topic,
            state.task_id.encode(),
            serde.encode(
                topic, {**common, "task": _state_to_avro(state), "covers": [], "tasks": 0}
            ),
        )
        for state in snapshot.states
    ]
    covers = [
        {"partition": tp.partition, "next_offset": offset}
        for tp, offset in sorted(snapshot.covers.items())
    ]
    manifest = {**common, "task": None, "covers": covers, "tasks": len(snapshot.states)}
    records.append(OutRecord(topic, MANIFEST_KEY.encode(), serde.encode(topic, manifest)))
    await _commit(event_log, topology, topic, records)


async def _commit(
    event_log: EventLog, topology: Topology, topic: str, records: Sequence[OutRecord]
) -> None:
    # One transactional id for every snapshot writer: a second writer fences the first,
    # and a reader never sees half a snapshot.
    producer = event_log.producer(transactional_id=topology.group("snapshot"))
    consumer = event_log.consumer([topic], group_id=None)
    await producer.start()
    await consumer.start()
    try:
        await producer.commit_transaction(records, {}, consumer)
    finally:
        await consumer.close()
        await producer.close()
