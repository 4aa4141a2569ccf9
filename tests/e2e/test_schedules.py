"""Schedules on the embedded default: two runtime apps on one log fire every tick once; the
schedule API (idempotent declare, change, pause, resume, delete, list); runs found by tag."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.errors import ConfigurationError, UnknownTaskError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import Submitted, Succeeded, TaskEvent
from qtasks_stream.schedules.records import ScheduleEvent
from qtasks_stream.schedules.stage import ScheduleStage
from qtasks_stream.schedules.timing import tick_task_id
from tests.e2ehelpers import decodable_events, eventually

SECOND = 1_000_000


def beat_app(make_app: Callable[..., QueueTasks], name: str, **options: object) -> QueueTasks:
    app = make_app(name, poll_timeout=0.05, **options)

    @app.task(name="beat")
    async def beat(n: int = 0) -> int:
        return n

    return app


def schedule_events(app: QueueTasks, log: InMemoryEventLog) -> list[ScheduleEvent]:
    topic = app.topology.schedules
    return [
        ScheduleEvent.from_avro(app.serde.decode(topic, rec.value))
        for rec in log.records(topic)
        if rec.value is not None
    ]


def runs(app: QueueTasks, log: InMemoryEventLog, name: str) -> list[TaskEvent]:
    """Every Submitted of schedule ``name`` in the events topic, duplicates included."""
    return [
        e
        for e in decodable_events(app, log.records(app.topology.events))
        if isinstance(e.payload, Submitted) and f"schedule:{name}" in e.payload.tags
    ]


def _stage(app: QueueTasks) -> ScheduleStage:
    stage = app.runners["schedules"].stage
    assert isinstance(stage, ScheduleStage)
    return stage


def tick_of(event: TaskEvent) -> int:
    assert isinstance(event.payload, Submitted)
    tag = next(t for t in event.payload.tags if t.startswith("tick:"))
    return int(datetime.fromisoformat(tag[5:].replace("Z", "+00:00")).timestamp()) * SECOND


async def test_two_apps_on_one_log_fire_every_tick_once(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    with SchemaRegistryClient.new_client({"url": f"mock://sched-{uuid.uuid4().hex}"}) as registry:
        apps = [
            beat_app(make_app, "twice", event_log=log, schema_registry=registry) for _ in range(2)
        ]
        for app in apps:
            await app.start()
        first = apps[0]
        await first.schedule(
            "beat",
            task="beat",
            every=timedelta(seconds=1),
            args=[1],
            catch_up="all",
            overlap="allow",
        )
        await eventually(
            lambda: runs(first, log, "beat"), lambda r: len(r) >= 3, what="3 ticks", limit=15
        )
        # The owner of the schedules partition goes away; the other takes over and goes on.
        owner = next(a for a in apps if _stage(a).fired)
        survivor = apps[1] if owner is apps[0] else apps[0]
        fired_before = len(runs(first, log, "beat"))
        await owner.close()
        await eventually(
            lambda: runs(survivor, log, "beat"),
            lambda r: len(r) >= fired_before + 3,
            what="3 more ticks after the owner left",
            limit=15,
        )
        assert _stage(survivor).fired > 0
        submitted = runs(survivor, log, "beat")
        ids = collections.Counter(e.task_id for e in submitted)
        assert max(ids.values()) == 1, f"a tick submitted twice: {ids.most_common(2)}"
        ticks = sorted(tick_of(e) for e in submitted)
        # No tick lost in the hand-over: consecutive seconds from the first to the last.
        assert ticks == list(range(ticks[0], ticks[-1] + SECOND, SECOND))
        assert all(
            e.task_id == tick_task_id(survivor.topology.base, "beat", tick_of(e)) for e in submitted
        )
        # Every run ran once, and the view finds the runs of the schedule by its tag.
        await eventually(
            lambda: survivor.query(tag="schedule:beat", status="success"),
            lambda tasks: set(ids) <= {t.uuid for t in tasks},
            what="every run succeeded",
            limit=10,
        )
        outcomes = collections.Counter(
            e.task_id
            for e in decodable_events(survivor, log.records(survivor.topology.events))
            if isinstance(e.payload, Succeeded)
        )
        assert set(outcomes) >= set(ids) and max(outcomes.values()) == 1


async def test_the_schedule_api(make_app: Callable[..., QueueTasks]) -> None:
    log = InMemoryEventLog()
    app = beat_app(make_app, "api", event_log=log)
    created = await app.schedule("nightly", task="beat", cron="0 2 * * *", tz="Europe/Berlin")
    assert created.definition is not None and created.definition.timezone == "Europe/Berlin"
    # Declared again unchanged (every process does at start): nothing written.
    await app.schedule("nightly", task="beat", cron="0 2 * * *", tz="Europe/Berlin")
    changed = await app.schedule(
        "nightly", task="beat", cron="0 2 * * *", tz="Europe/Berlin", args=[5]
    )
    # New arguments: ticks count from the same time (a missed one is still caught up).
    assert changed.definition is not None and not changed.definition.same_plan(created.definition)
    assert changed.definition.since_us == created.definition.since_us
    # A new timing counts from now: its ticks before the change were never this schedule's.
    changed = await app.schedule("nightly", task="beat", cron="0 3 * * *", tz="Europe/Berlin")
    assert changed.definition is not None and changed.definition.cron == "0 3 * * *"
    assert changed.definition.since_us > created.definition.since_us
    paused = await app.schedules.pause("nightly")
    assert paused.definition is not None and paused.definition.paused
    # A change while paused keeps it paused.
    await app.schedule("nightly", task="beat", cron="0 4 * * *", tz="Europe/Berlin")
    [listed] = await app.schedules.all()
    assert listed.definition is not None and listed.definition.paused
    assert listed.definition.cron == "0 4 * * *"
    resumed = await app.schedules.resume("nightly")
    assert resumed.definition is not None and not resumed.definition.paused
    assert resumed.definition.since_us > created.definition.since_us
    await app.schedule("hourly", task="beat", every=timedelta(hours=1))
    await app.schedules.delete("nightly")
    assert [s.name for s in await app.schedules.all()] == ["hourly"]
    assert await app.schedules.get("nightly") is None
    kinds = [(e.name, e.kind) for e in schedule_events(app, log)]
    assert kinds == [
        ("nightly", "Created"),
        ("nightly", "Changed"),
        ("nightly", "Changed"),
        ("nightly", "Paused"),
        ("nightly", "Changed"),
        ("nightly", "Resumed"),
        ("hourly", "Created"),
        ("nightly", "Deleted"),
    ]
    # Re-created after a delete: Created again.
    await app.schedule("nightly", task="beat", cron="0 2 * * *")
    assert schedule_events(app, log)[-1].kind == "Created"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cron": "0 2 * *"}, "bad cron expression"),
        ({"cron": "0 2 * * *", "tz": "Mars/Base"}, "unknown time zone"),
        ({"cron": "0 2 * * *", "every": timedelta(seconds=5)}, "exactly one"),
        ({}, "exactly one"),
        ({"every": timedelta(milliseconds=500)}, "at least one second"),
        ({"every": timedelta(seconds=1), "catch_up": "most"}, "catch_up must be one of"),
        ({"every": timedelta(seconds=1), "overlap": "queue"}, "overlap must be one of"),
        ({"every": timedelta(seconds=1), "catch_up_limit": 0}, "catch_up_limit"),
    ],
)
async def test_a_bad_definition_is_refused_by_name(
    make_app: Callable[..., QueueTasks], options: dict[str, object], message: str
) -> None:
    app = beat_app(make_app, "bad")
    with pytest.raises(ConfigurationError, match=message):
        await app.schedule("x", task="beat", **options)


async def test_unknown_task_and_schedule_are_refused(make_app: Callable[..., QueueTasks]) -> None:
    app = beat_app(make_app, "unknown")
    with pytest.raises(UnknownTaskError, match="no task named 'nope'"):
        await app.schedule("x", task="nope", every=timedelta(seconds=1))
    with pytest.raises(ConfigurationError, match="no schedule named 'ghost'"):
        await app.schedules.pause("ghost")
    with pytest.raises(ConfigurationError, match="schedule name 'a b'"):
        await app.schedules.delete("a b")


async def test_a_paused_schedule_fires_nothing_until_resumed(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    app = beat_app(make_app, "pause", event_log=log)
    await app.start()
    await app.schedule("beat", task="beat", every=timedelta(seconds=1), args=[2])
    await eventually(lambda: runs(app, log, "beat"), what="a first tick", limit=10)
    await app.schedules.pause("beat")
    stage = _stage(app)

    def paused() -> bool:
        definition = stage.schedules()["beat"].definition
        return definition is not None and definition.paused

    await eventually(paused, what="the stage read the pause", limit=10)
    before = len(runs(app, log, "beat"))
    await asyncio.sleep(2.5)  # two and a half ticks of an active schedule
    assert len(runs(app, log, "beat")) == before
    await app.schedules.resume("beat")
    await eventually(
        lambda: runs(app, log, "beat"), lambda r: len(r) > before, what="a tick", limit=10
    )
    await app.schedules.delete("beat")
    await eventually(
        lambda: stage.schedules()["beat"].definition is None, what="the stage read it", limit=10
    )
    after = len(runs(app, log, "beat"))
    await asyncio.sleep(2.5)
    assert len(runs(app, log, "beat")) == after
    # The runs of a schedule, read from the log (kept after the schedule is deleted).
    listed = await app.schedules.runs("beat")
    by_tick = sorted(runs(app, log, "beat"), key=tick_of)
    assert [r.task_id for r in listed] == [e.task_id for e in by_tick]
    assert {r.task_name for r in listed} == {"beat"}


async def test_overlap_skip_never_starts_a_run_while_the_previous_one_runs(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    app = make_app("overlap", event_log=log, poll_timeout=0.05)
    running: list[int] = []
    overlapped: list[int] = []

    @app.task(name="slow")
    async def slow() -> None:
        if running:
            overlapped.append(len(running))
        running.append(1)
        try:
            await asyncio.sleep(1.6)  # longer than the interval
        finally:
            running.pop()

    await app.start()
    await app.schedule("slow", task="slow", every=timedelta(seconds=1))
    events = await eventually(
        lambda: schedule_events(app, log),
        lambda found: sum(e.tick is not None and e.tick.outcome == "overlap" for e in found) >= 2,
        what="two ticks skipped for overlap",
        limit=20,
    )
    outcomes = [e.tick.outcome for e in events if e.tick is not None]
    assert outcomes[0] == "fired" and "overlap" in outcomes
    assert overlapped == []
    # The previous run is read from the log: a skipped tick names the run it waited for.
    skipped = next(e.tick for e in events if e.tick is not None and e.tick.outcome == "overlap")
    assert skipped is not None and skipped.task_id in {e.task_id for e in runs(app, log, "slow")}


async def test_a_poison_schedule_record_is_dead_lettered_and_no_task_is_made_of_it(
    make_app: Callable[..., QueueTasks],
) -> None:
    from qtasks_stream.records import OutRecord

    log = InMemoryEventLog()
    app = beat_app(make_app, "poison", event_log=log)
    await app.start()
    producer = log.producer()
    await producer.start()
    await producer.send([OutRecord(app.topology.schedules, b"nightly", b"\x00\x01garbage")])
    await producer.close()
    await eventually(lambda: log.records(app.topology.deadletter), what="the dead letter", limit=10)
    await app.schedule("after", task="beat", every=timedelta(seconds=1))
    await eventually(lambda: runs(app, log, "after"), what="a tick after the poison", limit=10)
    await eventually(lambda: _stage(app).schedules().get("after"), what="folded", limit=5)
    letters = log.records(app.topology.deadletter)
    assert [(r.key, r.value) for r in letters] == [(b"nightly", b"\x00\x01garbage")]
    assert [
        e for e in decodable_events(app, log.records(app.topology.events)) if e.task_id == "nightly"
    ] == []
    assert "nightly" not in _stage(app).schedules()


def test_the_cli_refuses_the_embedded_log(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A schedule written to a private in-memory log would reach no worker; the CLI's
    # add/list/pause on Kafka are in tests/kafka/test_schedules_kafka.py, the refusals of
    # bad definitions and unknown names through the API above.
    from qtasks_stream.cli import main

    monkeypatch.delenv("QTASKS_BOOTSTRAP_SERVERS", raising=False)
    argv = ["schedules", "add", "x", "--task", "beat", "--cron", "0 2 * * *"]
    assert main([*argv, "-A", "tests.apps.schedule_app:app"]) == 2
    assert "QTASKS_BOOTSTRAP_SERVERS" in capsys.readouterr().err
