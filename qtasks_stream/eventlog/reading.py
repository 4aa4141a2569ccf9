"""The two ways to read a topic outside the stages, on any :class:`EventLog`.

:func:`read_records` reads "the log as it is now": every partition (or some) up to its end
offsets, outside any consumer group. Replay, rebuild, snapshots, audit, resubmit, the
dead-letter tools, workflow trees, schedules and a task's history use it.

:func:`follow` tails a topic without end: it hands each polled batch to a callback and
rides out a failing broker. The worker's control listener and the result listener use it.
(The stage runner keeps its own loop: it orders polls, handling and commits.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import NoReturn

from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.base import Consumer, EventLog
from qtasks_stream.records import Record, TopicPartition

__all__ = ["STALL_LIMIT_S", "follow", "read_records"]

log = logging.getLogger("qtasks_stream.reading")

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
    only: Collection[int] | None = None,
    since_ms: int | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 5000,
) -> tuple[dict[TopicPartition, int], int]:
    """Read ``topic`` (of ``partitions`` partitions, or only the partitions numbered in
    ``only``) from ``start`` (0 where not given) to its end offsets as of now (or
    ``until``, where given and earlier), handing the records to ``on_records`` in batches
    of up to ``batch_size``, in log order per partition. With ``since_ms``, each partition
    starts no earlier than its first record stamped at or after that Unix time in
    milliseconds. ``progress`` gets the offsets covered by each batch (transaction markers
    included). Returns the end offsets read up to (of the partitions read) and the number
    of records read.

    Raises:
        EventLogError: no record and no position moved for :data:`STALL_LIMIT_S` seconds.
    """
    tps = [TopicPartition(topic, p) for p in (range(partitions) if only is None else only)]
    consumer = event_log.consumer([topic], group_id=None, start="earliest")
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
        if until is not None:
            ends = {tp: min(end, until.get(tp, end)) for tp, end in ends.items()}
        starts = {tp: min((start or {}).get(tp, 0), ends[tp]) for tp in tps}
        if since_ms is not None:
            found = await consumer.offsets_for_time(tps, since_ms)
            starts = {tp: min(max(starts[tp], found[tp]), ends[tp]) for tp in tps}
        pending = {tp for tp in tps if starts[tp] < ends[tp]}
        for tp in tps:
            consumer.seek(tp, starts[tp])
        # A consumer outside a group is assigned every partition: fetch only those read.
        every = {TopicPartition(topic, p) for p in range(partitions)}
        consumer.pause(sorted(every.union(tps) - pending), True)
        read = 0
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        #: Per partition, the offset after the last record read: progress counts offsets, so
        #: that transaction markers (never delivered) are counted when a partition ends.
        covered = dict(starts)
        while pending:
            polled = await _fill(consumer, batch_size, pending, ends)
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


async def _fill(
    consumer: Consumer,
    batch_size: int,
    pending: set[TopicPartition],
    ends: Mapping[TopicPartition, int],
) -> list[Record]:
    # Top the batch up while records keep coming: whoever handles it pays per batch (a
    # view store per transaction), and a client that hands out what it has buffered
    # (confluent-kafka's) returns small polls, which made SQLite rebuilds half as fast.
    # Not once every partition is read to its end: that poll would only wait out its
    # timeout, on every short read (a task's history, behind get() and wait()).
    records = await consumer.poll(max_records=batch_size, timeout=0.5)
    for _ in range(_FILL_POLLS):
        if not records or len(records) >= batch_size or await _all_read(consumer, pending, ends):
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


async def _all_read(
    consumer: Consumer, pending: set[TopicPartition], ends: Mapping[TopicPartition, int]
) -> bool:
    for tp in pending:
        position = await consumer.position(tp)
        if position is None or position < ends[tp]:
            return False
    return True


async def follow(
    consumer: Consumer,
    on_records: Callable[[list[Record]], Awaitable[None]],
    *,
    what: str,
    max_records: int = 500,
    timeout: float = 10.0,
    backoff: float = 0.5,
    max_backoff: float = 10.0,
) -> NoReturn:
    """Poll the started ``consumer`` from where it stands, without end, handing every
    non-empty batch to ``on_records``; ends when cancelled, or with what ``on_records``
    raises.

    A poll that fails with :class:`EventLogError` (a broker restarting, a lost connection)
    is tried again after a back-off that doubles from ``backoff`` to ``max_backoff``
    seconds. One warning names ``what`` at the first failure of a run of them, and an info
    line says when polls work again: a broker down for minutes writes one warning, not
    hundreds.

    A poll returns as soon as records arrive: ``timeout`` only bounds how often an idle
    listener wakes (the worker's control listener and the client's result listener).
    """
    failures = 0
    delay = backoff
    while True:
        try:
            records = await consumer.poll(max_records=max_records, timeout=timeout)
        except EventLogError as exc:
            if failures == 0:
                log.warning(
                    "%s: poll failed (%s); retrying with back-off up to %gs",
                    what,
                    exc,
                    max_backoff,
                )
            failures += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff)
            continue
        if failures:
            log.info("%s: polls work again after %d failed", what, failures)
            failures, delay = 0, backoff
        if records:
            await on_records(records)
