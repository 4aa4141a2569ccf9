"""SchedulerStage, driven by hand: a fake checkpoint records what it emits, and a fake events
partition gives records their offsets and takes back the events the stage emitted (what the
runner's commit and the next poll would do)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest

from qtasks_stream.events import (
    ROUTED_HEADER,
    Cancelled,
    CancelRequested,
    ControlCommand,
    Failed,
    Payload,
    Released,
    RetryScheduled,
    Scheduled,
    Started,
    Submitted,
    Succeeded,
    TaskEvent,
    WorkItem,
    now_us,
)
from qtasks_stream.records import OutRecord, Record, TopicPartition
from qtasks_stream.stages import scheduler
from qtasks_stream.stages.base import Checkpoint, Incoming
from qtasks_stream.stages.scheduler import ARGUMENTS_LOST, UNKNOWN_QUEUE, SchedulerStage
from qtasks_stream.topology import Topology

TOPOLOGY = Topology("sched", partitions=1, lanes=3)
TP = TopicPartition(TOPOLOGY.events, 0)


@dataclass(frozen=True)
class Emitted:
    topic: str
    key: str
    value: Any
    origin: Record | None


class FakeCheckpoint(Checkpoint):
    def __init__(self) -> None:
        self.emitted: list[Emitted] = []
        self.finished: list[Record] = []
        self.dead: list[tuple[Record, str]] = []

    def emit(self, topic: str, key: str, value: Any, origin: Record | None = None) -> None:
        self.emitted.append(Emitted(topic, key, value, origin))

    def emit_raw(self, record: OutRecord, origin: Record | None = None) -> None:
        raise AssertionError(f"the scheduler emits no raw records, got {record}")

    def done(self, record: Record) -> None:
        self.finished.append(record)

    def dead_letter(self, record: Record, reason: str, error: BaseException | None) -> None:
        self.dead.append((record, reason))

    def take(self) -> list[Emitted]:
        out, self.emitted = self.emitted, []
        return out


class EventsPartition:
    """Partition 0 of the events topic."""

    def __init__(self) -> None:
        self.records: list[Incoming] = []

    @property
    def end(self) -> int:
        return len(self.records)

    def append(self, event: TaskEvent, *headers: tuple[str, bytes]) -> Incoming:
        rec = Record(
            TP.topic,
            0,
            self.end,
            event.task_id.encode(),
            b"",
            (*event.record_headers(), *headers),
            timestamp_ms=event.at_us // 1000,
        )
        item = Incoming(rec, event)
        self.records.append(item)
        return item

    def publish(self, outputs: Iterable[Emitted]) -> list[Incoming]:
        """Append the events among ``outputs``, as a commit would."""
        return [self.append(o.value) for o in outputs if o.topic == TOPOLOGY.events]


class Harness:
    def __init__(self, log: EventsPartition | None = None) -> None:
        self.stage = SchedulerStage(TOPOLOGY)
        self.cp = FakeCheckpoint()
        self.log = log if log is not None else EventsPartition()

    async def assign(self) -> dict[TopicPartition, int]:
        return await self.stage.on_assigned([TP], {TP: self.log.end})

    async def handle(self, items: list[Incoming], through: int | None = None) -> None:
        """What the runner does with a polled batch: handle it, then report the position
        reached (``through`` counts records dead-lettered before the stage saw them)."""
        # As the runner does: a record the stage does not want decoded comes without value.
        wants = self.stage.wants_value
        items = [i if wants(i.record) else Incoming(i.record, None) for i in items]
        await self.stage.handle(items, self.cp)
        reached = through if through is not None else max(i.record.offset for i in items) + 1
        await self.stage.advanced({TP: reached}, self.cp)

    async def feed(self, *events: TaskEvent) -> list[Emitted]:
        """Append client events, let the stage handle them and read back what it emitted."""
        outputs: list[Emitted] = []
        pending = [self.log.append(e) for e in events]
        while pending:
            await self.handle(pending)
            new = self.cp.take()
            outputs.extend(new)
            pending = self.log.publish(new)
        return outputs

    async def replay(self) -> list[Emitted]:
        """Hand the stage the whole partition from offset 0 (a restore)."""
        await self.handle(list(self.log.records))
        return self.cp.take()

    async def tick(self) -> tuple[float | None, list[Emitted]]:
        next_due = await self.stage.tick(self.cp)
        outputs = self.cp.take()
        self.log.publish(outputs)
        return next_due, outputs


def _client(task_id: str, payload: Payload, name: str = "job") -> TaskEvent:
    return TaskEvent.new(task_id, name, 0, "client", payload)


def _submit(task_id: str, *, priority: int = 0, eta_us: int | None = None, **kw: Any) -> TaskEvent:
    return _client(task_id, Submitted('["a"]', '{"b": 1}', priority, eta_us=eta_us, **kw))


def _events(outputs: Iterable[Emitted]) -> list[TaskEvent]:
    return [o.value for o in outputs if o.topic == TOPOLOGY.events]


def _kinds(outputs: Iterable[Emitted]) -> list[str]:
    return [e.kind for e in _events(outputs)]


def _work(outputs: Iterable[Emitted]) -> list[tuple[str, WorkItem]]:
    return [(o.topic, o.value) for o in outputs if isinstance(o.value, WorkItem)]


async def _until(due_us: int) -> None:
    """Sleep past a wall-clock instant (the scheduler compares due times with ``now_us()``)."""
    delay = (due_us - now_us()) / 1_000_000
    if delay > 0:
        await asyncio.sleep(delay + 0.002)
    assert now_us() >= due_us


# -- routing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("priority", "lane"), [(0, 0), (1, 1), (2, 2), (7, 2), (-3, 0)])
async def test_priority_routes_to_its_lane(priority: int, lane: int) -> None:
    h = Harness()
    await h.assign()
    outputs = await h.feed(_submit("t1", priority=priority, max_time=1.5))
    [scheduled] = _events(outputs)
    assert scheduled.payload == Scheduled(lane=lane, priority=priority, due_us=None)
    assert (scheduled.task_id, scheduled.attempt, scheduled.source) == ("t1", 1, "scheduler")
    [(topic, item)] = _work(outputs)
    assert topic == TOPOLOGY.lane(lane)
    assert (item.task_id, item.task_name, item.attempt) == ("t1", "job", 1)
    assert (item.args, item.kwargs, item.priority, item.max_time) == (
        '["a"]',
        '{"b": 1}',
        priority,
        1.5,
    )
    # The work item goes out after the Scheduled event, keyed by the task id.
    assert [o.topic for o in outputs] == [TOPOLOGY.events, TOPOLOGY.lane(lane)]
    assert all(o.key == "t1" for o in outputs)


def _routed(task_id: str, priority: int = 0) -> tuple[TaskEvent, TaskEvent]:
    """What a client writes for a task it routed itself (and the work item, not here)."""
    return _submit(task_id, priority=priority), TaskEvent.new(
        task_id, "job", 1, "client", Scheduled(priority, priority, None)
    )


async def test_a_task_its_client_routed_is_not_routed_again_and_a_cancel_goes_to_workers() -> None:
    h = Harness()
    await h.assign()
    submitted, scheduled = _routed("t1", priority=1)
    await h.handle([h.log.append(submitted, (ROUTED_HEADER, b"1")), h.log.append(scheduled)])
    assert h.cp.take() == []
    outputs = await h.feed(_client("t1", CancelRequested("stop")))
    assert [(o.topic, type(o.value)) for o in outputs] == [(TOPOLOGY.control, ControlCommand)]


async def test_a_restore_ending_between_a_routed_submit_and_its_scheduled_routes_nothing() -> None:
    # The two are in one transaction, but a restore's end (the high watermark when assigned)
    # may fall between them: the task is in its lane all the same.
    h = Harness()
    submitted, scheduled = _routed("t1")
    h.log.append(submitted, (ROUTED_HEADER, b"1"))
    assert await h.assign() == {TP: 0}
    assert await h.replay() == []
    await h.handle([h.log.append(scheduled)])
    assert h.cp.take() == []
    assert await h.tick() == (None, [])


async def test_repeated_submit_is_scheduled_once() -> None:
    h = Harness()
    await h.assign()
    first = await h.feed(_submit("t1", idempotency_key="k"))
    assert len(_work(first)) == 1
    again = await h.feed(_submit("t1", idempotency_key="k", priority=2))
    assert again == []


# -- delays ---------------------------------------------------------------------------------------


async def test_eta_delays_the_work_item_until_due() -> None:
    h = Harness()
    await h.assign()
    due = now_us() + 300_000
    outputs = await h.feed(_submit("t1", priority=1, eta_us=due))
    assert [e.payload for e in _events(outputs)] == [Scheduled(lane=1, priority=1, due_us=due)]
    assert _work(outputs) == []

    next_due, early = await h.tick()
    assert early == []
    assert next_due is not None and 0 < next_due <= 0.3

    await _until(due)
    next_due, fired = await h.tick()
    assert _kinds(fired) == ["Released"]
    [released] = _events(fired)
    assert released.payload == Released(lane=1) and released.attempt == 1
    [(topic, item)] = _work(fired)
    assert topic == TOPOLOGY.lane(1) and item.attempt == 1
    assert next_due is None

    assert await h.tick() == (None, [])


async def test_eta_in_the_past_is_scheduled_at_once() -> None:
    h = Harness()
    await h.assign()
    outputs = await h.feed(_submit("t1", eta_us=now_us() - 1_000_000))
    assert [e.payload for e in _events(outputs)] == [Scheduled(lane=0, priority=0, due_us=None)]
    assert len(_work(outputs)) == 1


async def test_delayed_task_fires_once_across_restores() -> None:
    first = Harness()
    await first.assign()
    due = now_us() + 300_000
    await first.feed(_submit("t1", eta_us=due))
    assert [e.kind for e in (i.value for i in first.log.records)] == ["Submitted", "Scheduled"]

    # Restart before it is due: a new stage restores the partition from offset 0, acts on
    # nothing while restoring, and arms the delay again.
    second = Harness(first.log)
    assert await second.assign() == {TP: 0}
    assert await second.replay() == []
    next_due, early = await second.tick()
    assert early == [] and next_due is not None and next_due > 0
    await _until(due)
    _, fired = await second.tick()
    assert _kinds(fired) == ["Released"] and len(_work(fired)) == 1
    assert await second.tick() == (None, [])

    # Restart after it fired: the Released event in the log keeps it from firing again.
    third = Harness(first.log)
    assert await third.assign() == {TP: 0}
    assert await third.replay() == []
    assert await third.tick() == (None, [])


async def test_restore_schedules_only_what_was_never_scheduled() -> None:
    h = Harness()
    await h.assign()
    await h.feed(_submit("queued"))
    await h.feed(_submit("done"))
    h.log.append(TaskEvent.new("done", "job", 1, "worker:w", Started("worker:w")))
    h.log.append(TaskEvent.new("done", "job", 1, "worker:w", Succeeded("1", 1.0)))
    # Submitted, then the process died before the scheduler handled it.
    h.log.append(_submit("orphan", priority=2))

    restored = Harness(h.log)
    assert await restored.assign() == {TP: 0}
    outputs = await restored.replay()
    assert [(e.task_id, e.kind) for e in _events(outputs)] == [("orphan", "Scheduled")]
    assert [(topic, item.task_id) for topic, item in _work(outputs)] == [
        (TOPOLOGY.lane(2), "orphan")
    ]


async def test_empty_partition_needs_no_restore() -> None:
    h = Harness()
    assert await h.assign() == {}
    outputs = await h.feed(_submit("t1"))
    assert len(_work(outputs)) == 1


# -- retries ---------------------------------------------------------------------------------------


async def test_retry_is_released_with_the_next_attempt_when_due() -> None:
    h = Harness()
    await h.assign()
    await h.feed(_submit("t1", priority=2))
    due = now_us() + 200_000
    retry = RetryScheduled(2, due, "OSError", "reset", "tb", 1.0)
    worker_events = [
        TaskEvent.new("t1", "job", 1, "worker:w", Started("worker:w")),
        TaskEvent.new("t1", "job", 1, "worker:w", retry),
    ]
    assert await h.feed(*worker_events) == []
    assert (await h.tick())[1] == []
    await _until(due)
    _, fired = await h.tick()
    [released] = _events(fired)
    assert released.payload == Released(lane=2) and released.attempt == 2
    [(topic, item)] = _work(fired)
    assert topic == TOPOLOGY.lane(2) and item.attempt == 2


# -- cancellation ----------------------------------------------------------------------------------


async def test_cancel_of_a_delayed_task_emits_cancelled() -> None:
    h = Harness()
    await h.assign()
    due = now_us() + 200_000
    await h.feed(_submit("t1", eta_us=due))
    outputs = await h.feed(_client("t1", CancelRequested("not needed")))
    [cancelled] = _events(outputs)
    assert cancelled.payload == Cancelled("not needed")
    assert not [o for o in outputs if o.topic == TOPOLOGY.control]
    await _until(due)
    assert (await h.tick())[1] == []


async def test_cancel_during_retry_backoff_emits_cancelled() -> None:
    h = Harness()
    await h.assign()
    await h.feed(_submit("t1"))
    due = now_us() + 200_000
    await h.feed(
        TaskEvent.new("t1", "job", 1, "w", Started("w")),
        TaskEvent.new("t1", "job", 1, "w", RetryScheduled(2, due, "E", "m", "t", 1.0)),
    )
    outputs = await h.feed(_client("t1", CancelRequested("stop")))
    assert [e.payload for e in _events(outputs)] == [Cancelled("stop")]
    await _until(due)
    assert (await h.tick())[1] == []


async def test_cancel_of_a_queued_task_emits_a_control_command() -> None:
    h = Harness()
    await h.assign()
    await h.feed(_submit("t1"))
    outputs = await h.feed(_client("t1", CancelRequested("too late to unqueue")))
    # Already in a lane: only a worker can stop it, so no Cancelled event from here.
    assert _events(outputs) == []
    [command] = outputs
    assert command.topic == TOPOLOGY.control and command.key == "t1"
    assert isinstance(command.value, ControlCommand)
    assert (command.value.task_id, command.value.reason, command.value.command) == (
        "t1",
        "too late to unqueue",
        "CANCEL",
    )


async def test_cancel_of_a_finished_task_does_nothing() -> None:
    h = Harness()
    await h.assign()
    await h.feed(_submit("t1"))
    await h.feed(
        TaskEvent.new("t1", "job", 1, "w", Started("w")),
        TaskEvent.new("t1", "job", 1, "w", Succeeded("1", 1.0)),
    )
    assert await h.feed(_client("t1", CancelRequested("late"))) == []


# -- rebalancing -----------------------------------------------------------------------------------


async def test_partition_reassigned_to_the_same_instance_is_not_scheduled_twice() -> None:
    h = Harness()
    await h.assign()
    h.log.append(_submit("t1"))
    await h.handle([h.log.records[-1]])
    first = h.cp.take()
    assert len(_work(first)) == 1
    # The runner committed the Scheduled event and the work item; before the next poll reads
    # the Scheduled event back, the group rebalances (another scheduler instance joins, or
    # this one was fenced and rejoins) and hands the partition back to this same instance.
    h.log.publish(first)
    await h.stage.on_revoked([TP])
    assert await h.assign() == {TP: 0}
    restored = await h.replay()
    later = await h.feed(_submit("t2"))

    scheduled_again = [item.task_id for _, item in _work([*restored, *later])]
    assert scheduled_again == ["t2"], (
        "t1 already has a work item in its lane; scheduling it again runs it twice"
    )


async def test_restore_completes_when_the_last_record_was_dead_lettered() -> None:
    first = Harness()
    await first.assign()
    due = now_us() + 200_000
    await first.feed(_submit("delayed", eta_us=due))
    first.log.append(_submit("orphan"))  # submitted while no scheduler ran
    # Then a record nobody can decode (a foreign producer, a key that is no task id). The
    # runner dead-letters it, so the stage is never handed the partition's last offset.
    junk = Record(TP.topic, 0, first.log.end, b"\xff\xfe", b"\x00junk")
    first.log.records.append(Incoming(junk, None))

    restored = Harness(first.log)
    assert await restored.assign() == {TP: 0}
    decodable = [item for item in first.log.records if item.value is not None]
    await restored.handle(decodable, through=first.log.end)
    outputs = restored.cp.take()
    assert [item.task_id for _, item in _work(outputs)] == ["orphan"], (
        "restore never finished: the submitted task was not scheduled"
    )
    await _until(due)
    _, fired = await restored.tick()
    assert _kinds(fired) == ["Released"], "restore never finished: the delay was not re-armed"


# -- retention ------------------------------------------------------------------------------------


async def test_an_ended_task_is_remembered_for_the_retention_then_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A repeated submit of an ended task is ignored while the log still holds the task, as
    a restore would find it; past the retention it is a new submit (and memory is freed)."""
    clock = [now_us()]
    monkeypatch.setattr(scheduler, "now_us", lambda: clock[0])
    h = Harness()
    await h.assign()
    first = await h.feed(_submit("t1", idempotency_key="k"))
    assert len(_work(first)) == 1
    await h.feed(TaskEvent.new("t1", "job", 1, "worker:w", Succeeded("1", 1.0)))

    clock[0] += (TOPOLOGY.retention_ms - 60_000) * 1000  # a minute short of the retention
    await h.tick()
    assert await h.feed(_submit("t1", idempotency_key="k")) == []

    assert h.stage.held() == {"open": 0, "ended": 1}
    clock[0] += 120_000 * 1000  # past it, and past the next prune
    await h.tick()
    assert h.stage.held() == {"open": 0, "ended": 0}
    again = await h.feed(_submit("t1", idempotency_key="k"))
    assert [item.task_id for _lane, item in _work(again)] == ["t1"]


async def test_of_ended_tasks_without_a_key_only_the_last_ones_are_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only an idempotency key is submitted again on purpose: its end is kept for the
    retention; of other ends the last UNKEYED_ENDS per partition, so that a busy scheduler's
    memory stays flat (it grew 0.2 KB per task for the retention)."""
    monkeypatch.setattr(scheduler, "UNKEYED_ENDS", 2)
    h = Harness()
    await h.assign()
    await h.feed(_submit("keyed", idempotency_key="k"))
    await h.feed(TaskEvent.new("keyed", "job", 1, "worker:w", Succeeded("1", 1.0)))
    for task_id in ("t1", "t2", "t3"):
        await h.feed(_submit(task_id))
        await h.feed(TaskEvent.new(task_id, "job", 1, "worker:w", Succeeded("1", 1.0)))
    assert h.stage.held() == {"open": 0, "ended": 3}
    # The last two unkeyed ends and the keyed one are still known: a repeat is ignored.
    for task_id in ("t2", "t3"):
        assert await h.feed(_submit(task_id)) == []
    assert await h.feed(_submit("keyed", idempotency_key="k")) == []
    # The oldest unkeyed end was forgotten: a copy of its submit is a new task.
    again = await h.feed(_submit("t1"))
    assert [item.task_id for _lane, item in _work(again)] == ["t1"]


async def test_a_short_retention_is_pruned_within_the_retention_not_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long-running embedded app with a retention of seconds keeps ended tasks for about
    that long, not for the minute between prunes (issue 12.11: memory grew with tasks)."""
    clock = [now_us()]
    monkeypatch.setattr(scheduler, "now_us", lambda: clock[0])
    h = Harness()
    h.stage = SchedulerStage(dataclasses.replace(TOPOLOGY, retention_ms=5_000))
    await h.assign()
    await h.tick()
    await h.feed(_submit("t1"))
    await h.feed(TaskEvent.new("t1", "job", 1, "worker:w", Succeeded("1", 1.0)))
    assert h.stage.held() == {"open": 0, "ended": 1}
    clock[0] += 12_000_000  # twice the retention: past it, and past the next prune
    await h.tick()
    assert h.stage.held() == {"open": 0, "ended": 0}


async def test_events_kept_forever_keep_an_ended_task_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [now_us()]
    monkeypatch.setattr(scheduler, "now_us", lambda: clock[0])
    h = Harness()
    h.stage = SchedulerStage(Topology("sched", partitions=1, lanes=3, retention_ms=-1))
    await h.assign()
    await h.feed(_submit("t1", idempotency_key="k"))
    await h.feed(TaskEvent.new("t1", "job", 1, "worker:w", Succeeded("1", 1.0)))
    clock[0] += 3650 * 86_400 * 1_000_000  # ten years
    await h.tick()
    assert await h.feed(_submit("t1", idempotency_key="k")) == []


async def test_a_task_whose_submit_is_past_the_retention_fails_instead_of_running() -> None:
    """The log starts after the task's Submitted (deleted by retention): a restore finds it
    delayed, and at its due time it fails naming the cause; it never runs without its
    arguments."""
    log = EventsPartition()
    due = now_us() + 50_000
    log.append(TaskEvent.new("old", "job", 1, "scheduler", Scheduled(0, 0, due)))
    h = Harness(log)
    await h.assign()
    assert await h.replay() == []
    await _until(due)
    _next, outputs = await h.tick()
    assert _work(outputs) == []
    [failed] = _events(outputs)
    assert isinstance(failed.payload, Failed)
    assert failed.payload.error_type == ARGUMENTS_LOST
    assert "Submitted" in failed.payload.message and "retention" in failed.payload.message
    # Ended: a late copy of its release changes nothing.
    assert await h.feed(_submit("old")) == []


async def test_a_cancel_of_an_unknown_task_is_forwarded_and_nothing_is_held() -> None:
    """A task that ended longer than the retention ago, or never was: the workers get the
    cancel (only they could stop it), and the scheduler keeps no state for it."""
    h = Harness()
    await h.assign()
    outputs = await h.feed(_client("ghost", CancelRequested("typo")))
    assert [(o.topic, o.key) for o in outputs] == [(TOPOLOGY.control, "ghost")]
    assert isinstance(outputs[0].value, ControlCommand)
    assert outputs[0].value.reason == "typo"
    assert h.stage.held() == {"open": 0, "ended": 0}


# -- named queues ---------------------------------------------------------------------------------


async def test_a_task_of_a_named_queue_goes_to_that_queue_s_lane() -> None:
    h = Harness()
    h.stage = SchedulerStage(TOPOLOGY.with_queue("gpu"))
    await h.assign()
    outputs = await h.feed(_submit("t1", priority=1, queue="gpu"))
    [(topic, item)] = _work(outputs)
    assert topic == TOPOLOGY.lane(1, "gpu") == "qtasks.sched.queue.gpu.lane.1"
    assert item.task_id == "t1"


async def test_a_queue_the_scheduler_s_app_lacks_fails_the_task_naming_it() -> None:
    """No lane to put it in: failing it says what to fix, instead of an encode error that
    would stop the scheduler's partition."""
    h = Harness()
    await h.assign()
    outputs = await h.feed(_submit("t1", queue="gpu"))
    assert _work(outputs) == [] and _kinds(outputs) == ["Scheduled", "Failed"]
    failed = _events(outputs)[-1].payload
    assert isinstance(failed, Failed) and failed.error_type == UNKNOWN_QUEUE
    assert "has no queue 'gpu' (its queues: default)" in failed.message
    assert h.stage.held() == {"open": 0, "ended": 1}
