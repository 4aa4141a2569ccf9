"""The scheduler: routes submitted tasks into priority lanes, now or when due.

It reads the events topic and owns every decision about *when* an attempt enters a lane:
idempotent submit (a repeated task id is ignored), ``eta``/``countdown`` delays, retry
backoff delays, and cancellation of tasks that are not in a lane yet; for tasks already in
a lane or running it forwards the cancel to the workers through the control topic.

Its state is the fold of the log. On each partition it is given, it reads the partition
from offset 0 to the end first (restoring, no actions), then acts on what the state says is
pending. A delay that fired before a restart left a ``Released`` event in the log, so it
never fires twice; one that had not fired is armed again.

It knows what the log still holds, no more: an ended task submitted with an idempotency key
is remembered (to ignore a repeated submit) for the events retention after its end, as a
restore would find it, and a task whose ``Submitted`` was already deleted by retention fails
loudly instead of running without its arguments. Of other ended tasks it remembers the last
``UNKEYED_ENDS`` per partition: only a key is submitted again on purpose; a task without
one is repeated only by a hop redone (a trigger record read twice, a zombie's copy), which
comes about when the first did, and remembering every such end for days grew a worker
process by 0.2 KB per task (+33% RSS from 50,000 to 200,000 tasks in ``bench.bench_soak``).
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Collection, Mapping, Sequence

from qtasks_stream.events import (
    DLQ_REPLAY,
    ROUTED_HEADER,
    TERMINAL_KINDS,
    Cancelled,
    CancelRequested,
    ControlCommand,
    Failed,
    Payload,
    Released,
    Resubmitted,
    RetryScheduled,
    Scheduled,
    Submitted,
    TaskEvent,
    event_kind,
    now_us,
)
from qtasks_stream.records import Record, TopicPartition
from qtasks_stream.stages.base import Checkpoint, Incoming, Restore, Stage
from qtasks_stream.state import TaskState, fold, reopens, work_item
from qtasks_stream.topology import DEFAULT_QUEUE, Topology

__all__ = ["SchedulerStage"]

log = logging.getLogger("qtasks_stream.scheduler")
_SOURCE = "scheduler"
#: Kinds the scheduler decides on once restored; other kinds are not even decoded.
_ACTIONABLE = frozenset({"Submitted", "RetryScheduled", "CancelRequested", "Resubmitted"})
#: Kinds a restore decodes: what it needs to know which tasks wait, and until when. An end
#: needs only its kind header (as live); Started and Progress change nothing it decides.
_RESTORED = _ACTIONABLE | {"Scheduled", "Released"}
#: ``error_type`` of the failure of a task whose arguments the log no longer holds.
ARGUMENTS_LOST = "qtasks_stream.ArgumentsLost"
#: ``error_type`` of the failure of a task naming a queue this scheduler's app has no lanes for.
UNKNOWN_QUEUE = "qtasks_stream.UnknownQueue"
#: How often (seconds) ended tasks past the retention are forgotten.
_PRUNE_EVERY_S = 60.0
#: Ended tasks without an idempotency key remembered per partition (oldest forgotten first).
UNKEYED_ENDS = 2_000


class SchedulerStage(Stage):
    name = "scheduler"

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._tasks: dict[str, TaskState] = {}
        self._max_time: dict[str, float | None] = {}
        self._partition_of: dict[str, TopicPartition] = {}
        #: Partition → offset up to which it is still being restored.
        self._restoring = Restore()
        self._timers: list[tuple[int, str, int]] = []
        #: Tasks that ended, per partition, in the order they ended: id → (last attempt,
        #: end in ms), so a repeated submit of a finished task stays ignored and a resubmit
        #: can be judged, until the retention has passed since the end.
        self._finished: dict[TopicPartition, dict[str, tuple[int, int]]] = {}
        #: Per partition, (id, end in ms) of ended tasks without an idempotency key, in end
        #: order: the oldest leave ``_finished`` past ``UNKEYED_ENDS`` (entries of a task
        #: ended again since are stale and skipped).
        self._unkeyed: dict[TopicPartition, deque[tuple[str, int]]] = {}
        self._next_prune_us = 0
        #: Open tasks first seen by an event after their ``Submitted`` (deleted by retention):
        #: their arguments are unknown, so they must never be put in a lane.
        self._arguments_lost: set[str] = set()

    @property
    def topics(self) -> Sequence[str]:
        return [self._topology.events]

    async def on_assigned(
        self, partitions: Sequence[TopicPartition], ends: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        log.info("scheduler assigned %s, ends %s", sorted(partitions), dict(ends))
        return dict.fromkeys(self._restoring.begin(partitions, ends), 0)

    async def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        gone = set(partitions)
        for task_id in [t for t, tp in self._partition_of.items() if tp in gone]:
            self._forget(task_id)
        self._restoring.drop(gone)
        for tp in gone:
            self._finished.pop(tp, None)
            self._unkeyed.pop(tp, None)
        self._timers = [t for t in self._timers if t[1] in self._tasks]
        heapq.heapify(self._timers)

    def _forget(self, task_id: str) -> None:
        self._tasks.pop(task_id, None)
        self._arguments_lost.discard(task_id)
        self._max_time.pop(task_id, None)
        self._partition_of.pop(task_id, None)

    def wants_value(self, record: Record) -> bool:
        kind = event_kind(record.headers)
        if kind is None:
            return True
        return kind in (_RESTORED if record.tp in self._restoring else _ACTIONABLE)

    async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
        for item in batch:
            rec = item.record
            event: TaskEvent | None = item.value
            if event is None:
                # Live, and a kind that needs no decision: only an end matters, to let go.
                if event_kind(rec.headers) in TERMINAL_KINDS and rec.key is not None:
                    ended_ms = rec.timestamp_ms or now_us() // 1000  # 0: a log without times
                    self._finish(rec.key.decode(errors="replace"), rec.tp, ended_ms)
                continue
            if rec.tp in self._restoring:
                self._fold(event, rec.tp)
                self._fold_routed(rec, event)
                continue
            if event.source == _SOURCE:
                # Live, an event of ours: folded when emitted. (Partitions are owned by one
                # instance, and a fenced predecessor's events are before the restore's end.)
                continue
            self._fold(event, rec.tp)
            if not self._fold_routed(rec, event):
                self._act(event, checkpoint)

    def _fold_routed(self, rec: Record, event: TaskEvent) -> bool:
        """Whether ``event`` is a ``Submitted`` its client put in a lane itself: the task
        is then folded as scheduled at once, not only when its ``Scheduled`` (written in the
        same transaction) is read, which a restore may end just before."""
        if not isinstance(event.payload, Submitted) or not any(
            name == ROUTED_HEADER for name, _ in rec.headers
        ):
            return False
        state = self._tasks.get(event.task_id)
        if state is not None and state.status == "new":
            lane = self._topology.lane_for(state.priority)
            scheduled = Scheduled(lane, state.priority, None)
            fold(state, TaskEvent.new(state.task_id, state.task_name, 1, "client", scheduled))
        return True

    def held(self) -> dict[str, int]:
        """What the scheduler holds in memory: open tasks, and ended tasks it remembers."""
        return {
            "open": len(self._tasks),
            "ended": sum(len(finished) for finished in self._finished.values()),
        }

    def _ended(self, task_id: str) -> bool:
        return any(task_id in finished for finished in self._finished.values())

    def positions_wanted(self) -> Collection[TopicPartition]:
        return self._restoring.wanted()

    async def advanced(
        self, positions: Mapping[TopicPartition, int], checkpoint: Checkpoint
    ) -> None:
        for tp, end in self._restoring.reached(positions):
            log.info("scheduler restored %s up to %d (end %d)", tp, positions[tp], end)
            self._act_on_restored(tp, checkpoint)

    def _fold(self, event: TaskEvent, tp: TopicPartition) -> None:
        previous = self._tasks.get(event.task_id)
        finished = self._finished.get(tp, {})
        if event.task_id in finished:
            if not isinstance(event.payload, Resubmitted):
                return
            # Only the id and attempt of an ended task are kept; that is all a re-open needs
            # (the Resubmitted event carries the arguments; a replay only follows a dead letter).
            status = "dead_letter" if event.payload.mode == DLQ_REPLAY else "error"
            previous = TaskState(
                event.task_id, event.task_name, status=status, attempt=finished[event.task_id][0]
            )
            if not reopens(previous, event):
                return
            del finished[event.task_id]
        payload = event.payload
        if previous is None and isinstance(payload, CancelRequested):
            # A task this scheduler does not know (it ended longer than the retention ago,
            # or never was): nothing to hold; _act forwards the cancel to the workers.
            return
        reopened = isinstance(payload, Resubmitted) and (
            previous is None or reopens(previous, event)
        )
        state = fold(previous, event)
        if state.final:
            self._finish(event.task_id, tp, event.at_us // 1000, state.attempt, state)
            return
        carries_arguments = isinstance(payload, Submitted) or (
            isinstance(payload, Resubmitted) and payload.mode != DLQ_REPLAY
        )
        if carries_arguments:
            self._arguments_lost.discard(event.task_id)
        elif previous is None:
            self._arguments_lost.add(event.task_id)
        if (isinstance(payload, Submitted) and event.task_id not in self._max_time) or (
            isinstance(payload, Resubmitted) and reopened
        ):
            self._max_time[event.task_id] = payload.max_time
        self._tasks[event.task_id] = state
        self._partition_of[event.task_id] = tp

    def _finish(
        self,
        task_id: str,
        tp: TopicPartition,
        ended_ms: int,
        attempt: int | None = None,
        state: TaskState | None = None,
    ) -> None:
        if state is None:
            state = self._tasks.get(task_id)
        if attempt is None:
            # Ended live without being decoded: its last attempt is the last one released.
            attempt = state.attempt if state is not None else 0
        self._forget(task_id)
        finished = self._finished.setdefault(tp, {})
        finished.pop(task_id, None)  # ended again (after a resubmit): to the end of the order
        finished[task_id] = (attempt, ended_ms)
        if state is None or state.idempotency_key is None:
            unkeyed = self._unkeyed.setdefault(tp, deque())
            unkeyed.append((task_id, ended_ms))
            while len(unkeyed) > UNKEYED_ENDS:
                old_id, old_ms = unkeyed.popleft()
                entry = finished.get(old_id)
                if entry is not None and entry[1] == old_ms:
                    del finished[old_id]

    def _prune(self, now: int) -> None:
        """Forget tasks that ended longer than the events retention ago: a restore would no
        longer find them either. Entries are in end order, so each scan stops at the first
        one to keep."""
        if self._topology.retention_ms < 0:
            return  # kept forever
        horizon_ms = now // 1000 - self._topology.retention_ms
        for finished in self._finished.values():
            expired = []
            for task_id, (_attempt, ended_ms) in finished.items():
                if ended_ms >= horizon_ms:
                    break
                expired.append(task_id)
            for task_id in expired:
                del finished[task_id]

    def _act_on_restored(self, tp: TopicPartition, checkpoint: Checkpoint) -> None:
        for task_id, state in list(self._tasks.items()):
            if self._partition_of.get(task_id) != tp:
                continue
            if state.final:
                continue
            if state.cancel_requested:
                self._cancel(state, checkpoint)
            elif state.status == "new":
                self._schedule(state, checkpoint)
            elif state.due_us is not None and state.status in ("scheduled", "retry"):
                self._arm(state)

    def _act(self, event: TaskEvent, checkpoint: Checkpoint) -> None:
        state = self._tasks.get(event.task_id)
        payload = event.payload
        if state is None:
            if isinstance(payload, CancelRequested) and not self._ended(event.task_id):
                # Unknown here; should it run anywhere, only a worker can stop it.
                command = ControlCommand(event.task_id, payload.reason, now_us())
                checkpoint.emit(self._topology.control, event.task_id, command)
            return
        if state.final:
            return
        if isinstance(payload, Submitted) and state.status == "new":
            self._schedule(state, checkpoint)
        elif isinstance(payload, RetryScheduled):
            if state.cancel_requested:
                self._cancel(state, checkpoint)
            else:
                self._arm(state)
        elif isinstance(payload, CancelRequested):
            self._cancel(state, checkpoint)
        elif isinstance(payload, Resubmitted) and state.status == "retry":
            self._arm(state)

    def _emit(self, state: TaskState, attempt: int, payload: Payload, cp: Checkpoint) -> None:
        event = TaskEvent.new(
            state.task_id,
            state.task_name,
            attempt,
            _SOURCE,
            payload,
            traceparent=state.traceparent,
        )
        cp.emit(self._topology.events, state.task_id, event)
        new_state = fold(state, event)
        if new_state.final:
            tp = self._partition_of[state.task_id]
            self._finish(state.task_id, tp, event.at_us // 1000, new_state.attempt, new_state)
        else:
            self._tasks[state.task_id] = new_state

    def _enqueue(self, state: TaskState, attempt: int, cp: Checkpoint) -> None:
        queue = state.queue or DEFAULT_QUEUE
        if queue not in self._topology.queues:
            # No lane topic to put it in (its schema is not registered here either): an
            # app whose tasks name the queue must run the scheduler.
            message = (
                f"attempt {attempt} cannot be queued: the scheduler's app {self._topology.app!r} "
                f"has no queue {queue!r} (its queues: {', '.join(self._topology.queues)})"
            )
            self._emit(state, attempt, Failed(UNKNOWN_QUEUE, message, "", 0.0), cp)
            return
        lane = self._topology.lane_for(state.priority)
        item = work_item(state, attempt, self._max_time.get(state.task_id))
        cp.emit(self._topology.lane(lane, queue), state.task_id, item)

    def _schedule(self, state: TaskState, cp: Checkpoint) -> None:
        lane = self._topology.lane_for(state.priority)
        due = state.due_us if state.due_us is not None and state.due_us > now_us() else None
        self._emit(state, 1, Scheduled(lane, state.priority, due), cp)
        if due is None:
            self._enqueue(self._tasks[state.task_id], 1, cp)
        else:
            self._arm(self._tasks[state.task_id])

    def _arm(self, state: TaskState) -> None:
        assert state.due_us is not None
        heapq.heappush(self._timers, (state.due_us, state.task_id, state.attempt))

    def _cancel(self, state: TaskState, cp: Checkpoint) -> None:
        reason = state.cancel_reason or ""
        waiting = state.status in ("new", "retry") or (
            state.status == "scheduled" and state.due_us is not None
        )
        if waiting:
            self._emit(state, state.attempt, Cancelled(reason), cp)
        else:
            # In a lane or running: only a worker can stop it.
            command = ControlCommand(state.task_id, reason, now_us())
            cp.emit(self._topology.control, state.task_id, command)

    def _arguments_lost_failure(self, attempt: int) -> Failed:
        days = self._topology.retention_ms / 86_400_000
        return Failed(
            ARGUMENTS_LOST,
            f"attempt {attempt} cannot run: the task's Submitted event, which holds its "
            f"arguments, is no longer in {self._topology.events} (retention {days:g} days)",
            "",
            0.0,
        )

    async def tick(self, checkpoint: Checkpoint) -> float | None:
        now = now_us()
        if now >= self._next_prune_us:
            self._prune(now)
            # At least once per retention: what it holds stays within twice the retention.
            every_s = min(_PRUNE_EVERY_S, max(self._topology.retention_ms, 1000) / 1000)
            self._next_prune_us = now + int(every_s * 1_000_000)
        while self._timers and self._timers[0][0] <= now:
            due, task_id, attempt = heapq.heappop(self._timers)
            state = self._tasks.get(task_id)
            # Stale entries (cancelled, revoked, re-armed) are skipped here, not removed eagerly.
            if state is None or state.final or state.due_us != due or state.attempt != attempt:
                continue
            if state.status == "retry":
                attempt += 1
            elif state.status == "scheduled":
                attempt = max(1, attempt)
            else:
                continue
            if task_id in self._arguments_lost:
                self._emit(state, attempt, self._arguments_lost_failure(attempt), checkpoint)
                continue
            lane = self._topology.lane_for(state.priority)
            self._emit(state, attempt, Released(lane), checkpoint)
            self._enqueue(self._tasks[task_id], attempt, checkpoint)
        if not self._timers:
            return None
        return max(0.0, (self._timers[0][0] - now) / 1_000_000)
