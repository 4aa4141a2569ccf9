"""Reading a whole topic up to its end offsets, outside any consumer group.

The one loop behind every read of "the log as it is now": replay, rebuild, snapshots,
audit, resubmit and the dead-letter tools. It works on any :class:`EventLog`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.base import Consumer, EventLog
from qtasks_stream.records import Record, TopicPartition

__all__ = ["STALL_LIMIT_S", "read_records"]

#: A read that makes no progress for this long has lost the broker.
STALL_LIMIT_S = 60.0
#: Extra polls that may top up one batch (each bounded by its short timeout).
_FILL_POLLS = 50


async def read_records(
    event_log: EventLog,
    topic: str,
    partitions: int,
    on_records: Callable[[list[Record]], Awaitable[None]],
    *,
    start: Mapping[TopicPartition, int] | None = None,
    until: Mapping[TopicPartition, int] | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 5000,
) -> tuple[dict[TopicPartition, int], int]:
    """Read ``topic`` from ``start`` (0 where not given) to its end offsets as of now (or
    ``until``, where given and earlier), handing the records to ``on_records`` in batches
    of up to ``batch_size``, in log order per partition. ``progress`` gets the offsets
    covered by each batch (transaction markers included). Returns the end offsets read up
    to and the number of records read.

    Raises:
        EventLogError: no record and no position moved for :data:`STALL_LIMIT_S` seconds.
    """
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = event_log.consumer([topic], group_id=None, start="earliest")
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
        if until is not None:
            ends = {tp: min(end, until.get(tp, end)) for tp, end in ends.items()}
        starts = {tp: min((start or {}).get(tp, 0), ends[tp]) for tp in tps}
        pending = {tp for tp in tps if starts[tp] < ends[tp]}
        for tp in tps:
            consumer.seek(tp, starts[tp])
        consumer.pause([tp for tp in tps if tp not in pending], True)
        read = 0
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        #: Per partition, the offset after the last record read: progress counts offsets, so
        #: that transaction markers (never delivered) are counted when a partition ends.
        covered = dict(starts)
        while pending:
            polled = await _fill(consumer, batch_size)
            records = [r for r in polled if r.tp in pending and r.offset < ends[r.tp]]
            if records:
                await on_records(records)
                read += len(records)
            before = sum(covered.values())
            for rec in records:
                covered[rec.tp] = rec.offset + 1
            moved = await _finished(consumer, pending, ends)
            for tp in tps:
                if tp not in pending:
                    covered[tp] = ends[tp]
            if progress is not None and sum(covered.values()) > before:
                progress(sum(covered.values()) - before)
            if records or moved:
                last_progress = loop.time()
            elif loop.time() - last_progress > STALL_LIMIT_S:
                raise EventLogError(
                    f"reading {topic} made no progress for {STALL_LIMIT_S:.0f}s "
                    f"({len(pending)} partitions short of their end)"
                )
        return dict(ends), read
    finally:
        await consumer.close()


async def _fill(consumer: Consumer, batch_size: int) -> list[Record]:
    # Top the batch up while records keep coming: whoever handles it pays per batch (a
    # view store per transaction), and a client that hands out what it has buffered
    # (confluent-kafka's) returns small polls, which made SQLite rebuilds half as fast.
    records = await consumer.poll(max_records=batch_size, timeout=0.5)
    for _ in range(_FILL_POLLS):
        if not records or len(records) >= batch_size:
            break
        more = await consumer.poll(max_records=batch_size - len(records), timeout=0.05)
        if not more:
            break
        records += more
    return records


async def _finished(
    consumer: Consumer, pending: set[TopicPartition], ends: Mapping[TopicPartition, int]
) -> bool:
    # "Reached the end" is the consumer's position, never the last record's offset + 1: a
    # transactional partition ends with a commit marker that is never delivered.
    done = []
    for tp in pending:
        position = await consumer.position(tp)
        if position is not None and position >= ends[tp]:
            done.append(tp)
    if done:
        pending.difference_update(done)
        consumer.pause(done, True)
    return bool(done)
