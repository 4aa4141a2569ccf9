"""WorkerStage, driven by hand: work items go straight to ``handle`` and a fake checkpoint
records the events, dead letters and finished records. Cancel commands travel through the
control topic of a real in-memory event log."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.context import current
from qtasks_stream.errors import ConfigurationError, EventLogError, SerdeError
from qtasks_stream.eventlog.base import Consumer
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import (
    Cancelled,
    ControlCommand,
    Failed,
    Progress,
    RetryScheduled,
    Started,
    Succeeded,
    TaskEvent,
    TimedOut,
    WorkItem,
    now_us,
)
from qtasks_stream.executors.pool import LocalExecutor
from qtasks_stream.records import OutRecord, Record
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.serde.payloads import TaskPayloads
from qtasks_stream.stages.base import Checkpoint, Incoming
from qtasks_stream.stages.worker import WorkerStage
from qtasks_stream.tasks import Router
from qtasks_stream.topology import Topology
from tests.e2ehelpers import eventually

TOPOLOGY = Topology("worker", partitions=1, lanes=3)
LIMIT = 5.0


class FakeCheckpoint(Checkpoint):
    def __init__(self) -> None:
        self.events: list[TaskEvent] = []
        self.other: list[tuple[str, Any]] = []
        self.finished: list[Record] = []
        self.dead: list[tuple[Record, str, BaseException | None]] = []
        self.changed = asyncio.Event()

    def emit(self, topic: str, key: str, value: Any, origin: Record | None = None) -> None:
        assert key == value.task_id
        if topic == TOPOLOGY.events:
            self.events.append(value)
        else:
            self.other.append((topic, value))
        self.changed.set()

    def emit_raw(self, record: OutRecord, origin: Record | None = None) -> None:
        self.other.append((record.topic, record))
        self.changed.set()

    def done(self, record: Record) -> None:
        self.finished.append(record)
        self.changed.set()

    def dead_letter(self, record: Record, reason: str, error: BaseException | None) -> None:
        self.dead.append((record, reason, error))
        self.done(record)

    def of(self, task_id: str) -> list[TaskEvent]:
        return [e for e in self.events if e.task_id == task_id]

    def outcome(self, task_id: str) -> Any:
        [last] = [e for e in self.of(task_id) if e.kind not in ("Started", "Progress")]
        return last.payload

    async def until(self, what: Callable[[], bool], message: str = "") -> None:
        try:
            async with asyncio.timeout(LIMIT):
                while not what():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"not within {LIMIT}s: {message}") from None


@dataclass
class Harness:
    stage: WorkerStage
    cp: FakeCheckpoint
    log: InMemoryEventLog
    serde: AvroSerde
    router: Router
    offsets: itertools.count[int]

    def item(
        self,
        task_name: str,
        *args: Any,
        lane: int = 0,
        attempt: int = 1,
        max_time: float | None = None,
        task_id: str | None = None,
    ) -> Incoming:
        work = WorkItem(
            task_id=task_id or uuid.uuid4().hex,
            task_name=task_name,
            attempt=attempt,
            args=json.dumps(list(args)),
            kwargs="{}",
            priority=lane,
            submitted_at_us=now_us(),
            max_time=max_time,
        )
        rec = Record(TOPOLOGY.lane(lane), 0, next(self.offsets), work.task_id.encode(), b"")
        return Incoming(rec, work)

    async def give(self, *items: Incoming) -> list[str]:
        await self.stage.handle(list(items), self.cp)
        return [i.value.task_id for i in items]

    async def all_done(self, *items: Incoming) -> None:
        wanted = {i.record for i in items}
        await self.cp.until(lambda: wanted <= set(self.cp.finished), "records finished")

    async def cancel(self, task_id: str, reason: str) -> None:
        producer = self.log.producer()
        value = self.serde.encode(
            TOPOLOGY.control, ControlCommand(task_id, reason, now_us()).to_avro()
        )
        await producer.send([OutRecord(TOPOLOGY.control, task_id.encode(), value)])


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    stages: list[WorkerStage] = []

    async def build(
        router: Router,
        *,
        concurrency: int = 4,
        buffer: int | None = None,
        lane_weights: tuple[int, ...] | None = None,
        control: Callable[[InMemoryEventLog], Consumer] | None = None,
        **options: Any,
    ) -> Harness:
        log = InMemoryEventLog()
        await log.create_topics(TOPOLOGY.specs())
        registry = SchemaRegistryClient.new_client({"url": f"mock://worker-{uuid.uuid4().hex}"})
        serde = AvroSerde(registry, TOPOLOGY.topic_schemas())
        await serde.start()
        stage = WorkerStage(
            TOPOLOGY,
            tasks=router.definitions,
            executor=LocalExecutor(threads=2),
            serde=serde,
            payloads=TaskPayloads(registry, TOPOLOGY.events, router.definitions),
            control=(
                (lambda: control(log))
                if control is not None
                else lambda: log.consumer([TOPOLOGY.control], group_id=None)
            ),
            worker_id="worker:test",
            concurrency=concurrency,
            buffer=buffer,
            lane_weights=lane_weights,
            shutdown_grace=1.0,
            **options,
        )
        cp = FakeCheckpoint()
        await stage.start(cp)
        stages.append(stage)
        return Harness(stage, cp, log, serde, router, itertools.count())

    yield build
    for stage in stages:
        async with asyncio.timeout(LIMIT):
            await stage.stop()


# -- running ---------------------------------------------------------------------------------------


async def test_success_emits_started_then_succeeded(make: Callable[..., Any]) -> None:
    router = Router()

    @router.task
    async def add(a: int, b: int) -> int:
        return a + b

    h = await make(router)
    item = h.item("add", 2, 3, attempt=2)
    [task_id] = await h.give(item)
    await h.all_done(item)
    started, succeeded = h.cp.of(task_id)
    assert started.payload == Started("worker:test")
    assert isinstance(succeeded.payload, Succeeded) and succeeded.payload.result == "5"
    assert {started.attempt, succeeded.attempt} == {2}
    assert succeeded.source == "worker:test"


async def test_a_quick_attempt_emits_started_with_its_outcome_a_long_one_while_running(
    make: Callable[..., Any],
) -> None:
    # One transaction for both when the attempt ends within a few ms (the runner commits what
    # was emitted between two of its turns); a long attempt's Started is visible while it runs.
    router = Router()
    seen: dict[str, list[str]] = {}

    @router.task
    async def quick(name: str) -> None:
        seen[name] = [e.kind for e in h.cp.events if e.task_id == current().task_id]

    @router.task
    async def slow(name: str) -> None:
        await asyncio.sleep(0.2)
        seen[name] = [e.kind for e in h.cp.events if e.task_id == current().task_id]

    h = await make(router)
    items = [h.item("quick", "quick"), h.item("slow", "slow")]
    await h.give(*items)
    await h.all_done(*items)
    assert seen == {"quick": [], "slow": ["Started"]}
    for item in items:
        assert [e.kind for e in h.cp.of(item.value.task_id)] == ["Started", "Succeeded"]


async def test_every_long_attempt_emits_its_started_while_running(
    make: Callable[..., Any],
) -> None:
    # One timer emits the held Started events in turn: one held after another was emitted,
    # and one held while another waits, are each emitted while their attempt runs.
    router = Router()
    seen: dict[str, list[str]] = {}

    @router.task
    async def slow(name: str) -> None:
        await asyncio.sleep(0.2)
        seen[name] = [e.kind for e in h.cp.events if e.task_id == current().task_id]

    h = await make(router)
    first = h.item("slow", "first")
    await h.give(first)
    await h.cp.until(lambda: bool(h.cp.of(first.value.task_id)), "the first Started emitted")
    later = [h.item("slow", "second"), h.item("slow", "third")]
    await h.give(later[0])
    await asyncio.sleep(0.002)
    await h.give(later[1])
    await h.all_done(first, *later)
    assert seen == {"first": ["Started"], "second": ["Started"], "third": ["Started"]}


async def test_concurrency_is_bounded(make: Callable[..., Any]) -> None:
    router = Router()
    running = 0
    peak = 0

    @router.task
    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.03)
        finally:
            running -= 1
        return i

    h = await make(router, concurrency=3, buffer=20)
    items = [h.item("work", i, lane=i % 3) for i in range(12)]
    await h.give(*items[:5])
    await h.give(*items[5:])
    await h.all_done(*items)
    assert peak == 3, f"{peak} attempts ran at once with concurrency=3"
    assert all(isinstance(h.cp.outcome(i.value.task_id), Succeeded) for i in items)


async def test_a_full_lane_is_paused_and_a_full_buffer_stops_polling(
    make: Callable[..., Any],
) -> None:
    router = Router()
    gate = asyncio.Event()

    @router.task
    async def wait() -> None:
        await gate.wait()

    h = await make(router, concurrency=1, buffer=4)
    assert h.stage.capacity() == 4 and list(h.stage.paused_topics()) == []
    first = h.item("wait", lane=2)
    await h.give(first)
    await h.cp.until(lambda: bool(h.cp.of(first.value.task_id)), "first attempt started")
    # Taken by the slot: no longer buffered.
    assert h.stage.capacity() == 4 and list(h.stage.paused_topics()) == []
    low = [h.item("wait", lane=2) for _ in range(4)]
    await h.give(*low)
    # The low lane is full: it is paused, and the lanes above it still get polled.
    assert list(h.stage.paused_topics()) == [TOPOLOGY.lane(2)]
    assert h.stage.capacity() == 4
    rest = [h.item("wait", lane=lane) for lane in (0, 1) for _ in range(4)]
    await h.give(*rest)
    # Every lane full: no poll at all until a slot takes work (bounded memory).
    assert h.stage.capacity() == 0
    assert sorted(h.stage.paused_topics()) == sorted(TOPOLOGY.lane(i) for i in range(3))
    gate.set()
    await h.all_done(first, *low, *rest)
    assert h.stage.capacity() == 4 and list(h.stage.paused_topics()) == []


def _gated_jobs() -> tuple[Router, asyncio.Event, list[str]]:
    """A task ``job(label)`` that records the order labels run in; "blocker" holds its slot
    until the gate opens, so that the items given meanwhile are all buffered."""
    router = Router()
    gate = asyncio.Event()
    order: list[str] = []

    @router.task
    async def job(label: str) -> None:
        order.append(label)
        if label == "blocker":
            await gate.wait()

    return router, gate, order


async def test_lane_zero_is_served_before_lane_two_already_buffered(
    make: Callable[..., Any],
) -> None:
    router, gate, order = _gated_jobs()
    h = await make(router, concurrency=1)
    blocker = h.item("job", "blocker", lane=2)
    await h.give(blocker)
    await h.cp.until(lambda: order == ["blocker"], "the blocker runs")
    low = [h.item("job", f"low-{i}", lane=2) for i in range(3)]
    await h.give(*low)
    mid = h.item("job", "mid", lane=1)
    high = [h.item("job", f"high-{i}", lane=0) for i in range(2)]
    # The high-priority items arrive after the low ones are buffered, and overtake them.
    await h.give(mid, *high)
    gate.set()
    await h.all_done(blocker, *low, mid, *high)
    assert order == ["blocker", "high-0", "high-1", "mid", "low-0", "low-1", "low-2"]


async def test_lane_weights_serve_every_lane_in_proportion(make: Callable[..., Any]) -> None:
    router, gate, order = _gated_jobs()
    h = await make(router, concurrency=1, buffer=16, lane_weights=(4, 2, 1))
    blocker = h.item("job", "blocker", lane=0)
    await h.give(blocker)
    await h.cp.until(lambda: order == ["blocker"], "the blocker runs")
    items = [h.item("job", f"{lane}-{i}", lane=lane) for lane in (2, 1, 0) for i in range(8)]
    await h.give(*items)
    gate.set()
    await h.all_done(blocker, *items)
    lanes = [label[0] for label in order[1:]]
    # Every lane has work for the first 7 takes: 4:2:1, the lowest lane first on a tie.
    assert lanes[:7] == ["0", "1", "0", "2", "0", "1", "0"]
    assert Counter(lanes[:14]) == {"0": 8, "1": 4, "2": 2}
    # Lane 0 is empty from then on: the others share the slot 2:1, nothing starves.
    assert Counter(lanes[14:20]) == {"1": 4, "2": 2}


async def test_lane_weights_are_checked_at_the_call() -> None:
    with pytest.raises(ConfigurationError, match="lane_weights must be 3 positive ints"):
        QueueTasks("w", lane_weights=(1, 0, 1))
    with pytest.raises(ConfigurationError, match="lane_weights must be 3 positive ints"):
        QueueTasks("w", lane_weights=(2, 1))


async def test_max_time_ends_with_timed_out(make: Callable[..., Any]) -> None:
    router = Router()
    saw_cancel = asyncio.Event()

    @router.task
    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    @router.task(max_time=0.05)
    async def slow_by_definition() -> None:
        await asyncio.sleep(30)

    h = await make(router)
    per_call = h.item("slow", max_time=0.05)
    by_definition = h.item("slow_by_definition")
    await h.give(per_call, by_definition)
    await h.all_done(per_call, by_definition)
    assert h.cp.outcome(per_call.value.task_id) == TimedOut(0.05)
    assert h.cp.outcome(by_definition.value.task_id) == TimedOut(0.05)
    assert saw_cancel.is_set()


async def test_max_time_retries_when_attempts_remain(make: Callable[..., Any]) -> None:
    router = Router()

    @router.task(max_time=0.05, retry=1, retry_backoff=0.01)
    async def slow() -> None:
        await asyncio.sleep(30)

    h = await make(router)
    item = h.item("slow")
    await h.give(item)
    await h.all_done(item)
    outcome = h.cp.outcome(item.value.task_id)
    assert isinstance(outcome, RetryScheduled)
    assert outcome.next_attempt == 2 and outcome.error_type == "qtasks_stream.errors.TaskTimeout"


async def test_retry_on_exc_matches_subclasses(make: Callable[..., Any]) -> None:
    router = Router()

    @router.task(retry=2, retry_on_exc=[OSError], retry_backoff=0.01, retry_jitter=0.0)
    def connect(kind: str) -> None:
        raise {"conn": ConnectionError, "value": ValueError}[kind](f"{kind} failed")

    h = await make(router)
    retried = h.item("connect", "conn")
    unrelated = h.item("connect", "value")
    exhausted = h.item("connect", "conn", attempt=3)
    before = now_us()
    await h.give(retried, unrelated, exhausted)
    await h.all_done(retried, unrelated, exhausted)

    retry = h.cp.outcome(retried.value.task_id)
    assert isinstance(retry, RetryScheduled)
    assert retry.next_attempt == 2
    assert retry.error_type == "ConnectionError" and retry.message == "conn failed"
    assert "ConnectionError: conn failed" in retry.traceback
    assert before + 10_000 <= retry.due_us <= now_us() + 10_000

    failed = h.cp.outcome(unrelated.value.task_id)
    assert isinstance(failed, Failed) and failed.error_type == "ValueError"

    last = h.cp.outcome(exhausted.value.task_id)
    assert isinstance(last, Failed) and last.error_type == "ConnectionError"


async def test_unknown_task_name_is_dead_lettered_past_the_deadline(
    make: Callable[..., Any],
) -> None:
    h = await make(Router(), unknown_task_deadline=0.0)
    item = h.item("no_such_task")
    await h.give(item)
    await h.all_done(item)
    [(record, reason, _)] = h.cp.dead
    assert record == item.record
    assert reason.startswith("unknown_task: unknown task 'no_such_task'")
    assert "worker:test" in reason
    assert h.cp.events == []  # never started


async def test_unknown_task_is_put_back_in_its_lane_for_a_worker_that_knows_it(
    make: Callable[..., Any],
) -> None:
    """A rolling deploy: this worker runs an older app. The item goes back to the end of its
    lane (with the record's offset, once), carrying when it was first refused; the deadline
    counts from then, across workers and put-backs."""
    h = await make(Router(), unknown_task_deadline=60.0, unknown_task_retry=0.05)
    item = h.item("added_later", lane=2)
    before = now_us()
    await h.give(item)
    await eventually(lambda: bool(h.stage._parked), what="parked", limit=LIMIT)
    assert h.cp.finished == [] and h.cp.dead == []  # held: a crash leaves it to the next owner
    await asyncio.sleep(0.06)
    assert await h.stage.tick(h.cp) is None
    [(topic, again)] = h.cp.other
    assert topic == TOPOLOGY.lane(2) and h.cp.finished == [item.record] and h.cp.dead == []
    assert again.task_id == item.value.task_id and again.task_name == "added_later"
    assert again.unknown_since_us is not None and before <= again.unknown_since_us <= now_us()

    # Put back again, it keeps the first refusal's time; past the deadline it is dead-lettered.
    rec = Record(TOPOLOGY.lane(2), 0, next(h.offsets), item.record.key, b"")
    late = dataclasses.replace(again, unknown_since_us=again.unknown_since_us - 61_000_000)
    await h.stage.handle([Incoming(rec, late)], h.cp)
    await h.cp.until(lambda: bool(h.cp.dead), "dead-lettered")
    [(record, reason, _)] = h.cp.dead
    assert record is rec and "unknown_task" in reason and "61s" in reason


async def test_an_unknown_task_put_back_is_dropped_with_its_partition(
    make: Callable[..., Any],
) -> None:
    h = await make(Router(), unknown_task_retry=0.01)
    item = h.item("added_later")
    await h.give(item)
    await eventually(lambda: bool(h.stage._parked), what="parked", limit=LIMIT)
    await h.stage.on_revoked([item.record.tp])
    await asyncio.sleep(0.02)
    assert await h.stage.tick(h.cp) is None
    assert h.cp.other == [] and h.cp.finished == []  # the next owner gets the record again


async def test_a_second_work_item_of_an_attempt_that_ended_here_is_dropped(
    make: Callable[..., Any],
) -> None:
    router = Router()
    runs: list[int] = []

    @router.task
    async def once(n: int) -> int:
        runs.append(n)
        return n

    h = await make(router)
    first = h.item("once", 1)
    task_id = first.value.task_id
    await h.give(first)
    await h.all_done(first)
    # The same attempt routed twice (a zombie's route): its offset is done, nothing runs.
    again = h.item("once", 1, task_id=task_id)
    await h.give(again)
    await h.all_done(again)
    assert runs == [1]
    assert [e.kind for e in h.cp.of(task_id)] == ["Started", "Succeeded"]
    # The next attempt runs; and once the partition went, so did the memory of what ended
    # on it (an outcome not committed by then was dropped, and must be redone).
    retry = h.item("once", 2, task_id=task_id, attempt=2)
    await h.give(retry)
    await h.all_done(retry)
    await h.stage.on_revoked([first.record.tp])
    redone = h.item("once", 3, task_id=task_id, attempt=2)
    await h.give(redone)
    await h.all_done(redone)
    assert runs == [1, 2, 3]


async def test_user_exception_fails_the_attempt_and_the_stage_keeps_running(
    make: Callable[..., Any],
) -> None:
    router = Router()

    @router.task
    def explode(message: str) -> None:
        raise RuntimeError(message)

    @router.task
    async def fine() -> str:
        return "still here"

    h = await make(router, concurrency=1)
    bad = h.item("explode", "kaboom")
    await h.give(bad)
    await h.all_done(bad)
    failed = h.cp.outcome(bad.value.task_id)
    assert isinstance(failed, Failed)
    assert (failed.error_type, failed.message) == ("RuntimeError", "kaboom")
    assert "in explode" in failed.traceback and "RuntimeError: kaboom" in failed.traceback
    assert h.cp.dead == []

    good = h.item("fine")
    await h.give(good)
    await h.all_done(good)
    succeeded = h.cp.outcome(good.value.task_id)
    assert isinstance(succeeded, Succeeded) and succeeded.result == '"still here"'


async def test_result_that_is_not_json_fails(make: Callable[..., Any]) -> None:
    router = Router()

    @router.task
    async def returns_object() -> object:
        return object()

    h = await make(router)
    item = h.item("returns_object")
    await h.give(item)
    await h.all_done(item)
    failed = h.cp.outcome(item.value.task_id)
    assert isinstance(failed, Failed) and "not JSON-serializable" in failed.message


async def test_generator_items_become_progress_events(make: Callable[..., Any]) -> None:
    router = Router()

    @router.task
    def count(n: int) -> Any:
        yield from range(n)

    h = await make(router)
    item = h.item("count", 3)
    await h.give(item)
    await h.all_done(item)
    kinds = [e.kind for e in h.cp.of(item.value.task_id)]
    assert kinds == ["Started", "Progress", "Progress", "Progress", "Succeeded"]
    progress = [e.payload for e in h.cp.of(item.value.task_id) if e.kind == "Progress"]
    assert progress == [Progress(0, "0"), Progress(1, "1"), Progress(2, "2")]
    assert h.cp.outcome(item.value.task_id).result == "[0, 1, 2]"


async def test_control_command_cancels_a_running_attempt(make: Callable[..., Any]) -> None:
    router = Router()
    saw_cancel = asyncio.Event()

    @router.task
    async def forever() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    h = await make(router)
    item = h.item("forever")
    [task_id] = await h.give(item)
    await h.cp.until(lambda: bool(h.cp.of(task_id)), "the attempt started")
    await h.cancel(task_id, "enough")
    await h.all_done(item)
    assert h.cp.outcome(task_id) == Cancelled("enough")
    assert saw_cancel.is_set()

    # A later delivery of the same task (a redelivery) is cancelled without running.
    again = h.item("forever", task_id=task_id, attempt=2)
    await h.give(again)
    await h.all_done(again)
    assert [e.kind for e in h.cp.of(task_id)] == ["Started", "Cancelled", "Cancelled"]


async def test_the_control_listener_rides_out_failed_polls_with_one_warning(
    make: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    router = Router()

    @router.task
    async def forever() -> None:
        await asyncio.sleep(30)

    failures = 2

    def flaky(log: InMemoryEventLog) -> Consumer:
        consumer = log.consumer([TOPOLOGY.control], group_id=None)
        real_poll = consumer.poll

        async def poll(*, max_records: int, timeout: float) -> list[Record]:
            nonlocal failures
            if failures:
                failures -= 1
                raise EventLogError("the broker is restarting")
            return await real_poll(max_records=max_records, timeout=timeout)

        consumer.poll = poll  # type: ignore[method-assign]
        return consumer

    caplog.set_level(logging.WARNING)
    h = await make(router, control=flaky)
    item = h.item("forever")
    [task_id] = await h.give(item)
    await h.cancel(task_id, "enough")
    await h.all_done(item)
    assert h.cp.outcome(task_id) == Cancelled("enough")
    assert failures == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert warned[0].startswith("worker worker:test: the control topic: poll failed")


async def test_an_undecodable_control_record_is_dead_lettered_naming_where_it_is(
    make: Callable[..., Any],
) -> None:
    h = await make(Router())
    await h.log.producer().send([OutRecord(TOPOLOGY.control, b"t1", b"\x00junk")])
    await h.cp.until(lambda: bool(h.cp.dead), "the record dead-lettered")
    [(record, reason, error)] = h.cp.dead
    assert record.value == b"\x00junk"
    assert reason.startswith(f"cannot decode {TOPOLOGY.control}/0/0 as a ControlCommand: ")
    assert isinstance(error, SerdeError)


async def test_current_works_in_sync_tasks_and_sync_generators(make: Callable[..., Any]) -> None:
    router = Router()

    @router.task
    def whoami() -> str:
        ctx = current()
        ctx.progress("halfway")
        return ctx.task_id

    @router.task
    def steps(n: int) -> Any:
        for i in range(n):
            current().progress(f"step {i}")
            yield current().attempt

    h = await make(router)
    sync, gen = h.item("whoami"), h.item("steps", 2, attempt=3)
    await h.give(sync, gen)
    await h.all_done(sync, gen)
    sync_id, gen_id = sync.value.task_id, gen.value.task_id
    outcome = h.cp.outcome(sync_id)
    assert isinstance(outcome, Succeeded) and outcome.result == json.dumps(sync_id)
    assert [e.payload for e in h.cp.of(sync_id) if e.kind == "Progress"] == [
        Progress(0, '"halfway"')
    ]
    # Progress from current() and the generator's own items, in the order they were made.
    assert [e.payload.value for e in h.cp.of(gen_id) if e.kind == "Progress"] == [
        '"step 0"',
        "3",
        '"step 1"',
        "3",
    ]
    assert h.cp.outcome(gen_id).result == "[3, 3]"
