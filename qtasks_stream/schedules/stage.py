"""The schedules stage: fires each tick of each schedule once.

It reads the (single-partition, compacted) schedules topic in its own consumer group, so
one worker process at a time owns every schedule and the others stand by. On assignment it
reads the topic from offset 0 to its end (restoring, no actions), folding definitions and
the latest decided tick of each schedule; only then does it fire.

A tick is decided in :meth:`tick`: the ``Submitted`` of its run (events topic) and a
``Ticked`` record (schedules topic) are emitted together, so the runner commits them in one
transaction: after any crash either both are in the log or neither is, and the next owner
restores the tick and goes on after it. The run's task id derives from the schedule and
the tick (:func:`tick_task_id`), so a tick fired twice anyway (a fenced owner whose
transaction was still open) is one task: the scheduler ignores a repeated submit. An owner
that lost the partition without knowing (a zombie) cannot commit a tick at all: the runner
sends an offset with every transaction, which the log refuses from an old generation.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

from qtasks_stream.events import Submitted, TaskEvent, now_us
from qtasks_stream.records import TopicPartition
from qtasks_stream.schedules.records import (
    Schedule,
    ScheduleDefinition,
    ScheduleEvent,
    ScheduleTick,
    fold_schedule,
)
from qtasks_stream.schedules.timing import iso, next_tick, tick_task_id, ticks_due
from qtasks_stream.stages.base import Checkpoint, Incoming, Restore, Stage
from qtasks_stream.state import TaskState
from qtasks_stream.topology import Topology

__all__ = ["SOURCE", "RunState", "ScheduleStage"]

log = logging.getLogger("qtasks_stream.schedules")
SOURCE = "schedules"
#: The state of a run as its events in the log have it (None: no event of it found).
RunState = Callable[[str], Awaitable[TaskState | None]]
#: Longest sleep the stage asks of its runner: a definition read meanwhile wakes it anyway.
_MAX_SLEEP_S = 60.0


class ScheduleStage(Stage):
    name = "schedules"

    def __init__(
        self,
        topology: Topology,
        run_state: RunState,
        *,
        clock: Callable[[], int] = now_us,
    ) -> None:
        """``run_state`` answers the overlap policy (has the previous run ended?) from the
        log; ``clock`` (microseconds) is injectable so tests can move time."""
        self._topology = topology
        self._run_state = run_state
        self._clock = clock
        self._schedules: dict[str, Schedule] = {}
        self._restoring = Restore()
        self._owned: set[TopicPartition] = set()
        #: Runs fired by this owner: until its transaction commits, the log knows nothing
        #: of them, which must not read as "ended".
        self._fired_here: set[str] = set()
        #: Runs known to have ended (an end never changes).
        self._ended: set[str] = set()
        #: Per schedule: the definition and tick its next due time was computed from, and
        #: that time (the runner asks every loop turn; a cron is not parsed every turn).
        self._due: dict[str, tuple[ScheduleDefinition, int, int | None]] = {}
        self.fired = 0

    @property
    def topics(self) -> Sequence[str]:
        return [self._topology.schedules]

    def schedules(self) -> dict[str, Schedule]:
        return dict(self._schedules)

    async def on_assigned(
        self, partitions: Sequence[TopicPartition], ends: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        self._owned.update(partitions)
        self._restoring.begin(partitions, ends)
        return dict.fromkeys(partitions, 0)

    async def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        # One partition holds every schedule: losing it is losing all of them.
        self._owned.difference_update(partitions)
        self._restoring.drop(partitions)
        if not self._owned:
            self._schedules.clear()
            self._fired_here.clear()
            self._due.clear()

    def positions_wanted(self) -> Collection[TopicPartition]:
        return self._restoring.wanted()

    async def advanced(
        self, positions: Mapping[TopicPartition, int], checkpoint: Checkpoint
    ) -> None:
        for tp, _ in self._restoring.reached(positions):
            log.info("schedules restored %d schedules from %s", len(self._schedules), tp)

    async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
        for item in batch:
            event: ScheduleEvent = item.value
            schedule = fold_schedule(self._schedules.get(event.name), event)
            self._schedules[event.name] = schedule

    async def tick(self, checkpoint: Checkpoint) -> float | None:
        if self._restoring or not self._owned:
            return None
        now = self._clock()
        soonest: int | None = None
        for schedule in list(self._schedules.values()):
            definition = schedule.definition
            if definition is None or definition.paused:
                continue
            due = self._next_due(schedule, definition)
            if due is not None and due <= now:
                after = max(definition.since_us, schedule.tick.tick_us if schedule.tick else 0)
                await self._decide(schedule, definition, after, now, checkpoint)
                due = self._next_due(schedule, definition)
            if due is not None and (soonest is None or due < soonest):
                soonest = due
        if soonest is None:
            return None
        return min(_MAX_SLEEP_S, max(0.0, (soonest - now) / 1_000_000))

    def _next_due(self, schedule: Schedule, definition: ScheduleDefinition) -> int | None:
        after = max(definition.since_us, schedule.tick.tick_us if schedule.tick else 0)
        cached = self._due.get(schedule.name)
        if cached is not None and cached[0] is definition and cached[1] == after:
            return cached[2]
        due = next_tick(definition, after)
        self._due[schedule.name] = (definition, after, due)
        return due

    async def _decide(
        self,
        schedule: Schedule,
        definition: ScheduleDefinition,
        after: int,
        now: int,
        checkpoint: Checkpoint,
    ) -> None:
        """Decide every tick in (``after``, ``now``] by the schedule's policies."""
        newest = definition.catch_up_limit if definition.catch_up == "all" else 1
        due = ticks_due(definition, after, now, newest)
        if not due:
            return
        latest = due[-1]
        if definition.catch_up == "all":
            to_fire = due
        elif definition.catch_up == "one" or now - latest <= definition.grace_us:
            to_fire = [latest]
        else:  # "skip", and even the latest tick is late: it was missed too
            to_fire = []
        if len(to_fire) < len(due) or ticks_due(definition, after, due[0] - 1, 1):
            log.warning(
                "schedule %s: ticks passed since %s while no stage ran; catch-up %r runs %s",
                schedule.name,
                iso(after),
                definition.catch_up,
                ", ".join(map(iso, to_fire)) or "none of them",
            )
        for tick_us in to_fire:
            if definition.overlap == "skip" and await self._previous_running(schedule):
                self._record(schedule, tick_us, "overlap", checkpoint)
                continue
            self._fire(schedule, definition, tick_us, checkpoint)
        if schedule.tick is None or schedule.tick.tick_us < latest:
            self._record(schedule, latest, "missed", checkpoint)

    async def _previous_running(self, schedule: Schedule) -> bool:
        task_id = schedule.tick.task_id if schedule.tick is not None else None
        if task_id is None or task_id in self._ended:
            return False
        state = await self._run_state(task_id)
        if state is None:
            # Not in the log: fired by us and not committed yet (running), or gone with the
            # events retention long after it ended.
            return task_id in self._fired_here
        if state.final:
            self._ended.add(task_id)
            self._fired_here.discard(task_id)
            return False
        return True

    def _record(
        self,
        schedule: Schedule,
        tick_us: int,
        outcome: str,
        checkpoint: Checkpoint,
        task_id: str | None = None,
    ) -> None:
        if task_id is None and schedule.tick is not None:
            task_id = schedule.tick.task_id  # the latest run stays known
        event = ScheduleEvent(
            schedule.name,
            "Ticked",
            self._clock(),
            SOURCE,
            tick=ScheduleTick(tick_us, outcome, task_id),
        )
        checkpoint.emit(self._topology.schedules, event.key, event)
        self._schedules[schedule.name] = fold_schedule(schedule, event)

    def _fire(
        self,
        schedule: Schedule,
        definition: ScheduleDefinition,
        tick_us: int,
        checkpoint: Checkpoint,
    ) -> None:
        task_id = tick_task_id(self._topology.base, schedule.name, tick_us)
        submitted = Submitted(
            args=definition.args,
            kwargs=definition.kwargs,
            content_type=definition.content_type,
            arguments_avro=definition.arguments_avro,
            priority=definition.priority if definition.priority is not None else 0,
            max_time=definition.max_time,
            tags=(f"schedule:{schedule.name}", f"tick:{iso(tick_us)}", *definition.tags),
        )
        event = TaskEvent.new(task_id, definition.task, 0, SOURCE, submitted)
        checkpoint.emit(self._topology.events, task_id, event)
        self._record(schedule, tick_us, "fired", checkpoint, task_id)
        self._fired_here.add(task_id)
        self.fired += 1
