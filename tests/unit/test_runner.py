"""StageRunner on a real InMemoryEventLog, with a stage that only records what it is given."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.memory import InMemoryEventLog, _MemoryProducer
from qtasks_stream.events import KIND_HEADER, ControlCommand, Progress, TaskEvent, now_us
from qtasks_stream.records import Headers, OutRecord, Record, TopicPartition
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.stages import runner as runner_module
from qtasks_stream.stages.base import Checkpoint, Incoming, Stage
from qtasks_stream.stages.runner import DLQ_ERROR, DLQ_REASON, DLQ_SOURCE, DLQ_STAGE, StageRunner
from qtasks_stream.topology import Topology

TOPOLOGY = Topology("runner", partitions=1, lanes=1)
TP = TopicPartition(TOPOLOGY.events, 0)
LIMIT = 5.0


class RecordingStage(Stage):
    name = "recorder"

    def __init__(self, *, done_on_return: bool = True) -> None:
        self.done_on_return = done_on_return
        self.seen: list[Incoming] = []
        self.batches = 0

    @property
    def topics(self) -> Sequence[str]:
        return [TOPOLOGY.events]

    async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
        self.batches += 1
        self.seen.extend(batch)


@dataclass
class Harness:
    log: InMemoryEventLog
    serde: AvroSerde
    stage: RecordingStage
    runner: StageRunner

    async def send(self, *records: OutRecord) -> None:
        producer = self.log.producer()
        await producer.send(list(records))

    def event(self, task_id: str, seq: int, headers: Headers = ()) -> OutRecord:
        event = TaskEvent.new(task_id, "job", 1, "test", Progress(seq, str(seq)))
        value = self.serde.encode(TOPOLOGY.events, event.to_avro())
        return OutRecord(TOPOLOGY.events, task_id.encode(), value, headers)

    def committed(self) -> int | None:
        return self.log.committed(self.runner.group).get(TP)

    async def until(self, what: Callable[[], bool], message: str) -> None:
        try:
            async with asyncio.timeout(LIMIT):
                while True:
                    if what():
                        return
                    await asyncio.sleep(0.005)
        except TimeoutError:
            raise AssertionError(f"not within {LIMIT}s: {message}") from None

    async def committed_pass(self) -> None:
        """Wait until the runner has committed everything the checkpoint holds."""
        await self.until(lambda: not self.runner.checkpoint.dirty, "the runner committed")


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    running: list[tuple[StageRunner, asyncio.Task[None]]] = []

    async def build(stage: RecordingStage) -> Harness:
        log = InMemoryEventLog()
        await log.create_topics(TOPOLOGY.specs())
        registry = SchemaRegistryClient.new_client({"url": f"mock://runner-{uuid.uuid4().hex}"})
        serde = AvroSerde(registry, TOPOLOGY.topic_schemas())
        await serde.start()
        runner = StageRunner(
            stage,
            event_log=log,
            serde=serde,
            topology=TOPOLOGY,
            instance_id="unit",
            poll_timeout=0.05,
        )
        running.append((runner, asyncio.create_task(runner.run())))
        return Harness(log, serde, stage, runner)

    yield build
    for runner, task in running:
        runner.request_stop()
        async with asyncio.timeout(LIMIT):
            await task


def _split(headers: Headers, original: Headers) -> dict[str, bytes]:
    assert headers[: len(original)] == original, "the original headers come first, unchanged"
    return dict(headers[len(original) :])


async def test_undecodable_records_go_to_the_dead_letter_topic(make: Callable[..., Any]) -> None:
    h = await make(RecordingStage())
    garbage_headers: Headers = (("origin", b"test"), ("origin", b"again"))
    tombstone_headers: Headers = (("why", b"compaction"),)
    await h.send(
        h.event("first", 0, (("traceparent", b"00-aa-bb-01"),)),
        # A Confluent header (magic 0, schema id 1) followed by bytes that are not the body.
        OutRecord(
            TOPOLOGY.events, b"garbage-key", b"\x00\x00\x00\x00\x01\xff\xfe!", garbage_headers
        ),
        OutRecord(TOPOLOGY.events, b"tombstone-key", None, tombstone_headers),
        h.event("second", 1),
    )
    await h.until(lambda: len(h.stage.seen) == 2 and h.committed() == 4, "4 records handled")

    assert [i.value.task_id for i in h.stage.seen] == ["first", "second"]
    assert all(isinstance(i.value, TaskEvent) for i in h.stage.seen)
    assert h.stage.seen[0].record.headers == (("traceparent", b"00-aa-bb-01"),)

    garbage, tombstone = h.log.records(TOPOLOGY.deadletter)
    assert (garbage.key, garbage.value) == (b"garbage-key", b"\x00\x00\x00\x00\x01\xff\xfe!")
    extra = _split(garbage.headers, garbage_headers)
    assert extra[DLQ_REASON].startswith(b"cannot decode")
    assert extra[DLQ_STAGE] == b"recorder"
    assert extra[DLQ_SOURCE] == f"{TOPOLOGY.events}/0/1".encode()
    assert extra[DLQ_ERROR] == b"SerdeError"

    assert (tombstone.key, tombstone.value) == (b"tombstone-key", None)
    extra = _split(tombstone.headers, tombstone_headers)
    assert b"tombstone" in extra[DLQ_REASON]
    assert extra[DLQ_STAGE] == b"recorder"
    assert extra[DLQ_SOURCE] == f"{TOPOLOGY.events}/0/2".encode()

    # The stage keeps going after its dead letters.
    await h.send(h.event("third", 2))
    await h.until(lambda: len(h.stage.seen) == 3 and h.committed() == 5, "a later record")
    assert h.stage.seen[-1].value.task_id == "third"
    assert len(h.log.records(TOPOLOGY.deadletter)) == 2


async def test_the_kind_header_is_a_hint_the_payload_overrules(make: Callable[..., Any]) -> None:
    h = await make(RecordingStage())
    await h.send(
        h.event("told", 0, ((KIND_HEADER, b"Progress"),)),
        h.event("untold", 1),
        # A producer whose header lies: the stage still gets the event the bytes hold.
        h.event("lied", 2, ((KIND_HEADER, b"Started"),)),
        h.event("nonsense", 3, ((KIND_HEADER, b"\xff"),)),
    )
    await h.until(lambda: h.committed() == 4, "4 records handled")
    assert [i.value.task_id for i in h.stage.seen] == ["told", "untold", "lied", "nonsense"]
    assert [i.value.payload for i in h.stage.seen] == [Progress(seq, str(seq)) for seq in range(4)]
    assert h.log.records(TOPOLOGY.deadletter) == []


async def test_a_batch_of_only_garbage_is_committed(make: Callable[..., Any]) -> None:
    h = await make(RecordingStage())
    await h.send(*(OutRecord(TOPOLOGY.events, b"k", b"not avro at all") for _ in range(3)))
    await h.until(lambda: h.committed() == 3, "garbage committed")
    assert h.stage.seen == []
    sources = [dict(r.headers)[DLQ_SOURCE] for r in h.log.records(TOPOLOGY.deadletter)]
    assert sources == [f"{TOPOLOGY.events}/0/{i}".encode() for i in range(3)]


async def test_offsets_commit_only_up_to_the_first_unfinished_record(
    make: Callable[..., Any],
) -> None:
    h = await make(RecordingStage(done_on_return=False))
    await h.send(*(h.event(f"t{i}", i) for i in range(5)))
    await h.until(lambda: len(h.stage.seen) == 5, "5 records handed over")
    await h.committed_pass()
    assert h.committed() is None
    records: list[Record] = [i.record for i in h.stage.seen]
    checkpoint = h.runner.checkpoint

    # Later records finishing first never let an earlier, unfinished one be skipped.
    for offset, expected in [(2, None), (4, None), (0, 1), (1, 3), (3, 5)]:
        checkpoint.done(records[offset])
        await h.committed_pass()
        assert h.committed() == expected, f"after offset {offset} finished"


async def test_outputs_are_produced_in_emission_order(make: Callable[..., Any]) -> None:
    class Forwarding(RecordingStage):
        async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
            await super().handle(batch, checkpoint)
            for item in batch:
                for n in range(2):
                    command = ControlCommand(item.value.task_id, f"reason {n}", now_us())
                    checkpoint.emit(TOPOLOGY.control, command.task_id, command, item.record)

    h = await make(Forwarding())
    await h.send(*(h.event(f"t{i}", i) for i in range(3)))
    await h.until(lambda: h.committed() == 3, "3 records handled")
    commands = [
        ControlCommand.from_avro(h.serde.decode(TOPOLOGY.control, r.value or b""))
        for r in h.log.records(TOPOLOGY.control)
    ]
    assert [(c.task_id, c.reason) for c in commands] == [
        (f"t{i}", f"reason {n}") for i in range(3) for n in range(2)
    ]


def test_late_results_of_a_revoked_assignment_reach_neither_outputs_nor_offsets() -> None:
    serde = AvroSerde(SchemaRegistryClient.new_client({"url": "mock://late"}), {})
    runner = StageRunner(
        RecordingStage(done_on_return=False),
        event_log=InMemoryEventLog(),
        serde=serde,
        topology=TOPOLOGY,
        instance_id="late",
    )
    cp = runner.checkpoint
    first = Record(TP.topic, 0, 7, b"k", b"v")
    cp.own([TP])
    assert cp.handed([first]) == [first]
    # The partition is revoked while `first` is still being worked on, then comes back.
    cp.drop([TP])
    cp.own([TP])
    again = Record(TP.topic, 0, 7, b"k", b"v")  # redelivered: same offset, a new record
    assert cp.handed([again]) == [again]
    late = OutRecord(TOPOLOGY.deadletter, b"k", b"late")
    cp.emit_raw(late, first)
    cp.done(first)
    assert not cp.dirty, "the old attempt's output or offset leaked into the new assignment"
    fresh = OutRecord(TOPOLOGY.deadletter, b"k", b"fresh")
    cp.emit_raw(fresh, again)
    cp.done(again)
    assert cp.dirty
    assert [o[0] for o in cp._outputs] == [fresh]
    assert cp._offsets[TP].advance() == 8
    # A record of a partition not owned at all is not handed to the stage.
    stray = Record(TP.topic, 1, 0, b"k", b"v")
    assert cp.handed([stray]) == []


class _CapturingProducer:
    def __init__(self) -> None:
        self.transactions: list[tuple[list[OutRecord], dict[TopicPartition, int]]] = []

    async def commit_transaction(
        self, records: Sequence[OutRecord], offsets: Any, consumer: Any
    ) -> None:
        self.transactions.append((list(records), dict(offsets)))


async def test_an_outcome_waits_until_its_input_offset_can_be_committed_with_it() -> None:
    serde = AvroSerde(SchemaRegistryClient.new_client({"url": "mock://hold"}), {})
    runner = StageRunner(
        RecordingStage(done_on_return=False),
        event_log=InMemoryEventLog(),
        serde=serde,
        topology=TOPOLOGY,
        instance_id="hold",
    )
    cp = runner.checkpoint
    producer = _CapturingProducer()
    slow, fast = Record(TP.topic, 0, 0, b"a", b"v"), Record(TP.topic, 0, 1, b"b", b"v")
    cp.own([TP])
    cp.handed([slow, fast])
    started = OutRecord(TOPOLOGY.events, b"a", b"started")
    cp.emit_raw(started)  # not tied to an input: goes at once
    outcome = OutRecord(TOPOLOGY.events, b"b", b"outcome-of-fast")
    cp.emit_raw(outcome, fast)
    cp.done(fast)
    await cp.commit(producer, None)  # type: ignore[arg-type]
    # `slow` (offset 0) is still running: committing fast's outcome now, without an offset,
    # would let a successor redo `fast` after a crash and write its outcome twice.
    assert producer.transactions == [([started], {})]
    cp.emit_raw(OutRecord(TOPOLOGY.events, b"a", b"outcome-of-slow"), slow)
    cp.done(slow)
    await cp.commit(producer, None)  # type: ignore[arg-type]
    last_records, last_offsets = producer.transactions[-1]
    assert [r.value for r in last_records] == [b"outcome-of-fast", b"outcome-of-slow"]
    assert last_offsets == {TP: 2}


class _TimerStage(RecordingStage):
    """Emits one output tied to no input (as a timer does) once ``fire`` is set; fetches
    nothing while ``stall`` is set (its consumer silent, as in a long pause)."""

    def __init__(self, stall: asyncio.Event, fire: asyncio.Event) -> None:
        super().__init__()
        self._stall, self._fire = stall, fire
        self.fired = False

    def capacity(self) -> int:
        return 0 if self._stall.is_set() else super().capacity()

    async def tick(self, checkpoint: Checkpoint) -> float | None:
        if self._fire.is_set() and not self.fired:
            self.fired = True
            checkpoint.emit_raw(OutRecord(TOPOLOGY.deadletter, b"t", b"from-the-zombie"))
        return 0.01


async def test_a_zombie_cannot_commit_outputs_tied_to_no_input() -> None:
    log = InMemoryEventLog(session_timeout=0.3)
    await log.create_topics(TOPOLOGY.specs())
    registry = SchemaRegistryClient.new_client({"url": f"mock://zombie-{uuid.uuid4().hex}"})
    serde = AvroSerde(registry, TOPOLOGY.topic_schemas())
    await serde.start()
    stall, fire = asyncio.Event(), asyncio.Event()
    zombie_stage = _TimerStage(stall, fire)
    runners = [
        StageRunner(
            stage,
            event_log=log,
            serde=serde,
            topology=TOPOLOGY,
            instance_id=name,
            poll_timeout=0.05,
        )
        for stage, name in ((zombie_stage, "a"), (RecordingStage(), "b"))
    ]
    zombie, successor = runners
    harness = Harness(log, serde, zombie_stage, zombie)
    tasks = [asyncio.create_task(zombie.run())]
    try:
        await harness.send(harness.event("t1", 0))
        await harness.until(lambda: harness.committed() == 1, "the first record committed")
        stall.set()
        await asyncio.sleep(0.2)  # its last poll ends; it polls no more
        tasks.append(asyncio.create_task(successor.run()))
        # The silent member is dropped from the group; the successor owns the partition.
        await harness.until(
            lambda: successor.checkpoint.owned() == [TP], "the successor owns the partition"
        )
        fire.set()  # the zombie, still holding the partition as far as it knows, emits
        await harness.until(lambda: zombie_stage.fired, "the zombie emitted")
        await harness.until(lambda: not zombie.checkpoint._outputs, "the zombie's output went")
        await asyncio.sleep(0.1)
    finally:
        for runner in runners:
            runner.request_stop()
        stall.clear()
        async with asyncio.timeout(LIMIT):
            await asyncio.gather(*tasks)
        await serde.close()
    # Its transaction carried the partition's offset as it stood, which the log refuses
    # from a member of an old generation: the output was never written.
    assert [r.value for r in log.records(TOPOLOGY.deadletter)] == []


class _OutputOnOut(RecordingStage):
    """Emits a control command for each record keyed ``out...``; nothing for the others."""

    async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
        await super().handle(batch, checkpoint)
        for item in batch:
            if (item.record.key or b"").startswith(b"out"):
                command = ControlCommand("t", "r", now_us())
                checkpoint.emit(TOPOLOGY.control, "t", command, item.record)


async def test_offsets_alone_wait_to_commit_with_the_next_output(
    make: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing waits for offsets alone: they go with the next output (or the next interval,
    # here never), not in a transaction of their own beside the ones a task waits for.
    monkeypatch.setattr(runner_module, "OFFSETS_ONLY_EVERY_S", 3600.0)
    transactions: list[tuple[int, dict[TopicPartition, int]]] = []
    real = _MemoryProducer.commit_transaction

    async def counting(
        self: _MemoryProducer, records: Sequence[OutRecord], offsets: Any, consumer: Any
    ) -> None:
        transactions.append((len(records), dict(offsets)))
        await real(self, records, offsets, consumer)

    monkeypatch.setattr(_MemoryProducer, "commit_transaction", counting)
    h = await make(_OutputOnOut())
    await h.send(h.event("quiet", 0))
    await h.until(lambda: len(h.stage.seen) == 1, "the first record handled")
    await h.send(h.event("out", 1))
    await h.until(lambda: h.committed() == 2, "both offsets committed")
    assert transactions == [(1, {TP: 2})]


class _UndeclaredPausingStage(RecordingStage):
    """Pauses its topic but does not set ``pauses``: its consumer has the long fetch wait."""

    def paused_topics(self) -> Sequence[str]:
        return [TOPOLOGY.events]


async def test_a_stage_that_pauses_without_saying_so_is_refused(
    make: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    h: Harness = await make(_UndeclaredPausingStage())

    def refused() -> bool:
        return any(
            r.exc_info is not None
            and isinstance(r.exc_info[1], ConfigurationError)
            and "does not set Stage.pauses" in str(r.exc_info[1])
            for r in caplog.records
        )

    with caplog.at_level(logging.ERROR, logger="qtasks_stream.runner"):
        await h.until(refused, "the runner refused the stage")
