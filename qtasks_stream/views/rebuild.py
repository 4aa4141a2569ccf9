"""Rebuilding a view: the events topic folded into a store, without a consumer group.

A fresh store starts every partition at offset 0; a store that already holds positions
continues from them (an interrupted rebuild resumes). The end is each partition's end offset
when the rebuild starts: events appended meanwhile are left to the projector.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from qtasks_stream.errors import SerdeError, ViewStoreError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.events import TaskEvent, event_kind
from qtasks_stream.records import Record, TopicPartition
from qtasks_stream.serde.base import Serde
from qtasks_stream.views.base import Applied, ViewStore

__all__ = ["decode_events", "rebuild"]

#: Extra polls that may top up one batch (each bounded by its timeout).
_FILL_POLLS = 50


def decode_events(serde: Serde, records: Sequence[Record]) -> list[Applied]:
    """The records that decode to a ``TaskEvent``; the others (dead-lettered by the
    pipeline, which records a ``DeadLettered`` event for them) are left out."""
    out: list[Applied] = []
    for rec in records:
        if rec.value is None:
            continue
        try:
            value = serde.decode(rec.topic, rec.value, branch=event_kind(rec.headers))
            event = TaskEvent.from_avro(value)
        except (SerdeError, KeyError, TypeError, ValueError):
            continue
        out.append(Applied(rec.tp, rec.offset, event))
    return out


async def rebuild(
    event_log: EventLog,
    serde: Serde,
    topic: str,
    partitions: int,
    view: ViewStore,
    *,
    batch_size: int = 5000,
    limit: float = 3600.0,
) -> int:
    """Fold ``topic`` (``partitions`` partitions) into the started ``view`` up to the end
    offsets seen at the start; returns the number of events applied.

    Raises:
        ViewStoreError: the store failed, or the end was not reached within ``limit`` seconds.
    """
    consumer = event_log.consumer([topic], group_id=None, start="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        end_of = {tp.partition: end for tp, end in ends.items()}
        stored = await view.positions()
        reached = {tp: stored.get(tp, 0) for tp in tps}
        todo = {tp for tp in tps if reached[tp] < ends[tp]}
        for tp in tps:
            consumer.seek(tp, reached[tp])
        consumer.pause([tp for tp in tps if tp not in todo], True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        applied = 0
        while todo:
            if loop.time() > deadline:
                raise ViewStoreError(f"rebuilding the view from {topic} took over {limit:g}s")
            records = await consumer.poll(max_records=batch_size, timeout=0.5)
            # Fill the batch while records keep coming: a store pays per transaction, and a
            # client that hands out what it has buffered (confluent-kafka's) returns small
            # polls, which made SQLite rebuilds half as fast as through aiokafka.
            for _ in range(_FILL_POLLS):
                if not records or len(records) >= batch_size:
                    break
                more = await consumer.poll(max_records=batch_size - len(records), timeout=0.05)
                if not more:
                    break
                records += more
            # Keyed by partition number, not TopicPartition: cheaper per record (one topic).
            batch = decode_events(serde, [r for r in records if r.offset < end_of[r.partition]])
            applied += await view.apply(batch)
            last: dict[int, int] = {}
            for item in batch:
                last[item.tp.partition] = item.offset + 1
            for partition, offset in last.items():
                reached[tps[partition]] = offset
            # Past the last event: undecodable records and transaction markers.
            skipped: dict[TopicPartition, int] = {}
            for tp in {tps[p] for p in {r.partition for r in records}} | todo:
                position = min(await consumer.position(tp) or 0, ends[tp])
                if position > reached[tp]:
                    skipped[tp] = reached[tp] = position
                if reached[tp] >= ends[tp] and tp in todo:
                    todo.discard(tp)
                    consumer.pause([tp], True)
            if skipped:
                await view.advance(skipped)
        return applied
    finally:
        await consumer.close()
