"""Reading the events topic outside the stages: replaying it into a new view (or rebuilding
one), and comparing two views.

A replay reads every partition of the events topic on its own (no consumer group, so the
application's stages are not disturbed) from a start position up to the partitions' end
offsets as they were when it began, and folds what it reads into a view store through the
store's own idempotent ``apply``. Records that cannot be decoded are skipped: they are in
the dead-letter topic, and the ``DeadLettered`` event stands for them in the history.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TextIO

from qtasks_stream.errors import ConfigurationError, RecordDecodeError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.reading import read_records
from qtasks_stream.events import event_kind
from qtasks_stream.records import Record, TopicPartition
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.codec import RecordCodec
from qtasks_stream.state import TaskState
from qtasks_stream.views.base import Applied, TaskQuery, ViewStore

__all__ = [
    "ProgressBar",
    "ReplayResult",
    "all_states",
    "compare_views",
    "decode_events",
    "format_positions",
    "parse_offsets",
    "read_events",
    "rebuild",
    "replay_into",
]

_PAGE = 10_000
#: Records decoded between two yields to the event loop (under 1 ms): a store round trip
#: takes several loop turns, and the apply in flight needs a few to end within a batch.
_DECODE_SLICE = 50


class ProgressBar:
    """A one-line progress bar on a text stream, redrawn at most ``rate`` times a second."""

    def __init__(self, out: TextIO | None, total: int, *, rate: float = 4.0) -> None:
        self._out = out
        self._total = max(total, 0)
        self._interval = 1.0 / rate
        self._started = time.monotonic()
        self._drawn = 0.0
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._out is not None and now - self._drawn >= self._interval:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        assert self._out is not None
        elapsed = max(now - self._started, 1e-9)
        share = self.done / self._total if self._total else 1.0
        filled = int(min(share, 1.0) * 30)
        self._out.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {share:6.1%} "
            f"{self.done}/{self._total} offsets  {self.done / elapsed:,.0f} offsets/s"
        )
        self._out.flush()

    def finish(self) -> float:
        """Draw the final state, end the line; returns the seconds since the start."""
        now = time.monotonic()
        if self._out is not None:
            self._draw(now)
            self._out.write("\n")
            self._out.flush()
        return now - self._started


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay read and applied."""

    records: int
    applied: int
    skipped: int
    undecodable: int
    seconds: float
    #: Per partition, the offset the replay read up to (its ends when it began).
    ends: dict[TopicPartition, int]

    @property
    def events_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


def parse_offsets(text: str, topic: str, partitions: int) -> dict[TopicPartition, int]:
    """``"0:10,3:7"`` → start offsets per partition (partitions not named start at 0)."""
    out: dict[TopicPartition, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        partition, sep, offset = part.partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise ConfigurationError(f"offsets are PARTITION:OFFSET,..., not {text!r}")
        if int(partition) >= partitions:
            raise ConfigurationError(
                f"partition {partition} does not exist: {topic} has {partitions} partitions"
            )
        out[TopicPartition(topic, int(partition))] = int(offset)
    return out


def decode_events(serde: Serde, records: Sequence[Record]) -> list[Applied]:
    """The records that decode to a ``TaskEvent``; the others (dead-lettered by the
    pipeline, which records a ``DeadLettered`` event for them) are left out."""
    codec = RecordCodec(serde)
    out: list[Applied] = []
    for rec in records:
        if rec.value is None:
            continue
        try:
            event = codec.event(rec)
        except RecordDecodeError:
            continue
        out.append(Applied(rec.tp, rec.offset, event))
    return out


async def read_events(
    event_log: EventLog,
    serde: Serde,
    topic: str,
    partitions: int,
    on_batch: Callable[[list[Applied]], Awaitable[None]],
    *,
    start: Mapping[TopicPartition, int] | None = None,
    until: Mapping[TopicPartition, int] | None = None,
    kinds: frozenset[str] | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 5000,
    yield_while: Callable[[], bool] | None = None,
) -> tuple[dict[TopicPartition, int], int, int]:
    """:func:`~qtasks_stream.eventlog.reading.read_records` of the events topic, decoded:
    ``on_batch`` gets the events.

    With ``kinds``, records whose kind header names another kind are skipped undecoded.
    While ``yield_while()`` is true, decoding yields to the event loop every
    :data:`_DECODE_SLICE` records: a task of the caller's moves on meanwhile, where polls
    return without yielding while records are buffered.

    Returns:
        the end offsets read up to, the records read, and the records that could not be
        decoded (left out).
    """
    undecodable = 0

    async def decode(records: list[Record]) -> None:
        nonlocal undecodable
        wanted = [
            rec
            for rec in records
            if rec.value is not None
            and (kinds is None or (kind := event_kind(rec.headers)) is None or kind in kinds)
        ]
        if yield_while is None:
            batch = decode_events(serde, wanted)
        else:
            batch = []
            for at in range(0, len(wanted), _DECODE_SLICE):
                if at and yield_while():
                    await asyncio.sleep(0)
                batch += decode_events(serde, wanted[at : at + _DECODE_SLICE])
        undecodable += len(wanted) - len(batch)
        if batch:
            await on_batch(batch)

    ends, read = await read_records(
        event_log,
        topic,
        partitions,
        decode,
        start=start,
        until=until,
        progress=progress,
        batch_size=batch_size,
    )
    return ends, read, undecodable


async def replay_into(
    view: ViewStore,
    event_log: EventLog,
    serde: Serde,
    topic: str,
    partitions: int,
    *,
    start: Mapping[TopicPartition, int] | None = None,
    until: Mapping[TopicPartition, int] | None = None,
    from_us: int | None = None,
    out: TextIO | None = None,
    batch_size: int = 5000,
) -> ReplayResult:
    """Fold ``topic`` into ``view`` (started by the caller) from ``start`` or the view's own
    positions, whichever is further, up to the current end (or ``until``); with ``from_us``,
    events that happened before it are read but not applied. Progress goes to ``out``.

    A store's apply of one batch overlaps the reading and decoding of the next (one apply
    in flight at a time, so batches apply in order): SQLite and PostgreSQL write in a
    thread or on the server meanwhile.
    """
    stored = await view.positions()
    begin = {
        TopicPartition(topic, p): max(
            (start or {}).get(TopicPartition(topic, p), 0),
            stored.get(TopicPartition(topic, p), 0),
        )
        for p in range(partitions)
    }
    probe = event_log.consumer([topic], group_id=None, start="earliest")
    await probe.start()
    try:
        ends = await probe.end_offsets(list(begin))
    finally:
        await probe.close()
    if until is not None:
        ends = {tp: min(end, until.get(tp, end)) for tp, end in ends.items()}
    bar = ProgressBar(out, sum(max(ends[tp] - begin[tp], 0) for tp in begin))
    applied = skipped = 0
    in_flight: asyncio.Task[int] | None = None

    async def apply(batch: list[Applied]) -> None:
        nonlocal applied, skipped, in_flight
        wanted = batch if from_us is None else [a for a in batch if a.event.at_us >= from_us]
        skipped += len(batch) - len(wanted)
        if in_flight is not None:
            applied += await in_flight
            in_flight = None
        if wanted:
            in_flight = asyncio.create_task(view.apply(wanted))
            # Started now: an apply that never waits (the memory store's) ends here, and
            # the next batch then decodes without yielding (each yield cost it a tenth).
            await asyncio.sleep(0)

    def applying() -> bool:
        return in_flight is not None and not in_flight.done()

    try:
        # Up to the ends measured here, which the progress bar's total counts.
        reached, read, undecodable = await read_events(
            event_log,
            serde,
            topic,
            partitions,
            apply,
            start=begin,
            until=ends,
            progress=bar.advance,
            batch_size=batch_size,
            # The apply in flight (a store's round trips, a thread's write) moves on while
            # the next batch decodes, not only once it is awaited.
            yield_while=applying,
        )
        if in_flight is not None:
            applied += await in_flight
    finally:
        if in_flight is not None and not in_flight.done():
            in_flight.cancel()
            await asyncio.gather(in_flight, return_exceptions=True)
    # Past records with nothing to apply (undecodable, or before from_us): the view's
    # positions then say how far it was built, like the projector's.
    await view.advance(reached)
    seconds = bar.finish()
    return ReplayResult(read, applied, skipped, undecodable, seconds, reached)


async def rebuild(
    event_log: EventLog,
    serde: Serde,
    topic: str,
    partitions: int,
    view: ViewStore,
    *,
    batch_size: int = 5000,
) -> int:
    """Rebuild ``view`` (started) from ``topic``: a fresh store from offset 0, one that holds
    positions from them (an interrupted rebuild resumes), up to the end offsets seen at the
    start (events appended meanwhile are the projector's). Returns the events applied."""
    result = await replay_into(view, event_log, serde, topic, partitions, batch_size=batch_size)
    return result.applied


async def all_states(view: ViewStore) -> dict[str, TaskState]:
    """Every task of ``view``, by id (paged through its queries)."""
    out: dict[str, TaskState] = {}
    offset = 0
    # Bounded by the view's size: each page is a full page until the last.
    while True:
        page = await view.query(TaskQuery(limit=_PAGE, offset=offset))
        for task in page:
            state = await view.state(task.uuid)
            if state is not None:
                out[task.uuid] = state
        if len(page) < _PAGE:
            return out
        offset += _PAGE


async def compare_views(expected: ViewStore, actual: ViewStore) -> list[str]:
    """Differences between two views, one line each (empty when they agree): tasks only in
    one of them, and per task the fields whose values differ."""
    left, right = await all_states(expected), await all_states(actual)
    problems: list[str] = []
    for task_id in sorted(left.keys() - right.keys()):
        problems.append(f"{task_id}: only in the live view (status {left[task_id].status})")
    for task_id in sorted(right.keys() - left.keys()):
        problems.append(f"{task_id}: only in the replayed view (status {right[task_id].status})")
    for task_id in sorted(left.keys() & right.keys()):
        a, b = left[task_id], right[task_id]
        for f in fields(TaskState):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                problems.append(f"{task_id}: {f.name} live={va!r} replayed={vb!r}")
    return problems


def format_positions(positions: Mapping[TopicPartition, int]) -> str:
    return ",".join(f"{tp.partition}:{o}" for tp, o in sorted(positions.items()))
