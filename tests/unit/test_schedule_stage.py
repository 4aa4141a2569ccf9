"""The schedules stage's decisions, with its clock moved by the test (no waiting for ticks):
cron in a zone across DST, catch-up and overlap policies, pause/resume/delete, restore."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.events import Submitted, TaskEvent
from qtasks_stream.records import OutRecord, Record, TopicPartition
from qtasks_stream.schedules.records import ScheduleDefinition, ScheduleEvent
from qtasks_stream.schedules.stage import ScheduleStage
from qtasks_stream.schedules.timing import check_cron, tick_task_id
from qtasks_stream.stages.base import Checkpoint, Incoming
from qtasks_stream.state import TaskState
from qtasks_stream.topology import Topology

TOPOLOGY = Topology("sched")
TP = TopicPartition(TOPOLOGY.schedules, 0)
BERLIN = ZoneInfo("Europe/Berlin")
MINUTE = 60_000_000


def us(*parts: int, tz: ZoneInfo = BERLIN) -> int:
    return int(datetime(*parts, tzinfo=tz).timestamp()) * 1_000_000  # type: ignore[misc]


class Collect(Checkpoint):
    def __init__(self) -> None:
        self.out: list[tuple[str, str, Any]] = []

    def emit(self, topic: str, key: str, value: Any, origin: Record | None = None) -> None:
        self.out.append((topic, key, value))

    def emit_raw(self, record: OutRecord, origin: Record | None = None) -> None:
        raise AssertionError("not used")

    def done(self, record: Record) -> None:
        pass

    def dead_letter(self, record: Record, reason: str, error: BaseException | None) -> None:
        raise AssertionError(reason)

    def submitted(self) -> list[TaskEvent]:
        return [v for t, _, v in self.out if t == TOPOLOGY.events]

    def ticks(self) -> list[ScheduleEvent]:
        return [v for t, _, v in self.out if t == TOPOLOGY.schedules]


class Harness:
    def __init__(self, now: int) -> None:
        self.now = now
        self.runs: dict[str, TaskState] = {}
        self.stage = ScheduleStage(TOPOLOGY, self._run_state, clock=lambda: self.now)
        self.cp = Collect()
        self.offset = 0

    async def _run_state(self, task_id: str) -> TaskState | None:
        return self.runs.get(task_id)

    async def start(self, events: list[ScheduleEvent] = ()) -> None:  # type: ignore[assignment]
        await self.stage.on_assigned([TP], {TP: len(events)})
        await self.feed(events)
        await self.stage.advanced({TP: self.offset}, self.cp)

    async def feed(self, events: list[ScheduleEvent]) -> None:
        batch = []
        for event in events:
            batch.append(Incoming(Record(TP.topic, 0, self.offset, event.key.encode(), b""), event))
            self.offset += 1
        await self.stage.handle(batch, self.cp)

    async def at(self, now: int) -> list[TaskEvent]:
        self.now = now
        before = len(self.cp.submitted())
        await self.stage.tick(self.cp)
        return self.cp.submitted()[before:]


def define(name: str = "report", since: int = 0, **changes: Any) -> ScheduleEvent:
    options: dict[str, Any] = {"cron": "0 2 * * *", "timezone": "Europe/Berlin", "overlap": "allow"}
    options.update(changes)
    definition = ScheduleDefinition(
        task="report", args="[1]", kwargs="{}", since_us=since, **options
    )
    return ScheduleEvent(name, "Created", since, "client", definition)


def tags(event: TaskEvent) -> tuple[str, ...]:
    assert isinstance(event.payload, Submitted)
    return event.payload.tags


async def test_a_daily_cron_fires_once_a_day_at_local_time_across_dst() -> None:
    start = us(2026, 3, 27, 12, 0)
    h = Harness(start)
    await h.start([define(since=start, overlap="allow")])
    fired: list[TaskEvent] = []
    # Every minute for four days, by the stage's clock: DST starts on 29 March in Berlin.
    for minute in range(0, 4 * 24 * 60, 7):
        fired += await h.at(start + minute * MINUTE)
    ticks = [next(t for t in tags(e) if t.startswith("tick:")) for e in fired]
    # 02:00 local is 01:00 UTC in winter and 00:00 UTC in summer; on 29 March 02:00 does not
    # exist and cron (Debian semantics) runs the job at 03:00 local, 01:00 UTC.
    assert ticks == [
        "tick:2026-03-28T01:00:00Z",
        "tick:2026-03-29T01:00:00Z",
        "tick:2026-03-30T00:00:00Z",
        "tick:2026-03-31T00:00:00Z",
    ]
    assert [e.task_id for e in fired] == [
        tick_task_id(TOPOLOGY.base, "report", us(2026, 3, 28, 2, 0)),
        tick_task_id(TOPOLOGY.base, "report", us(2026, 3, 29, 3, 0)),
        tick_task_id(TOPOLOGY.base, "report", us(2026, 3, 30, 2, 0)),
        tick_task_id(TOPOLOGY.base, "report", us(2026, 3, 31, 2, 0)),
    ]
    assert all("schedule:report" in tags(e) for e in fired)
    assert {e.task_name for e in fired} == {"report"}


async def test_a_restored_stage_does_not_fire_a_decided_tick_again() -> None:
    start = us(2026, 1, 1, 1, 0)
    first = Harness(start)
    created = define(since=start, cron="*/5 * * * *", overlap="allow")
    await first.start([created])
    fired = await first.at(start + 11 * MINUTE)
    assert len(fired) == 1  # 01:10 (01:05 was missed and catch-up "one" runs the latest)
    # A new owner restores the topic (the definition and the Ticked record) and goes on.
    second = Harness(start + 11 * MINUTE)
    await second.start([created, *first.cp.ticks()])
    assert await second.at(start + 14 * MINUTE) == []
    again = await second.at(start + 15 * MINUTE)
    assert [tags(e)[1] for e in again] == ["tick:2026-01-01T00:15:00Z"]


@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [
        ("skip", []),
        ("one", ["tick:2026-01-01T00:10:00Z"]),
        (
            "all",
            ["tick:2026-01-01T00:08:00Z", "tick:2026-01-01T00:09:00Z", "tick:2026-01-01T00:10:00Z"],
        ),
    ],
)
async def test_catch_up_after_downtime(catch_up: str, expected: list[str]) -> None:
    start = us(2026, 1, 1, 1, 0)
    h = Harness(start)
    await h.start(
        [define(since=start, cron="* * * * *", catch_up=catch_up, catch_up_limit=3, grace_us=10**7)]
    )
    # Down for ten and a half minutes: ten ticks passed, the latest 30 s ago (grace: 10 s).
    fired = await h.at(start + 10 * MINUTE + 30_000_000)
    assert [tags(e)[1] for e in fired] == expected
    # Every tick up to now is decided either way: nothing more fires until the next one.
    assert h.cp.ticks()[-1].tick is not None
    assert h.cp.ticks()[-1].tick.tick_us == start + 10 * MINUTE
    assert await h.at(start + 10 * MINUTE + 50_000_000) == []
    assert len(await h.at(start + 11 * MINUTE)) == 1


async def test_a_tick_handled_within_the_grace_is_not_missed() -> None:
    start = us(2026, 1, 1, 1, 0)
    h = Harness(start)
    await h.start([define(since=start, cron="* * * * *", catch_up="skip")])
    assert len(await h.at(start + MINUTE + 59_000_000)) == 1


@pytest.mark.parametrize("overlap", ["skip", "allow"])
async def test_overlap_policy(overlap: str) -> None:
    start = us(2026, 1, 1, 1, 0)
    h = Harness(start)
    await h.start([define(since=start, cron="* * * * *", overlap=overlap)])
    (first,) = await h.at(start + MINUTE)
    # Not in the log yet (its transaction is open): still it is running, not ended.
    second = await h.at(start + 2 * MINUTE)
    h.runs[first.task_id] = TaskState(first.task_id, "report", status="running")
    third = await h.at(start + 3 * MINUTE)
    if overlap == "skip":
        assert (second, third) == ([], [])
        assert [t.tick.outcome for t in h.cp.ticks() if t.tick] == ["fired", "overlap", "overlap"]
    else:
        assert (len(second), len(third)) == (1, 1)
    h.runs[first.task_id] = TaskState(first.task_id, "report", status="success")
    if overlap == "skip":
        assert len(await h.at(start + 4 * MINUTE)) == 1
        # A run whose events the log no longer holds (retention) ended long ago.
        fresh = Harness(start + 4 * MINUTE)
        await fresh.start([define(since=start, cron="* * * * *"), *h.cp.ticks()])
        assert len(await fresh.at(start + 5 * MINUTE)) == 1


async def test_pause_resume_and_delete() -> None:
    start = us(2026, 1, 1, 1, 0)
    h = Harness(start)
    created = define(since=start, cron="* * * * *", overlap="allow")
    await h.start([created])
    assert len(await h.at(start + MINUTE)) == 1
    assert created.definition is not None
    paused = created.definition.__class__(**{**_fields(created.definition), "paused": True})
    await h.feed([ScheduleEvent("report", "Paused", start, "client", paused)])
    assert await h.at(start + 5 * MINUTE) == []
    resumed_at = start + 5 * MINUTE + 1
    resumed = paused.__class__(**{**_fields(paused), "paused": False, "since_us": resumed_at})
    await h.feed([ScheduleEvent("report", "Resumed", resumed_at, "client", resumed)])
    # The ticks that passed while paused are not caught up; the next one runs.
    assert await h.at(start + 5 * MINUTE + 30_000_000) == []
    assert len(await h.at(start + 6 * MINUTE)) == 1
    await h.feed([ScheduleEvent("report", "Deleted", start, "client")])
    assert await h.at(start + 60 * MINUTE) == []


def _fields(definition: ScheduleDefinition) -> dict[str, Any]:
    return {name: getattr(definition, name) for name in definition.__slots__}


def test_a_bad_cron_or_zone_is_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match="bad cron expression '0 2 \\* \\*'"):
        check_cron("0 2 * *", "UTC")
    with pytest.raises(ConfigurationError, match="unknown time zone 'Mars/Base'"):
        check_cron("0 2 * * *", "Mars/Base")


def test_the_run_id_derives_from_schedule_and_tick_and_names_its_time() -> None:
    from qtasks_stream.events import task_id_ms

    a = tick_task_id("qtasks.app", "nightly", 1_800_000_000_000_000)
    assert a == tick_task_id("qtasks.app", "nightly", 1_800_000_000_000_000)
    assert a != tick_task_id("qtasks.app", "nightly", 1_800_000_060_000_000)
    assert a != tick_task_id("qtasks.app", "hourly", 1_800_000_000_000_000)
    assert task_id_ms(a) == 1_800_000_000_000


async def test_when_clocks_go_back_an_hourly_cron_runs_both_two_oclocks_a_daily_one_once() -> None:
    start = us(2026, 10, 24, 23, 30)
    hourly, daily = Harness(start), Harness(start)
    await hourly.start([define(since=start, cron="0 * * * *")])
    await daily.start([define(since=start, cron="30 2 * * *")])
    fired: dict[str, list[str]] = {"hourly": [], "daily": []}
    for minute in range(0, 6 * 60, 5):
        now = start + minute * MINUTE
        fired["hourly"] += [tags(e)[1] for e in await hourly.at(now)]
        fired["daily"] += [tags(e)[1] for e in await daily.at(now)]
    # 02:00 local happens twice on 25 October in Berlin: at 00:00 and at 01:00 UTC.
    assert fired["hourly"] == [f"tick:2026-10-24T2{h}:00:00Z" for h in (2, 3)] + [
        f"tick:2026-10-25T0{h}:00:00Z" for h in range(4)
    ]
    assert fired["daily"] == ["tick:2026-10-25T00:30:00Z"]
