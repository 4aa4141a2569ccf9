"""The worker: runs attempts from the priority lanes with bounded concurrency.

A fixed number of slot coroutines take work items from a small in-memory buffer, from the
lowest lane first, so high-priority work overtakes a low-priority backlog (or, with lane
weights, in weighted proportions, so that no lane starves). The buffer is bounded and the
runner stops polling while it is full (backpressure). Every attempt ends in exactly one
outcome event committed together with the lane offset: Succeeded, Failed, RetryScheduled,
TimedOut, Cancelled, or a dead letter.

Cancel requests reach every worker instance through the control topic, which each instance
reads in full without a consumer group.

A worker takes the lanes of the named queues it serves (``queues``); lane ``i`` of every
such queue shares buffer ``i``. A work item of a task the worker does not know (a rolling
deploy: the worker runs an older version of the app) is put back at the end of its lane
after a short delay, with the time it was first refused, so that a worker that knows the
task (the partition's next owner) runs it; it is dead-lettered (reason ``unknown_task``)
only once it has been refused for ``unknown_task_deadline`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qtasks_stream.context import TaskContext
from qtasks_stream.errors import RecordDecodeError, SerdeError, TaskCancelled, TaskTimeout
from qtasks_stream.eventlog.base import Consumer
from qtasks_stream.eventlog.reading import follow
from qtasks_stream.events import (
    Cancelled,
    ControlCommand,
    Failed,
    Payload,
    Progress,
    RetryScheduled,
    Started,
    Succeeded,
    TaskEvent,
    TimedOut,
    WorkItem,
    now_us,
)
from qtasks_stream.executors.base import Call, Executor
from qtasks_stream.interceptors import ExecuteInput, Interceptor, chain_execute
from qtasks_stream.records import Record, TopicPartition
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.codec import RecordCodec
from qtasks_stream.serde.payloads import TaskPayloads
from qtasks_stream.serde.wire import until_registry_answers
from qtasks_stream.stages.base import Checkpoint, Incoming, Stage
from qtasks_stream.tasks import TaskDefinition
from qtasks_stream.topology import DEFAULT_QUEUE, Topology

__all__ = ["WorkerStage"]

log = logging.getLogger("qtasks_stream.worker")

#: How many cancel requests a worker remembers (oldest forgotten first).
_CANCEL_MEMORY = 100_000
#: How many ended attempts a worker remembers (oldest forgotten first), to drop a second
#: work item of one: a duplicate route is written about when the first is, so a short
#: memory suffices, and a bounded one keeps a long-running worker's memory flat.
_ENDED_MEMORY = 10_000
#: An attempt ending within this many seconds commits its Started with its outcome, in one
#: transaction instead of two (a transaction is a few ms: one task at a time waited for both).
_START_HOLD_S = 0.005


def error_type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


class WorkerStage(Stage):
    name = "worker"
    done_on_return = False
    pauses = True  # a full lane pauses (paused_topics)

    def __init__(
        self,
        topology: Topology,
        *,
        tasks: Mapping[str, TaskDefinition],
        executor: Executor,
        serde: Serde,
        payloads: TaskPayloads,
        control: Callable[[], Consumer],
        worker_id: str,
        concurrency: int = 16,
        lane_weights: Sequence[int] | None = None,
        buffer: int | None = None,
        interceptors: Sequence[Interceptor] = (),
        echo_self: Callable[[TaskContext], Any] | None = None,
        shutdown_grace: float = 10.0,
        rng: random.Random | None = None,
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        unknown_task_deadline: float = 300.0,
        unknown_task_retry: float = 1.0,
    ) -> None:
        self._topology = topology
        self._queues = tuple(queues)
        #: The lane topics served, per lane index (one per queue).
        self._lane_topics = [
            [topology.lane(i, q) for q in self._queues] for i in range(topology.lanes)
        ]
        self._unknown_deadline = unknown_task_deadline
        self._unknown_retry = unknown_task_retry
        #: Work items of unknown tasks waiting to be put back: (when, record, item).
        self._parked: list[tuple[float, Record, WorkItem]] = []
        self._tasks = tasks
        self._executor = executor
        self._serde = serde
        self._payloads = payloads
        self._control_factory = control
        self.worker_id = worker_id
        self._concurrency = concurrency
        #: Work items buffered per lane; a full lane is paused so the others still flow.
        self._lane_limit = buffer if buffer is not None else max(2 * concurrency, 8)
        self._execute = chain_execute(interceptors, self._call)
        self._group = topology.group(self.name)
        self._echo_self = echo_self
        self._grace = shutdown_grace
        self._rng = rng or random.Random()
        self._lanes: list[deque[Incoming]] = [deque() for _ in range(topology.lanes)]
        self._weights = tuple(lane_weights) if lane_weights is not None else None
        #: Smooth weighted round robin: what each lane is owed (see :meth:`_next_lane`).
        self._credit = [0] * topology.lanes
        self._lane_paused = [False] * topology.lanes
        self._available = asyncio.Event()
        self._slots: list[asyncio.Task[None]] = []
        self._running: dict[str, _Running] = {}
        self._cancelled: OrderedDict[str, str] = OrderedDict()
        #: Attempts that ended here: task id -> (lane partition, attempt). Forgotten with
        #: the partition: an outcome not committed by then is dropped and must be redone.
        self._ended: OrderedDict[str, tuple[TopicPartition, int]] = OrderedDict()
        self._loggers: dict[str, logging.Logger] = {}
        #: Started events not emitted yet (see _attempt), each with when it is due (loop
        #: time), in the order held and so in due order: one timer emits those due, not a
        #: timer per attempt.
        self._held_starts: dict[str, tuple[TaskEvent, float]] = {}
        self._hold_timer: asyncio.TimerHandle | None = None
        self._control_task: asyncio.Task[None] | None = None
        self._checkpoint: Checkpoint | None = None
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def topics(self) -> Sequence[str]:
        return [topic for queue in self._queues for topic in self._topology.queue_lanes(queue)]

    def capacity(self) -> int:
        # A poll may bring a whole batch for one lane: a lane holds at most twice its limit.
        if self._stopping or all(len(lane) >= self._lane_limit for lane in self._lanes):
            return 0
        return self._lane_limit

    def paused_topics(self) -> Collection[str]:
        # A full low-priority lane must not take the poll from the lanes above it: however
        # the client orders fetched records, a paused lane returns none. A lane pauses when
        # full and resumes only when half empty: resuming at the first free slot would
        # pause and resume the partition for every item (each toggle drops the client's
        # fetched data and refetches it), which cut throughput by more than half.
        for index, lane in enumerate(self._lanes):
            if len(lane) >= self._lane_limit:
                self._lane_paused[index] = True
            elif len(lane) <= self._lane_limit // 2:
                self._lane_paused[index] = False
        return [
            topic
            for i, paused in enumerate(self._lane_paused)
            if paused
            for topic in self._lane_topics[i]
        ]

    async def start(self, checkpoint: Checkpoint) -> None:
        if self._checkpoint is not None:
            return
        self._checkpoint = checkpoint
        await self._executor.start()
        self._slots = [asyncio.create_task(self._slot()) for _ in range(self._concurrency)]
        self._control_task = asyncio.create_task(self._listen_control())

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._available.set()
        await self._wait_running(lambda _: True)
        for slot in self._slots:
            slot.cancel()
        if self._control_task is not None:
            self._control_task.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
        if self._control_task is not None:
            await asyncio.gather(self._control_task, return_exceptions=True)
        await self._executor.close()

    async def _wait_running(self, which: Callable[[TopicPartition], bool]) -> None:
        deadline = time.monotonic() + self._grace
        while any(which(running.record.tp) for running in self._running.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "worker %s: attempts still running after %.1fs grace; their "
                    "records will be redelivered",
                    self.worker_id,
                    self._grace,
                )
                return
            self._idle.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.1)):
                    await self._idle.wait()
            except TimeoutError:
                pass

    async def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        gone = set(partitions)
        # Not committed: the partition's next owner gets them again.
        self._parked = [p for p in self._parked if p[1].tp not in gone]
        for task_id in [t for t, (tp, _) in self._ended.items() if tp in gone]:
            del self._ended[task_id]
        for lane in self._lanes:
            kept = [item for item in lane if item.record.tp not in gone]
            lane.clear()
            lane.extend(kept)
        await self._wait_running(lambda tp: tp in gone)

    async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
        lanes = self._lanes
        index = self._topology.lane_index
        for item in batch:
            lanes[index(item.record.topic)].append(item)
        if batch:
            self._available.set()

    # -- slots ----------------------------------------------------------------------------

    async def _take(self) -> Incoming | None:
        while not self._stopping:
            lane = self._next_lane()
            if lane is not None:
                return lane.popleft()
            self._available.clear()
            await self._available.wait()
        return None

    def _next_lane(self) -> deque[Incoming] | None:
        """The lane to serve next: the lowest with work, or with weights the one owed most."""
        weights = self._weights
        if weights is None:
            for lane in self._lanes:
                if lane:
                    return lane
            return None
        # nginx's smooth weighted round robin over the lanes with work: each gains its
        # weight, the one owed most is served and pays what all of them gained. Lanes
        # without work gain nothing, so a lane cannot save up a burst while idle.
        credit, best, total = self._credit, -1, 0
        for index, lane in enumerate(self._lanes):
            if lane:
                credit[index] += weights[index]
                total += weights[index]
                if best < 0 or credit[index] > credit[best]:
                    best = index
        if best < 0:
            return None
        credit[best] -= total
        return self._lanes[best]

    async def _slot(self) -> None:
        while (item := await self._take()) is not None:
            try:
                await self._attempt(item.record, item.value)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug of ours must not kill the slot; the record is kept
                log.exception("worker %s: attempt handling failed", self.worker_id)
                assert self._checkpoint is not None
                self._checkpoint.dead_letter(item.record, "worker failed handling it", None)

    def _event(
        self,
        work: WorkItem,
        payload: Payload,
        origin: Record | None,
        traceparent: str | None = None,
    ) -> None:
        assert self._checkpoint is not None
        self._release_start(work.task_id)  # a Progress never precedes its Started
        event = TaskEvent.new(
            work.task_id,
            work.task_name,
            work.attempt,
            self.worker_id,
            payload,
            traceparent=traceparent or work.traceparent,
        )
        self._checkpoint.emit(self._topology.events, work.task_id, event, origin)

    async def _attempt(self, rec: Record, work: WorkItem) -> None:
        checkpoint = self._checkpoint
        assert checkpoint is not None
        if self._ended_here(rec, work):
            checkpoint.done(rec)
            return
        reason = self._cancelled.get(work.task_id)
        if reason is not None:
            self._event(work, Cancelled(reason), rec)
            self._end(rec, work)
            checkpoint.done(rec)
            return
        definition = self._tasks.get(work.task_name)
        if definition is None:
            self._unknown(rec, work, checkpoint)
            return
        # Not tied to the work item: a start is a fact even if the attempt is redone, and it
        # must be visible while the attempt runs (outcomes wait for the item's offset). It
        # is built now (its time is the start) and emitted after _START_HOLD_S, or with the
        # outcome when the attempt ends sooner.
        started = TaskEvent.new(
            work.task_id,
            work.task_name,
            work.attempt,
            self.worker_id,
            Started(self.worker_id),
            traceparent=work.traceparent,
        )
        loop = asyncio.get_running_loop()
        due = loop.time() + _START_HOLD_S
        self._held_starts[work.task_id] = (started, due)
        if self._hold_timer is None:
            self._hold_timer = loop.call_at(due, self._release_due)
        try:
            outcome, traceparent = await self._run(definition, work, rec)
        finally:
            self._release_start(work.task_id)
        self._event(work, outcome, rec, traceparent)
        self._end(rec, work)
        checkpoint.done(rec)

    def _ended_here(self, rec: Record, work: WorkItem) -> bool:
        """Whether this attempt (or a later one) of the task already ended or runs here: a
        second work item of it (a route written twice) is then dropped, not run again.

        Its offset commits after the first item's (offsets commit in order), so with the
        first item's outcome or after it; a partition lost in between is forgotten."""
        ended = self._ended.get(work.task_id)
        running = self._running.get(work.task_id)
        if ended is not None and ended[1] >= work.attempt:
            what = "ended"
        elif running is not None and running.attempt >= work.attempt:
            what = "is running"
        else:
            return False
        log.warning(
            "worker %s: work item %s/%d/%d of task %s attempt %d dropped: that attempt %s "
            "here (the item was written twice)",
            self.worker_id,
            rec.topic,
            rec.partition,
            rec.offset,
            work.task_id,
            work.attempt,
            what,
        )
        return True

    def _end(self, rec: Record, work: WorkItem) -> None:
        ended = self._ended
        ended.pop(work.task_id, None)
        ended[work.task_id] = (rec.tp, work.attempt)
        while len(ended) > _ENDED_MEMORY:
            ended.popitem(last=False)

    def _release_start(self, task_id: str) -> None:
        """Emits the task's held Started event, if it has one."""
        held = self._held_starts.pop(task_id, None)
        if held is None:
            return
        started = held[0]
        assert self._checkpoint is not None
        self._checkpoint.emit(self._topology.events, task_id, started)

    def _release_due(self) -> None:
        """Emits the held Started events that are due; the timer waits for the next."""
        self._hold_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        held = self._held_starts
        while held:
            task_id, (_, due) = next(iter(held.items()))
            if due > now:
                self._hold_timer = loop.call_at(due, self._release_due)
                return
            self._release_start(task_id)

    def _unknown(self, rec: Record, work: WorkItem, checkpoint: Checkpoint) -> None:
        """Put a work item of a task this worker does not know back in its lane after a
        short delay, for a worker that knows it; dead-letter it past the deadline."""
        now = now_us()
        since = work.unknown_since_us if work.unknown_since_us is not None else now
        refused_s = (now - since) / 1_000_000
        if refused_s >= self._unknown_deadline:
            checkpoint.dead_letter(
                rec,
                f"unknown_task: unknown task {work.task_name!r}: no function is registered "
                f"under it in worker {self.worker_id}, nor in a worker that took it in the "
                f"{refused_s:.0f}s since it was first refused (unknown_task_deadline "
                f"{self._unknown_deadline:g}s)",
                None,
            )
            return
        if work.unknown_since_us is None:
            log.warning(
                "worker %s: unknown task %r (%s); putting it back for a worker that knows it "
                "for up to %gs",
                self.worker_id,
                work.task_name,
                work.task_id,
                self._unknown_deadline,
            )
        # Held, not done: until it is put back, a crash leaves it to the partition's next owner.
        delay = min(self._unknown_retry, self._unknown_deadline - refused_s)
        again = dataclasses.replace(work, unknown_since_us=since)
        self._parked.append((time.monotonic() + delay, rec, again))

    async def tick(self, checkpoint: Checkpoint) -> float | None:
        if not self._parked:
            return None
        now = time.monotonic()
        due = [p for p in self._parked if p[0] <= now]
        if due:
            self._parked = [p for p in self._parked if p[0] > now]
        for _, rec, work in due:
            # With the record's offset, in one transaction: put back exactly once.
            checkpoint.emit(rec.topic, work.task_id, work, rec)
            checkpoint.done(rec)
        return min(p[0] for p in self._parked) - now if self._parked else None

    async def _run(
        self, definition: TaskDefinition, work: WorkItem, rec: Record
    ) -> tuple[Payload, str | None]:
        """The attempt's outcome, and the trace context the attempt ended with."""
        ctx = self._context(work)
        return await self._outcome(definition, work, rec, ctx), ctx.traceparent

    def _context(self, work: WorkItem) -> TaskContext:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        seq = 0

        def progress(value: Any) -> None:
            nonlocal seq
            if threading.get_ident() != loop_thread:
                loop.call_soon_threadsafe(progress, value)
                return
            try:
                encoded = json.dumps(value)
            except (TypeError, ValueError) as exc:
                log.warning("task %s: progress item dropped, not JSON: %s", work.task_id, exc)
                encoded = json.dumps(repr(value))
            self._event(work, Progress(seq, encoded), None, ctx.traceparent)
            seq += 1

        ctx = TaskContext(
            task_id=work.task_id,
            task_name=work.task_name,
            attempt=work.attempt,
            logger=self._logger(work.task_name),
            emit_progress=progress,
            traceparent=work.traceparent,
        )
        return ctx

    def _logger(self, task_name: str) -> logging.Logger:
        """The task's logger (getLogger takes the logging lock: once per name, not per call)."""
        logger = self._loggers.get(task_name)
        if logger is None:
            logger = self._loggers[task_name] = logging.getLogger(f"qtasks_stream.task.{task_name}")
        return logger

    async def _outcome(
        self, definition: TaskDefinition, work: WorkItem, rec: Record, ctx: TaskContext
    ) -> Payload:
        me = asyncio.current_task()
        assert me is not None
        started = time.perf_counter()
        max_time = work.max_time or definition.max_time
        # Armed when the function starts (see _call): waiting for a free thread or process
        # is not execution time, for max_time nor for the reported duration. Without a
        # max_time, none (entering and leaving one cost every attempt).
        timer = asyncio.timeout(None) if max_time is not None else None
        loop = asyncio.get_running_loop()
        clock_started = False

        def start_clock() -> None:
            nonlocal started, clock_started
            if clock_started:
                return
            clock_started = True
            started = time.perf_counter()
            # From a thread this comes a moment later: the attempt may have ended already.
            if max_time is not None and timer is not None and not timer.expired():
                with contextlib.suppress(RuntimeError):  # its timer has exited
                    timer.reschedule(loop.time() + max_time)

        self._running[work.task_id] = _Running(me, ctx, rec, start_clock, work.attempt)
        try:
            args, kwargs = await self._call_arguments(definition, work)
            if definition.echo and self._echo_self is not None:
                args = (self._echo_self(ctx), *args)
            token = ctx._bind()
            try:
                call = self._execute(
                    ExecuteInput(
                        definition,
                        work,
                        ctx,
                        args,
                        kwargs,
                        rec,
                        self._group,
                        self.worker_id,
                        self._executor,
                    )
                )
                if timer is None:
                    result = await call
                else:
                    async with timer:
                        result = await call
            finally:
                ctx._unbind(token)
            duration = (time.perf_counter() - started) * 1000
            try:
                encoded = self._payloads.encode_result(definition, result)
            except SerdeError as exc:
                return Failed(error_type_name(exc), str(exc), "", duration)
            return Succeeded(encoded.text, duration, encoded.content_type, encoded.data)
        except TaskCancelled as exc:
            return Cancelled(exc.reason)
        except asyncio.CancelledError:
            if ctx.cancel_reason is None or self._stopping:
                raise
            me.uncancel()
            return Cancelled(ctx.cancel_reason)
        except TimeoutError as exc:
            duration = (time.perf_counter() - started) * 1000
            if timer is not None and timer.expired():
                assert max_time is not None
                timeout = TaskTimeout(f"attempt {work.attempt} exceeded max_time={max_time}s")
                retry = self._retry(definition, work, timeout, duration)
                return retry if retry is not None else TimedOut(max_time)
            return self._failure(definition, work, exc, duration)
        except Exception as exc:
            return self._failure(definition, work, exc, (time.perf_counter() - started) * 1000)
        finally:
            self._running.pop(work.task_id, None)
            self._idle.set()

    async def _call_arguments(
        self, definition: TaskDefinition, work: WorkItem
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments. Typed ones written with a schema this worker has not seen
        need the registry: while it is unavailable the attempt waits and tries again (the
        registry failed, not the task). A cancel or a stop ends the wait."""
        return await until_registry_answers(
            lambda: self._payloads.decode_call(
                definition, work.content_type, work.args, work.kwargs, work.arguments_avro
            ),
            f"worker {self.worker_id}: task {work.task_id}",
        )

    def _failure(
        self, definition: TaskDefinition, work: WorkItem, exc: BaseException, duration: float
    ) -> Payload:
        retry = self._retry(definition, work, exc, duration)
        if retry is not None:
            return retry
        return Failed(error_type_name(exc), str(exc), _format(exc), duration)

    def _retry(
        self, definition: TaskDefinition, work: WorkItem, exc: BaseException, duration: float
    ) -> RetryScheduled | None:
        policy = definition.retry
        if not policy.should_retry(exc, work.attempt):
            return None
        delay = policy.delay(work.attempt, self._rng)
        return RetryScheduled(
            next_attempt=work.attempt + 1,
            due_us=now_us() + int(delay * 1_000_000),
            error_type=error_type_name(exc),
            message=str(exc),
            traceback=_format(exc),
            duration_ms=duration,
        )

    async def _call(self, input: ExecuteInput) -> Any:
        definition = input.definition
        work = input.item
        running = self._running.get(work.task_id)
        call = Call(
            definition.fn,
            definition.kind,
            input.args,
            input.kwargs,
            label=f"task {work.task_name} {work.task_id} attempt {work.attempt}",
            on_start=running.start_clock if running is not None else None,
        )
        return await self._executor.run(call, input.ctx.progress)

    # -- control ----------------------------------------------------------------------------

    async def _listen_control(self) -> None:
        consumer = self._control_factory()
        await consumer.start()
        codec = RecordCodec(self._serde)

        async def handle(records: list[Record]) -> None:
            for rec in records:
                try:
                    command = codec.decode(rec, ControlCommand)
                except RecordDecodeError as exc:
                    assert self._checkpoint is not None
                    self._checkpoint.dead_letter(rec, str(exc), exc.__cause__ or exc)
                    continue
                self._on_cancel(command)

        try:
            await follow(consumer, handle, what=f"worker {self.worker_id}: the control topic")
        finally:
            await consumer.close()

    def _on_cancel(self, command: ControlCommand) -> None:
        self._cancelled[command.task_id] = command.reason
        while len(self._cancelled) > _CANCEL_MEMORY:
            self._cancelled.popitem(last=False)
        running = self._running.get(command.task_id)
        if running is None:
            return
        running.ctx._request_cancel(command.reason)
        # The attempt ends cancelled now, whatever its function does later: a coroutine stops
        # at its next await, a process is killed, and a function in a thread (which cannot be
        # stopped) runs on with its result discarded; ctx.cancelled tells it to stop early.
        running.task.cancel()


@dataclass(frozen=True, slots=True)
class _Running:
    """An attempt in progress: its coroutine, context, lane record and max_time clock."""

    task: asyncio.Task[Any]
    ctx: TaskContext
    record: Record
    start_clock: Callable[[], None]
    attempt: int


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
