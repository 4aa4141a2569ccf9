"""Replay, snapshots and dead-letter replay on the embedded default, through the modules and
through the CLI's wiring (``cli.audit.run`` with arguments parsed by the real parser)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.cli.audit import run
from qtasks_stream.cli.main import _parser
from qtasks_stream.errors import FencedError, SerdeError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import WorkItem, now_us
from qtasks_stream.ops.dlq import REPLAYED_FROM, list_dead_letters, replay, replayed_sources
from qtasks_stream.ops.replay import all_states, compare_views, replay_into
from qtasks_stream.ops.snapshot import read_snapshot, seed_view, snapshot_every, write_snapshot
from qtasks_stream.records import OutRecord
from qtasks_stream.serde.base import Serde
from qtasks_stream.stages.runner import DLQ_REASON, DLQ_SOURCE
from qtasks_stream.views.memory import MemoryViewStore
from qtasks_stream.views.sqlite import SqliteViewStore
from tests.e2e.test_lifecycle import LIMIT, ends, eventually, finished, kinds, log_events, settle


@pytest.fixture
def build(make_app: Callable[..., QueueTasks]) -> Callable[..., QueueTasks]:
    """``make_app`` (tests/e2e/conftest.py) with this module's default app name."""

    def make(name: str = "replay", **options: Any) -> QueueTasks:
        return make_app(name, **options)

    return make


def shared() -> dict[str, Any]:
    return {
        "event_log": InMemoryEventLog(),
        "schema_registry": SchemaRegistryClient.new_client(
            {"url": f"mock://replay-{uuid.uuid4().hex}"}
        ),
    }


async def started(build: Callable[..., QueueTasks]) -> tuple[QueueTasks, dict[str, Any]]:
    """A started app with this module's tasks, and the log and registry it shares."""
    parts = shared()
    app = build(**parts)
    register(app)
    app.unknown_task_deadline = 0.0  # a work item of an unknown task: dead-lettered at once
    await app.start()
    return app, parts


def register(app: QueueTasks, *, ghost: bool = False) -> None:
    @app.task(retry=1, retry_on_exc=[OSError], retry_backoff=0.01, echo=True)
    async def flaky(self: Any, fail: bool) -> int:
        if fail and self.ctx.attempt == 1:
            raise OSError("first attempt fails")
        return int(self.ctx.attempt)

    @app.task
    def broken() -> None:
        raise KeyError("missing")

    @app.task
    async def later() -> str:
        return "late"

    if ghost:

        @app.task
        async def ghost_task() -> str:
            return "boo"


async def some_work(app: QueueTasks, tag: str) -> list[str]:
    ids = []
    for fail in (False, True):
        task = await app.add_task("flaky", fail, tags=[tag])
        assert task is not None
        ids.append(task.uuid)
    task = await app.add_task("broken")
    assert task is not None
    ids.append(task.uuid)
    for task_id in ids:
        await finished(app, task_id)
    return ids


async def cli(app: QueueTasks, *argv: str) -> int:
    args = _parser().parse_args([*argv, "-A", "unused:app"])
    return await run(args.command, app, args)


async def test_replay_into_a_url_equals_the_live_view_and_verify_finds_a_difference(
    build: Callable[..., QueueTasks], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app, parts = await started(build)
    ids = await some_work(app, "a")
    await settle(app)
    live = app.view
    async with asyncio.timeout(LIMIT):
        await app.close()

    tool = build(**parts, view=live)
    target = f"sqlite:///{tmp_path}/replayed.sqlite"  # an absolute path: four slashes
    assert await cli(tool, "replay", "--into", target, "--verify") == 0
    out, err = capsys.readouterr()
    assert "events/s" in out and "verify: 0 differences" in out, out
    assert err.count("\n") == 1 and "offsets/s" in err, "one progress line, redrawn in place"
    assert err.rstrip().split("\r")[-1].startswith("[" + "#" * 30 + "] 100.0%"), err

    replayed = SqliteViewStore(tmp_path / "replayed.sqlite")
    await replayed.start()
    try:
        assert await compare_views(live, replayed) == []
        assert set(ids) <= set(await all_states(replayed))
        assert await replayed.positions() == ends(parts["event_log"], app.topology.events)
    finally:
        await replayed.close()

    # The live view is wrong about one task: verify names it and fails.
    wrong = await live.state(ids[0])
    assert wrong is not None
    wrong.status = "error"
    await live._save([wrong], {}, {})  # corrupt one row, positions untouched
    tool = build(**parts, view=live)
    assert await cli(tool, "replay", "--into", "memory://", "--verify") == 1
    out, _ = capsys.readouterr()
    assert f"{ids[0]}: status live='error' replayed='success'" in out
    assert "verify: 1 differences" in out


async def test_replay_from_offsets_or_time_starts_mid_log(
    build: Callable[..., QueueTasks], capsys: pytest.CaptureFixture[str]
) -> None:
    app, parts = await started(build)
    first = await some_work(app, "a")
    await settle(app)
    middle = ends(parts["event_log"], app.topology.events)
    cut = now_us()
    second = await some_work(app, "b")
    await settle(app)

    view = MemoryViewStore()
    result = await replay_into(
        view, app.event_log, app.serde, app.topology.events, app.topology.partitions, start=middle
    )
    assert set(await all_states(view)) == set(second)
    assert result.records == sum(ends(parts["event_log"], app.topology.events).values()) - sum(
        middle.values()
    )
    by_time = MemoryViewStore()
    result = await replay_into(
        by_time, app.event_log, app.serde, app.topology.events, app.topology.partitions, from_us=cut
    )
    assert set(await all_states(by_time)) == set(second) and result.skipped > 0
    assert not set(first) & set(await all_states(by_time))
    offsets = ",".join(f"{tp.partition}:{o}" for tp, o in middle.items())
    assert await cli(app, "replay", "--into", "memory://", "--from-offsets", offsets) == 0
    with pytest.raises(Exception, match="--verify compares whole views"):
        await cli(app, "replay", "--into", "memory://", "--from-offsets", offsets, "--verify")
    capsys.readouterr()


async def test_snapshot_plus_tail_equals_a_full_replay(
    build: Callable[..., QueueTasks], capsys: pytest.CaptureFixture[str]
) -> None:
    app, parts = await started(build)
    await some_work(app, "a")
    # Long enough to still wait once every stage has committed (offsets alone may wait
    # OFFSETS_ONLY_EVERY_S) and the snapshot is written.
    pending = await app.add_task("later", countdown=1.5)
    assert pending is not None
    await settle(app)
    assert await read_snapshot(app.event_log, app.serde, app.topology) is None
    assert await cli(build(**parts), "snapshot") == 0
    out, _ = capsys.readouterr()
    assert " 4 tasks, covers " in out, out
    first = await read_snapshot(app.event_log, app.serde, app.topology)
    assert first is not None
    assert {s.task_id: s.status for s in first.states}[pending.uuid] == "scheduled"

    # The tail: new tasks, and the task that was waiting in the snapshot ends.
    await some_work(app, "b")
    await finished(app, pending.uuid)
    await settle(app)
    full, from_snapshot = MemoryViewStore(), MemoryViewStore()
    topic, partitions = app.topology.events, app.topology.partitions
    everything = await replay_into(full, app.event_log, app.serde, topic, partitions)
    await seed_view(from_snapshot, first)
    tail = await replay_into(from_snapshot, app.event_log, app.serde, topic, partitions)
    assert tail.records < everything.records
    assert tail.records == everything.records - sum(first.covers.values())
    assert await compare_views(full, from_snapshot) == []
    assert await compare_views(app.view, from_snapshot) == []
    assert await from_snapshot.positions() == await full.positions()

    # A second snapshot is the first plus the tail.
    second, result = await write_snapshot(app.event_log, app.serde, app.topology)
    assert result.records == tail.records
    assert {tp: o for tp, o in second.covers.items() if o} == ends(parts["event_log"], topic)
    assert len(second.covers) == partitions
    assert {s.task_id: s for s in second.states} == await all_states(full)
    latest = await read_snapshot(app.event_log, app.serde, app.topology)
    assert latest is not None and latest.snapshot_id == second.snapshot_id
    assert sorted(latest.states, key=lambda s: s.task_id) == second.states

    live = app.view
    async with asyncio.timeout(LIMIT):
        await app.close()
    tool = build(**parts, view=live)
    assert await cli(tool, "replay", "--into", "memory://", "--from-snapshot", "--verify") == 0
    out, _ = capsys.readouterr()
    assert f"from snapshot {second.snapshot_id}" in out and "verify: 0 differences" in out
    assert "replayed 0 records" in out


async def test_snapshots_are_written_on_a_period_until_stopped(
    build: Callable[..., QueueTasks],
) -> None:
    app, _ = await started(build)
    await some_work(app, "a")
    await settle(app)
    stop = asyncio.Event()
    every = asyncio.create_task(snapshot_every(0.05, app.event_log, app.serde, app.topology, stop))
    first = await eventually(
        lambda: read_snapshot(app.event_log, app.serde, app.topology),
        lambda s: s is not None and len(s.states) == 3,
        what="a first periodic snapshot",
    )
    assert first is not None
    more = await some_work(app, "b")
    await settle(app)
    latest = await eventually(
        lambda: read_snapshot(app.event_log, app.serde, app.topology),
        lambda s: s is not None and set(more) <= {t.task_id for t in s.states},
        what="a later snapshot with the new tasks",
    )
    assert latest is not None and latest.snapshot_id != first.snapshot_id
    assert {t.task_id for t in latest.states} >= {t.task_id for t in first.states}
    stop.set()
    async with asyncio.timeout(LIMIT):
        written = await every
    assert written >= 2


async def test_dead_letters_are_listed_and_replayed_once(
    build: Callable[..., QueueTasks], capsys: pytest.CaptureFixture[str]
) -> None:
    app, parts = await started(build)
    log: InMemoryEventLog = parts["event_log"]
    task_id = str(uuid.uuid4())
    lane = app.topology.lane(1)
    item = WorkItem(task_id, "ghost_task", 1, "[]", "{}", 1, now_us())
    producer = log.producer()
    await producer.send(
        [
            OutRecord(
                lane, task_id.encode(), app.serde.encode(lane, item.to_avro()), (("h", b"1"),)
            ),
            OutRecord(app.topology.events, b"broken-task", b"\x00\x01garbage"),
        ]
    )
    assert (await finished(app, task_id)).status == "dead_letter"
    await eventually(
        lambda: kinds(log_events(app, "broken-task")),
        lambda k: k == ["DeadLettered"],
        what="the garbage was dead-lettered",
    )
    await settle(app)
    async with asyncio.timeout(LIMIT):
        await app.close()

    letters = await list_dead_letters(log, app.topology)
    by_key = {(d.task_id, d.stage) for d in letters}
    assert (task_id, "worker") in by_key
    assert ("broken-task", "scheduler") in by_key and ("broken-task", "projector") in by_key
    worker_letter = next(d for d in letters if d.stage == "worker")
    assert worker_letter.headers == (("h", b"1"),) and worker_letter.source_topic == lane
    assert "unknown task 'ghost_task'" in worker_letter.reason
    assert await cli(app, "dlq", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(r["key"], r["stage"]) for r in listed["records"]} == by_key
    assert all(r["topic"] == app.topology.deadletter for r in listed["records"])

    # The cause is fixed: a worker that knows the task. Replay everything, twice.
    fixed = build(**parts)
    register(fixed, ghost=True)
    await fixed.start()
    lane_before = len(log.records(lane))
    assert await cli(build(**parts), "dlq", "replay", "--dry-run") == 0
    assert "would replay" in capsys.readouterr().out
    assert len(log.records(lane)) == lane_before, "a dry run wrote something"
    outcomes = await replay(log, fixed.serde, fixed.topology, lambda d: True, reason="fixed")
    results = sorted(o.result for o in outcomes)
    assert results == ["already replayed", "replayed", "replayed"], results
    task = await eventually(
        lambda: fixed.get(task_id),
        lambda t: t is not None and t.status == "success",
        what="the replayed work item ran",
    )
    assert task is not None and task.returning == "boo"
    copy = log.records(lane)[-1]
    assert (copy.key, copy.value) == (task_id.encode(), worker_letter.value)
    assert copy.headers[0] == ("h", b"1") and copy.headers[1][0] == REPLAYED_FROM

    await eventually(
        lambda: kinds(log_events(fixed, "broken-task")),
        lambda k: k == ["DeadLettered", "Resubmitted", "DeadLettered"],
        what="the replayed garbage failed again and was dead-lettered anew",
    )
    await settle(fixed)
    again = await replay(log, fixed.serde, fixed.topology, lambda d: True)
    assert {o.result for o in again if o.letter.task_id == task_id} == {"already replayed"}
    first_sources = {d.source for d in letters}
    assert {o.result for o in again if o.letter.source in first_sources} == {"already replayed"}
    # The copy's own dead letters (one per stage) are a new record: replayable, once.
    assert sorted(o.result for o in again if o.letter.source not in first_sources) == [
        "already replayed",
        "replayed",
    ]
    assert await cli(build(**parts), "dlq", "replay", "--key", task_id) == 0
    assert "already replayed" in capsys.readouterr().out
    await settle(fixed)
    assert len(log.records(lane)) == lane_before + 1, "a replay was repeated"
    history = kinds(log_events(fixed, task_id))
    assert history == ["DeadLettered", "Resubmitted", "Started", "Succeeded"]
    garbage = kinds(log_events(fixed, "broken-task"))
    assert garbage == ["DeadLettered", "Resubmitted"] * 2 + ["DeadLettered"], garbage


class _CannotReadSubmitsOf(Serde):
    """A deployment with a bug: its stages cannot read the submits of one task."""

    def __init__(self, inner: Serde, task_name: str) -> None:
        self.inner, self.task_name = inner, task_name

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def encode(self, topic: str, value: dict[str, Any]) -> bytes:
        return self.inner.encode(topic, value)

    def decode(self, topic: str, data: bytes, *, branch: str | None = None) -> dict[str, Any]:
        value = self.inner.decode(topic, data, branch=branch)
        payload = value.get("payload")
        if (
            isinstance(payload, tuple)
            and payload[0].endswith(".Submitted")
            and value["task_name"] == self.task_name
        ):
            raise SerdeError(f"this build cannot read submits of {self.task_name!r}")
        return value


async def test_a_replayed_dead_lettered_submit_runs_the_task(
    build: Callable[..., QueueTasks],
) -> None:
    parts = shared()
    log: InMemoryEventLog = parts["event_log"]
    broken = build(**parts)
    register(broken)
    broken.serde = _CannotReadSubmitsOf(broken.serde, "later")
    await broken.start()
    # Through the scheduler (countdown): a task due now would be in its lane already.
    submitted = await broken.add_task("later", countdown=0)
    assert submitted is not None
    task_id = submitted.uuid
    lost = await finished(broken, task_id)
    assert lost.status == "dead_letter" and "cannot read submits" in (lost.error_message or "")
    await settle(broken)
    async with asyncio.timeout(LIMIT):
        await broken.close()

    fixed = build(**parts)
    register(fixed)
    await fixed.start()
    outcomes = await replay(log, fixed.serde, fixed.topology, lambda d: d.task_id == task_id)
    # The scheduler and the projector both gave up on the one record: one replay.
    assert sorted(o.result for o in outcomes) == ["already replayed", "replayed"]
    # (The fixed app's view starts from the log: the task is dead-lettered there at first.)
    task = await eventually(
        lambda: fixed.get(task_id),
        lambda t: t is not None and t.status == "success",
        what="the replayed submit ran",
    )
    assert task is not None and task.returning == "late"
    assert task.task_name == "later"
    await settle(fixed)
    assert kinds(log_events(fixed, task_id)) == [
        "Submitted",
        "DeadLettered",
        "Resubmitted",
        "Submitted",
        "Scheduled",
        "Started",
        "Succeeded",
    ]
    again = await replay(log, fixed.serde, fixed.topology, lambda d: d.task_id == task_id)
    assert {o.result for o in again} == {"already replayed"}


async def test_a_dead_letter_not_yet_in_the_tasks_history_is_not_replayed(
    build: Callable[..., QueueTasks],
) -> None:
    parts = shared()
    log: InMemoryEventLog = parts["event_log"]
    app = build(**parts)
    await app.start(stages=["projector"])  # no deadletter stage: nothing records the letter
    # A stage dead-lettered a record, and no deadletter stage has recorded it yet.
    letter = OutRecord(
        app.topology.deadletter,
        b"t1",
        b"\x00\x01garbage",
        ((DLQ_SOURCE, f"{app.topology.events}/0/5".encode()), (DLQ_REASON, b"cannot decode")),
    )
    await log.producer().send([letter])
    outcomes = await replay(log, app.serde, app.topology, lambda d: True)
    assert [o.result.split(":")[0] for o in outcomes] == ["not yet"]
    assert log.records(app.topology.events) == [], "a refused replay wrote something"


async def test_a_replayer_that_read_the_markers_before_another_committed_is_fenced(
    build: Callable[..., QueueTasks],
) -> None:
    app, parts = await started(build)
    log: InMemoryEventLog = parts["event_log"]
    await log.producer().send([OutRecord(app.topology.events, b"k", b"\x00\x01garbage")])
    await eventually(
        lambda: kinds(log_events(app, "k")), lambda k: k == ["DeadLettered"], what="dead letter"
    )
    await settle(app)
    # A slow replayer: its producer is open, it found no marker, it has not committed yet.
    slow = log.producer(transactional_id=app.topology.group("dlq-replay"))
    letters = await list_dead_letters(log, app.topology)
    assert not await replayed_sources(log, app.serde, app.topology)
    outcomes = await replay(log, app.serde, app.topology, lambda d: True)
    assert sorted(o.result for o in outcomes) == ["already replayed", "replayed"]
    events_before = len(log.records(app.topology.events))
    copy = OutRecord(app.topology.events, letters[0].key, letters[0].value)
    reader = log.consumer([app.topology.events], group_id=None)
    with pytest.raises(FencedError):
        await slow.commit_transaction([copy], {}, reader)
    assert len(log.records(app.topology.events)) == events_before, "the fenced copy got out"
