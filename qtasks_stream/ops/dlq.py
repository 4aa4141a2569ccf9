"""Inspecting the dead-letter topic and replaying dead letters into their stage.

A replay re-produces a dead letter's original key, bytes and headers (without the
``qtasks.dlq.*`` headers the runner added, plus ``qtasks.dlq.replayed_from``) to its original
topic, so the stage that gave up reads it again once the cause is fixed.

**At most once per original record.** Every replay also appends to the events topic, under
the record's key, a ``Resubmitted`` event (mode ``dlq_replay``) whose ``dlq_source`` is the
original record's ``topic/partition/offset``; the copy and that marker are written in one
transaction, so neither is visible without the other. Before replaying, the replayer reads
every marker in the events topic (only ``Resubmitted`` records are decoded) and skips
records already replayed; several stages that gave up on one record count as one. All
replayers of an application share one transactional id, and the replayer opens its producer
(fencing any other replayer still running) *before* it reads the markers: a replayer that
read the markers before another one committed is fenced, and its transaction fails with
nothing written. The marker also records the replay in the task's history and re-opens a
dead-lettered task so that what the stage does next counts. A replayed ``Submitted`` makes
the task new again, and the scheduler schedules it (see ``state.fold``).

**Only after the dead letter is in the task's history.** A letter is replayed once the
deadletter stage has written its ``DeadLettered`` event: written after the replay, that
event would end the task the replay had re-opened. Until then the replayer says "not yet".

Records without a key cannot carry a marker in any task's history and are not replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.reading import read_records
from qtasks_stream.events import DLQ_REPLAY, DeadLettered, Resubmitted, TaskEvent, as_record
from qtasks_stream.ops.replay import read_events
from qtasks_stream.records import Headers, OutRecord, Record
from qtasks_stream.serde.base import Serde
from qtasks_stream.stages.runner import DLQ_ERROR, DLQ_REASON, DLQ_SOURCE, DLQ_STAGE
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import Applied

__all__ = ["REPLAYED_FROM", "DeadLetter", "ReplayOutcome", "list_dead_letters", "replay"]

#: Header on a replayed copy: ``topic/partition/offset`` of the dead letter it came from.
REPLAYED_FROM = "qtasks.dlq.replayed_from"
_DLQ_PREFIX = "qtasks.dlq."


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    #: The original record's headers (without ``qtasks.dlq.*``).
    headers: Headers
    reason: str
    stage: str
    #: ``topic/partition/offset`` of the original record.
    source: str
    error_type: str
    timestamp_ms: int

    @property
    def source_topic(self) -> str:
        return self.source.rsplit("/", 2)[0]

    @property
    def task_id(self) -> str | None:
        if self.key is None:
            return None
        try:
            return self.key.decode()
        except UnicodeDecodeError:
            return None

    def to_json(self, topic: str) -> dict[str, Any]:
        return {
            "topic": topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.task_id if self.task_id is not None else self.key and self.key.hex(),
            "reason": self.reason,
            "stage": self.stage,
            "source": self.source,
            "error_type": self.error_type,
            "timestamp_ms": self.timestamp_ms,
            "value_bytes": len(self.value or b""),
            "headers": {k: v.decode(errors="replace") for k, v in self.headers},
        }


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    letter: DeadLetter
    #: ``replayed``, ``would replay`` (dry run), ``already replayed``, or why it was refused.
    result: str


def _letter(rec: Record) -> DeadLetter:
    ours = {k: v.decode(errors="replace") for k, v in rec.headers if k.startswith(_DLQ_PREFIX)}
    original = tuple((k, v) for k, v in rec.headers if not k.startswith(_DLQ_PREFIX))
    return DeadLetter(
        rec.partition,
        rec.offset,
        rec.key,
        rec.value,
        original,
        ours.get(DLQ_REASON, ""),
        ours.get(DLQ_STAGE, ""),
        ours.get(DLQ_SOURCE, ""),
        ours.get(DLQ_ERROR, ""),
        rec.timestamp_ms,
    )


async def list_dead_letters(event_log: EventLog, topology: Topology) -> list[DeadLetter]:
    """Every record of the dead-letter topic, by partition and offset."""
    letters: list[DeadLetter] = []

    async def take(records: list[Record]) -> None:
        letters.extend(_letter(r) for r in records)

    await read_records(event_log, topology.deadletter, topology.partitions, take)
    return sorted(letters, key=lambda d: (d.partition, d.offset))


async def replayed_sources(event_log: EventLog, serde: Serde, topology: Topology) -> set[str]:
    """Original records (``topic/partition/offset``) already replayed, from the markers."""
    replayed, _ = await _marks(event_log, serde, topology)
    return replayed


async def _marks(
    event_log: EventLog, serde: Serde, topology: Topology
) -> tuple[set[str], set[str]]:
    """Sources already replayed, and sources whose ``DeadLettered`` event is in the log."""
    replayed: set[str] = set()
    recorded: set[str] = set()

    async def take(batch: list[Applied]) -> None:
        for item in batch:
            payload = item.event.payload
            if isinstance(payload, Resubmitted) and payload.mode == DLQ_REPLAY:
                replayed.add(payload.dlq_source or "")
            elif isinstance(payload, DeadLettered):
                recorded.add(
                    f"{payload.source_topic}/{payload.source_partition}/{payload.source_offset}"
                )

    await read_events(
        event_log,
        serde,
        topology.events,
        topology.partitions,
        take,
        kinds=frozenset({"Resubmitted", "DeadLettered"}),
    )
    return replayed, recorded


async def replay(
    event_log: EventLog,
    serde: Serde,
    topology: Topology,
    select: Callable[[DeadLetter], bool],
    *,
    reason: str = "",
    dry_run: bool = False,
) -> list[ReplayOutcome]:
    """Replay the dead letters ``select`` picks (see the module docstring)."""
    producer = event_log.producer(transactional_id=topology.group("dlq-replay"))
    consumer = event_log.consumer([topology.deadletter], group_id=None)
    # Opened first: fences a replayer still running before the markers are read.
    await producer.start()
    await consumer.start()
    try:
        done, recorded = await _marks(event_log, serde, topology)
        outcomes: list[ReplayOutcome] = []
        records: list[OutRecord] = []
        for letter in await list_dead_letters(event_log, topology):
            if not select(letter):
                continue
            outcome = _plan(letter, done, recorded, topology, serde, reason, records)
            outcomes.append(ReplayOutcome(letter, outcome))
        if records and not dry_run:
            await producer.commit_transaction(records, {}, consumer)
        if dry_run:
            outcomes = [
                ReplayOutcome(o.letter, "would replay") if o.result == "replayed" else o
                for o in outcomes
            ]
        return outcomes
    finally:
        await consumer.close()
        await producer.close()


def _plan(
    letter: DeadLetter,
    done: set[str],
    recorded: set[str],
    topology: Topology,
    serde: Serde,
    reason: str,
    records: list[OutRecord],
) -> str:
    task_id = letter.task_id
    parts = letter.source.rsplit("/", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return f"refused: no original position in its {DLQ_SOURCE} header"
    if task_id is None:
        return "refused: no (UTF-8) key, so no history to record the replay in"
    if letter.source in done:
        return "already replayed"
    if letter.source not in recorded:
        # Its DeadLettered event, once written, would end the task the replay re-opened.
        return "not yet: no DeadLettered event for it in the log (is the deadletter stage up?)"
    done.add(letter.source)  # two stages' dead letters of one record: replayed once
    marker = TaskEvent.new(
        task_id,
        "",
        0,
        "dlq-replay",
        Resubmitted(reason, "dead_letter", DLQ_REPLAY, dlq_source=letter.source),
    )
    dlq_id = f"{topology.deadletter}/{letter.partition}/{letter.offset}"
    records.append(as_record(serde, topology.events, task_id, marker))
    records.append(
        OutRecord(
            letter.source_topic,
            letter.key,
            letter.value,
            (*letter.headers, (REPLAYED_FROM, dlq_id.encode())),
        )
    )
    return "replayed"
