"""An owner of the schedules stage that stalls while another takes over (a zombie) cannot
commit the tick the new owner fired: its transaction carries a consumed offset, which the
event log takes only from a member of the group's current generation."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import Submitted, TaskEvent, as_record
from qtasks_stream.schedules.records import ScheduleDefinition, ScheduleEvent
from qtasks_stream.schedules.stage import ScheduleStage
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.stages.base import Checkpoint
from qtasks_stream.stages.runner import StageRunner
from qtasks_stream.state import TaskState
from qtasks_stream.topology import Topology

TOPOLOGY = Topology("zombie", partitions=1)
SINCE = 1_800_000_000_000_000
#: The stages' clock (µs): first one tick (SINCE + 1 s) is due, later the next one.
NOW = [SINCE + 1_500_000]
LIMIT = 10.0


async def no_run(task_id: str) -> TaskState | None:
    return None


class StallingStage(ScheduleStage):
    """Once ``arm`` is set, stops fetching, lets its last poll end, and stalls in its next
    tick (its consumer idle, as in a long pause) until ``resume``; then it fires what it
    would have fired."""

    def __init__(self, arm: asyncio.Event, stalled: asyncio.Event, resume: asyncio.Event) -> None:
        super().__init__(TOPOLOGY, no_run, clock=lambda: NOW[0])
        self._arm, self._stalled, self._resume = arm, stalled, resume
        self._idle_turns = 0

    def capacity(self) -> int:
        return 0 if self._arm.is_set() and not self._resume.is_set() else super().capacity()

    async def tick(self, checkpoint: Checkpoint) -> float | None:
        if self._arm.is_set() and not self._stalled.is_set():
            self._idle_turns += 1
            if self._idle_turns < 10:  # a poll still running ends within its timeout
                return 0.01
            self._stalled.set()
            await self._resume.wait()
        return await super().tick(checkpoint)


async def until(check: object, what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {LIMIT}s: {what}"
        await asyncio.sleep(0.02)


async def test_a_stalled_owner_cannot_commit_the_tick_its_successor_fired() -> None:
    log = InMemoryEventLog(session_timeout=0.3)
    await log.create_topics(TOPOLOGY.specs())
    with SchemaRegistryClient.new_client({"url": f"mock://z-{uuid.uuid4().hex}"}) as registry:
        serde = AvroSerde(registry, TOPOLOGY.topic_schemas())
        await serde.start()
        definition = ScheduleDefinition(
            task="beat",
            args="[]",
            kwargs="{}",
            since_us=SINCE,
            every_us=1_000_000,
            overlap="allow",
        )
        created = ScheduleEvent("beat", "Created", SINCE, "client", definition)
        producer = log.producer()
        await producer.start()
        await producer.send([as_record(serde, TOPOLOGY.schedules, created.key, created)])
        await producer.close()

        def runner(stage: ScheduleStage, name: str) -> StageRunner:
            return StageRunner(
                stage,
                event_log=log,
                serde=serde,
                topology=TOPOLOGY,
                instance_id=name,
                poll_timeout=0.05,
            )

        arm, stalled, resume = asyncio.Event(), asyncio.Event(), asyncio.Event()
        zombie_stage = StallingStage(arm, stalled, resume)
        zombie = runner(zombie_stage, "a")
        successor_stage = ScheduleStage(TOPOLOGY, no_run, clock=lambda: NOW[0])
        successor = runner(successor_stage, "b")
        tasks = [asyncio.create_task(zombie.run())]
        try:
            await until(lambda: zombie_stage.fired == 1, "the first tick fired")
            await until(lambda: not zombie.checkpoint.dirty, "the first tick committed")
            await asyncio.sleep(0.3)  # its Ticked record read back and committed too
            arm.set()
            NOW[0] += 1_000_000  # the second tick is due
            await until(stalled.is_set, "the owner stalled, its consumer idle")
            tasks.append(asyncio.create_task(successor.run()))
            # The stalled owner is dropped from the group; the successor fires the tick.
            await until(lambda: successor_stage.fired == 1, "the successor fired")
            await until(lambda: not successor.checkpoint.dirty, "the successor committed")
            resume.set()  # the zombie wakes up and fires the same tick
            await until(lambda: zombie_stage.fired == 2, "the zombie fired")
            await until(lambda: not zombie.checkpoint._outputs, "the zombie's outputs went")
            await asyncio.sleep(0.3)  # a commit of the zombie would be visible by now
        finally:
            resume.set()
            for r in (zombie, successor):
                r.request_stop()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), LIMIT)
        submitted = [
            TaskEvent.from_avro(serde.decode(TOPOLOGY.events, rec.value or b""))
            for rec in log.records(TOPOLOGY.events)
        ]
        await serde.close()
    ids = Counter(e.task_id for e in submitted if isinstance(e.payload, Submitted))
    # Two ticks, each submitted once: the zombie's second Submitted was fenced.
    assert sorted(ids.values()) == [1, 1], ids
