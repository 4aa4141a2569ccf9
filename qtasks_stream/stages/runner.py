"""Runs one stage against the event log, and alone decides when things become visible.

Commit order, enforced in :meth:`_RunnerCheckpoint.commit` and nowhere else:

1. Outputs the stage emitted since the last commit (events, work items, control commands,
   dead letters) are produced in one transaction, in emission order, so one task's events
   keep their order. Outputs tied to an input whose partition was revoked are dropped, and
   outputs tied to an input whose offset cannot be committed in this transaction (an
   earlier record of its partition is still in flight) wait for a later one.
2. The offsets of consumed records that are fully handled are added to that transaction,
   per partition only up to the first record still in flight (a later record finishing
   first never lets an earlier one be skipped).
3. A transaction with outputs but no offset that moved still sends one offset: that of an
   owned partition as it stands (what this assignment last committed, or the group's
   committed offset when the partition was assigned), so nothing moves. Offsets go with the
   consumer's group metadata (KIP-447), so the broker refuses them, and the whole
   transaction, from a member of an old generation: a member that lost its partitions
   without knowing (a zombie after a pause) cannot commit outputs its successor also
   writes, such as a route or a tick decided by a timer. (Not the read position: records
   fetched but still in flight would be skipped by a crash after it.)
4. The transaction commits: outputs and offsets become visible together or not at all.
   If it fails (fenced by a newer generation or instance), nothing is visible, the runner
   drops its partitions and state and rejoins; the new owner redoes the work.

One batch per poll and one transaction per loop turn, never one per record; the next batch
is polled and handled while a transaction is written.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from qtasks_stream.errors import (
    ConfigurationError,
    EventLogError,
    FencedError,
    RecordDecodeError,
    RegistryUnavailableError,
)
from qtasks_stream.eventlog.base import Consumer, EventLog, Producer
from qtasks_stream.events import ControlCommand, TaskEvent, WorkItem, as_record
from qtasks_stream.interceptors import (
    EmitInput,
    Interceptor,
    StepInput,
    chain_emit,
    chain_step,
    wants,
)
from qtasks_stream.records import OutRecord, Record, TopicPartition
from qtasks_stream.schedules.records import ScheduleEvent
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.codec import Decodable, RecordCodec
from qtasks_stream.stages.base import Checkpoint, Incoming, Stage
from qtasks_stream.topology import Topology

__all__ = ["StageRunner"]

log = logging.getLogger("qtasks_stream.runner")

#: The longest poll of a stage that found nothing for a while: each empty poll doubles the
#: timeout from ``poll_timeout`` up to this, the first record brings it back. A poll
#: returns as soon as records arrive, so this costs no latency; waking every 0.2 s in every
#: stage was a third of an idle worker process's CPU, and every 2 s still 0.11% of a core
#: (the event loop woke 3.5 times a second for the seven stages; timers a stage keeps say
#: when they are due through :meth:`Stage.tick`).
IDLE_POLL_TIMEOUT = 10.0

_RECORD_TYPES: dict[str, Decodable[Any]] = {
    "TaskEvent": TaskEvent,
    "WorkItem": WorkItem,
    "ControlCommand": ControlCommand,
    "ScheduleEvent": ScheduleEvent,
}

#: Offsets with no output to go with them commit at most this often (seconds): nothing
#: waits for them (outputs commit at once, with their inputs' offsets), and each is a
#: transaction beside those a task waits for. One task at a time, the scheduler, projector
#: and workflow stages wrote six offset-only transactions beside the worker's one.
OFFSETS_ONLY_EVERY_S = 0.2

#: Header names of dead letters; the original headers come first, unchanged.
DLQ_REASON = "qtasks.dlq.reason"
DLQ_STAGE = "qtasks.dlq.stage"
DLQ_SOURCE = "qtasks.dlq.source"
DLQ_ERROR = "qtasks.dlq.error_type"


class _Offsets:
    """One assignment of one partition: records handed to the stage, in order, and which of
    them are done. A partition revoked and assigned again gets a new one, so late results of
    the old assignment can neither commit offsets nor outputs for the new."""

    __slots__ = ("committed", "done", "inflight", "next_commit", "records")

    def __init__(self) -> None:
        self.inflight: deque[int] = deque()
        self.records: dict[int, Record] = {}
        self.done: set[int] = set()
        self.next_commit = -1
        #: The group's committed offset when the partition was assigned (-1: none).
        self.committed = -1

    def standing(self) -> int:
        """The offset committed as things stand (-1: none known): re-sent, it moves nothing."""
        return self.next_commit if self.next_commit >= 0 else self.committed

    def advance(self) -> int | None:
        """The new offset to commit, if the done prefix grew."""
        moved = False
        while self.inflight and self.inflight[0] in self.done:
            offset = self.inflight.popleft()
            self.done.discard(offset)
            self.next_commit = offset + 1
            moved = True
        return self.next_commit if moved else None


#: An output, the partition and assignment of its input, and the input's offset (-1: none).
_Output = tuple[OutRecord, TopicPartition | None, "_Offsets | None", int]


class _RunnerCheckpoint(Checkpoint):
    def __init__(self, runner: StageRunner, interceptors: Sequence[Interceptor] = ()) -> None:
        self._runner = runner
        self._serde = runner.serde
        self._stage_name = runner.stage.name
        # Only built when an interceptor wraps emits: without one, emit stays a direct call.
        self._emit_chain = (
            chain_emit(interceptors, self._emit_input, self._stage_name)
            if wants(interceptors, "emit", self._stage_name)
            else None
        )
        #: Outputs with the assignment and offset of the input they came from (None: none).
        self._outputs: list[_Output] = []
        self._offsets: dict[TopicPartition, _Offsets] = {}
        self._dirty_offsets = False
        self._lock = asyncio.Lock()
        self.wake = asyncio.Event()

    # -- what stages call ------------------------------------------------------------------

    def emit(self, topic: str, key: str, value: Any, origin: Record | None = None) -> None:
        if self._emit_chain is not None:
            self._emit_chain(EmitInput(self._stage_name, topic, key, value, origin))
            return
        self.emit_raw(as_record(self._serde, topic, key, value), origin)

    def _emit_input(self, input: EmitInput) -> None:
        record = as_record(self._serde, input.topic, input.key, input.value)
        self.emit_raw(record, input.origin)

    def emit_raw(self, record: OutRecord, origin: Record | None = None) -> None:
        if origin is None:
            self._outputs.append((record, None, None, -1))
        else:
            tracker = self._offsets.get(origin.tp)
            if tracker is None or tracker.records.get(origin.offset) is not origin:
                return  # its partition was revoked: the new owner redoes the work
            self._outputs.append((record, origin.tp, tracker, origin.offset))
        self.wake.set()

    def done(self, record: Record) -> None:
        tracker = self._offsets.get(record.tp)
        # Only the very record handed in this assignment counts (not a stale copy).
        if tracker is not None and tracker.records.get(record.offset) is record:
            del tracker.records[record.offset]
            tracker.done.add(record.offset)
            self._dirty_offsets = True
            self.wake.set()

    def dead_letter(self, record: Record, reason: str, error: BaseException | None) -> None:
        stage = self._runner.stage.name
        headers = (
            *record.headers,
            (DLQ_REASON, reason.encode()),
            (DLQ_STAGE, stage.encode()),
            (DLQ_SOURCE, f"{record.topic}/{record.partition}/{record.offset}".encode()),
            (DLQ_ERROR, (type(error).__qualname__ if error else "").encode()),
        )
        dead = OutRecord(self._runner.topology.deadletter, record.key, record.value, headers)
        if record.topic in self._runner.stage.topics:
            self.emit_raw(dead, record)
            self.done(record)
        else:
            # A side input (the worker's control topic, read outside the group): no offset
            # of ours to tie it to, and dropping it would lose it.
            self.emit_raw(dead)

    # -- what the runner calls ---------------------------------------------------------------

    def own(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            self._offsets[tp] = _Offsets()

    def note_committed(self, committed: Mapping[TopicPartition, int]) -> None:
        """The group's committed offsets of partitions just owned (see :meth:`_fence`)."""
        for tp, offset in committed.items():
            tracker = self._offsets.get(tp)
            if tracker is not None:
                tracker.committed = offset

    def drop(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            self._offsets.pop(tp, None)
        self._outputs = [out for out in self._outputs if self._current(out)]

    def _current(self, output: _Output) -> bool:
        _, tp, tracker, _ = output
        return tp is None or self._offsets.get(tp) is tracker

    def owned(self) -> list[TopicPartition]:
        return list(self._offsets)

    def drop_all(self) -> None:
        self._offsets.clear()
        self._outputs.clear()

    def handed(self, records: Sequence[Record]) -> list[Record]:
        """Register ``records`` as in flight; returns those of partitions this member owns
        (a client may still deliver a few of a partition just revoked: they are ignored)."""
        kept: list[Record] = []
        for rec in records:
            tracker = self._offsets.get(rec.tp)
            if tracker is None:
                continue
            tracker.inflight.append(rec.offset)
            tracker.records[rec.offset] = rec
            kept.append(rec)
        return kept

    @property
    def has_outputs(self) -> bool:
        """Whether outputs wait (a commit that would carry offsets alone can wait)."""
        return bool(self._outputs)

    @property
    def dirty(self) -> bool:
        # Held outputs alone are not work: they wait for their input's offset to move.
        return self._dirty_offsets or any(
            out[2] is None or out[3] < out[2].next_commit for out in self._outputs
        )

    async def commit(self, producer: Producer, consumer: Consumer) -> None:
        async with self._lock:
            if not self.dirty:
                return
            offsets: dict[TopicPartition, int] = {}
            for tp, tracker in self._offsets.items():
                moved = tracker.advance()
                if moved is not None:
                    offsets[tp] = moved
            ready: list[OutRecord] = []
            held: list[_Output] = []
            for out in self._outputs:
                record, origin_tp, origin, offset = out
                if origin is None or origin_tp is None:
                    ready.append(record)
                elif self._offsets.get(origin_tp) is not origin:
                    continue  # revoked: dropped
                elif offset < origin.next_commit:
                    ready.append(record)
                else:
                    # Its input's offset cannot be committed yet (an earlier record is still in
                    # flight): were the output committed alone and this member then died, the
                    # next owner would redo the input and write its outcome a second time.
                    held.append(out)
            outputs = ready
            self._outputs = held
            self._dirty_offsets = False
            if outputs and not offsets:
                offsets = self._fence()
            if outputs or offsets:
                await producer.commit_transaction(outputs, offsets, consumer)

    def _fence(self) -> dict[TopicPartition, int]:
        """One owned partition's offset as it stands (step 3 of the commit order), so that
        a transaction of outputs alone is fenced by the group generation too.

        Empty only for a member that has handled no record and whose group committed none
        of its partitions; its stages then hold nothing that outputs derive from."""
        for tp, tracker in self._offsets.items():
            offset = tracker.standing()
            if offset >= 0:
                return {tp: offset}
        return {}


class StageRunner:
    """Polls a stage's topics in batches, hands them to the stage, commits its checkpoint.

    Args:
        instance_id: names this process's transactional producer (``<group>.<instance>``);
            a restarted instance with the same id fences its predecessor.
    """

    def __init__(
        self,
        stage: Stage,
        *,
        event_log: EventLog,
        serde: Serde,
        topology: Topology,
        instance_id: str,
        batch_size: int = 500,
        poll_timeout: float = 0.5,
        interceptors: Sequence[Interceptor] = (),
        rejoin_backoff: float = 0.2,
    ) -> None:
        self.stage = stage
        self.event_log = event_log
        self.serde = serde
        self.topology = topology
        self.instance_id = instance_id
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.rejoin_backoff = rejoin_backoff
        self.checkpoint = _RunnerCheckpoint(self, interceptors)
        schemas = topology.topic_schemas()
        # Only what stages consume (no stage reads the snapshot topic).
        self._codec = RecordCodec(serde)
        self._decoders = {
            topic: _RECORD_TYPES[name] for topic, name in schemas.items() if name in _RECORD_TYPES
        }
        self._step = chain_step(interceptors, self._decode_and_handle)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._stopping = asyncio.Event()
        self._replay_below: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()

    @property
    def group(self) -> str:
        return self.topology.group(self.stage.name)

    def request_stop(self) -> None:
        self._stopping.set()
        self.checkpoint.wake.set()

    async def run(self) -> None:
        """Run until :meth:`request_stop`; rejoins the group after being fenced."""
        await self.stage.start(self.checkpoint)
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    await self._session()
                    failures = 0
                except FencedError as exc:
                    log.warning("stage %s fenced, rejoining: %s", self.stage.name, exc)
                    await self._reset()
                    await asyncio.sleep(self.rejoin_backoff)
                except Exception as exc:
                    # The log, a store or the registry failed (or a bug): nothing uncommitted
                    # is lost, since the next member redoes it. Back off so a persistent fault
                    # is no hot loop.
                    failures += 1
                    delay = min(30.0, self.rejoin_backoff * 2**failures)
                    if isinstance(exc, RegistryUnavailableError):  # needs no traceback
                        log.warning(
                            "stage %s: %s; rejoining in %.1fs (failure %d in a row)",
                            self.stage.name,
                            exc,
                            delay,
                            failures,
                        )
                    else:
                        log.exception(
                            "stage %s failed; rejoining in %.1fs (failure %d in a row)",
                            self.stage.name,
                            delay,
                            failures,
                        )
                    await self._reset()
                    try:
                        async with asyncio.timeout(delay):
                            await self._stopping.wait()
                    except TimeoutError:
                        pass
        finally:
            await self.stage.stop()

    async def _reset(self) -> None:
        partitions = list(self.checkpoint._offsets)
        if partitions:
            await self.stage.on_revoked(partitions)
        self.checkpoint.drop_all()
        await self._close_clients()

    async def _close_clients(self) -> None:
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        for client in (consumer, producer):
            if client is not None:
                try:
                    await client.close()
                except EventLogError as exc:
                    log.warning("closing a client of stage %s failed: %s", self.stage.name, exc)

    # -- rebalance listener --------------------------------------------------------------

    async def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        await self.stage.on_revoked(partitions)
        if self._producer is not None and self._consumer is not None:
            await self.checkpoint.commit(self._producer, self._consumer)
        self.checkpoint.drop(partitions)

    async def on_assigned(self, partitions: Sequence[TopicPartition]) -> None:
        self.checkpoint.own(partitions)
        assert self._consumer is not None
        ends = await self._consumer.end_offsets(partitions)
        # Below the committed offset every record was handled (and dead-lettered where it
        # had to be) in a committed transaction: a stage replaying it must not do so again.
        committed = await self._consumer.committed(partitions)
        self.checkpoint.note_committed(committed)
        for tp in partitions:
            self._replay_below[tp] = committed.get(tp, 0)
        seeks: Mapping[TopicPartition, int] = await self.stage.on_assigned(partitions, ends)
        for tp, offset in seeks.items():
            self._consumer.seek(tp, offset)

    # -- the loop ------------------------------------------------------------------------

    async def _session(self) -> None:
        self._paused = set()
        consumer = self.event_log.consumer(
            self.stage.topics, group_id=self.group, listener=self, pauses=self.stage.pauses
        )
        producer = self.event_log.producer(transactional_id=f"{self.group}.{self.instance_id}")
        self._consumer, self._producer = consumer, producer
        await producer.start()
        await consumer.start()
        wake = self.checkpoint.wake
        poll: asyncio.Task[list[Record]] | None = None
        #: The transaction being written: the next batch is polled and handled meanwhile
        #: (the checkpoint's lock keeps transactions one at a time, in order).
        committing: asyncio.Task[None] | None = None
        timeout = self.poll_timeout
        loop = asyncio.get_running_loop()
        offsets_due = loop.time() + OFFSETS_ONLY_EVERY_S  # when offsets alone may commit
        try:
            while True:
                wake.clear()
                if committing is not None and committing.done():
                    done, committing = committing, None
                    done.result()  # a fence or failure ends the session here
                if poll is not None and poll.done():
                    records, poll = poll.result(), None
                    # Not while restoring: aiokafka's poll returns on records only, so a
                    # position moving past the last transaction marker shows at its timeout.
                    timeout = (
                        self.poll_timeout
                        if records or self.stage.positions_wanted()
                        else max(self.poll_timeout, min(timeout * 2, IDLE_POLL_TIMEOUT))
                    )
                    if records:
                        await self._step(
                            StepInput(self.stage.name, records, self.group, self._measure_lag)
                        )
                    await self._report_positions(consumer, records)
                next_due = await self.stage.tick(self.checkpoint)
                if self.checkpoint.dirty and committing is None:
                    now = loop.time()
                    if self.checkpoint.has_outputs or now >= offsets_due:
                        committing = asyncio.create_task(self.checkpoint.commit(producer, consumer))
                        committing.add_done_callback(lambda _: wake.set())
                        offsets_due = now + OFFSETS_ONLY_EVERY_S
                    else:
                        wait_s = offsets_due - now
                        next_due = wait_s if next_due is None else min(next_due, wait_s)
                if self._stopping.is_set():
                    break
                # Every turn, not only before a poll: a lane that drained must be resumed for
                # the poll already waiting, or the worker idles until that poll times out.
                self._apply_pauses(consumer)
                capacity = self.stage.capacity()
                if poll is None and capacity > 0:
                    poll = asyncio.create_task(
                        consumer.poll(max_records=min(self.batch_size, capacity), timeout=timeout)
                    )
                    poll.add_done_callback(lambda _: wake.set())
                if wake.is_set():
                    continue
                wait = timeout if next_due is None else min(next_due, timeout)
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        await wake.wait()
                except TimeoutError:
                    pass
            if committing is not None:
                await committing
            await self._drain(producer, consumer, poll)
        finally:
            if committing is not None and not committing.done():
                committing.cancel()
            if committing is not None:
                # Retrieved: a failure of it already ended the session, or this one did.
                await asyncio.gather(committing, return_exceptions=True)
            if poll is not None:
                poll.cancel()
                # Retrieve its outcome: a poll cut short by a fence or close is expected here.
                await asyncio.gather(poll, return_exceptions=True)
            await self._close_clients()

    async def _measure_lag(self) -> dict[TopicPartition, int]:
        consumer = self._consumer
        owned = self.checkpoint.owned()
        if consumer is None or not owned:
            return {}
        ends = await consumer.end_offsets(owned)
        lag: dict[TopicPartition, int] = {}
        for tp in owned:
            position = await consumer.position(tp)
            if position is not None and tp in ends:
                lag[tp] = max(0, ends[tp] - position)
        return lag

    def _apply_pauses(self, consumer: Consumer) -> None:
        topics = self.stage.paused_topics()
        if topics and not self.stage.pauses:
            # Its consumer fetches with the long wait: a resumed lane would idle behind it.
            raise ConfigurationError(
                f"stage {self.stage.name!r} pauses topics but does not set Stage.pauses"
            )
        wanted = {tp for tp in self.checkpoint.owned() if tp.topic in topics}
        if wanted != self._paused:
            if self._paused - wanted:
                consumer.pause(sorted(self._paused - wanted), False)
            if wanted - self._paused:
                consumer.pause(sorted(wanted - self._paused), True)
            self._paused = wanted

    async def _report_positions(self, consumer: Consumer, records: Sequence[Record]) -> None:
        wanted = {rec.tp for rec in records}
        wanted.update(self.stage.positions_wanted())
        if not wanted:
            return
        positions: dict[TopicPartition, int] = {}
        for tp in wanted:
            position = await consumer.position(tp)
            if position is not None:
                positions[tp] = position
        await self.stage.advanced(positions, self.checkpoint)

    async def _drain(
        self, producer: Producer, consumer: Consumer, poll: asyncio.Task[list[Record]] | None
    ) -> None:
        """On stop: let the stage finish what it holds, then make it visible."""
        if poll is not None:
            poll.cancel()  # fetched but unhandled records are simply redelivered later
            await asyncio.gather(poll, return_exceptions=True)
        await self.stage.stop()
        await self.stage.tick(self.checkpoint)
        await self.checkpoint.commit(producer, consumer)

    async def _decode_and_handle(self, step: StepInput) -> None:
        checkpoint = self.checkpoint
        records = checkpoint.handed(step.records)
        batch: list[Incoming] = []
        if self.stage.decode:
            decode, decoders = self._codec.decode, self._decoders
            wants = self.stage.wants_value
            for rec in records:
                if not wants(rec):
                    batch.append(Incoming(rec, None))
                    continue
                try:
                    value = decode(rec, decoders[rec.topic])
                except RecordDecodeError as exc:
                    if self.stage.dead_letters and rec.offset >= self._replay_below.get(rec.tp, 0):
                        checkpoint.dead_letter(rec, str(exc), exc.__cause__ or exc)
                    else:
                        checkpoint.done(rec)
                    continue
                batch.append(Incoming(rec, value))
        else:
            batch = [Incoming(rec, None) for rec in records]
        await self.stage.handle(batch, checkpoint)
        if self.stage.done_on_return:
            for item in batch:
                checkpoint.done(item.record)
