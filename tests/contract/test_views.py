"""One contract, every view store: memory, SQLite (a file in tmp_path) and PostgreSQL (a
schema of its own on the test command's server)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.events import (
    CancelRequested,
    Failed,
    Payload,
    Progress,
    Released,
    RetryScheduled,
    Scheduled,
    Started,
    Submitted,
    Succeeded,
    TaskEvent,
)
from qtasks_stream.records import TopicPartition
from qtasks_stream.state import TaskState
from qtasks_stream.views.base import Applied, TaskQuery, ViewStore
from qtasks_stream.views.sqlite import SqliteViewStore
from tests.viewstores import DURABLE_VIEW_KINDS, VIEW_KINDS, ViewFactory

TOPIC = "qtasks.contract.events"
TP0 = TopicPartition(TOPIC, 0)
TP1 = TopicPartition(TOPIC, 1)


@pytest.fixture(params=VIEW_KINDS)
async def views(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ViewFactory]:
    factory = ViewFactory(request.param, tmp_path, request)
    yield factory
    await factory.close()


@pytest.fixture
async def view(views: ViewFactory) -> ViewStore:
    return await views.fresh()


class _Log:
    """Hands out offsets per partition, as the events topic would."""

    def __init__(self) -> None:
        self._next: dict[TopicPartition, int] = {}

    def at(self, tp: TopicPartition, event: TaskEvent) -> Applied:
        offset = self._next.get(tp, 0)
        self._next[tp] = offset + 1
        return Applied(tp, offset, event)

    def many(self, tp: TopicPartition, events: Sequence[TaskEvent]) -> list[Applied]:
        return [self.at(tp, e) for e in events]


def _event(
    task_id: str,
    payload: Payload,
    *,
    name: str = "job",
    attempt: int = 0,
    at_us: int | None = None,
) -> TaskEvent:
    event = TaskEvent.new(task_id, name, attempt, "test", payload)
    return event if at_us is None else dataclasses.replace(event, at_us=at_us)


def _submitted(
    task_id: str,
    *,
    name: str = "job",
    args: str = "[1, 2]",
    tags: Sequence[str] = (),
    at_us: int | None = None,
    priority: int = 0,
    queue: str | None = None,
) -> TaskEvent:
    payload = Submitted(
        args, '{"k": "v"}', priority, tags=tuple(tags), idempotency_key=None, queue=queue
    )
    return _event(task_id, payload, name=name, at_us=at_us)


def _run_to_success(task_id: str, *, name: str = "job", result: str = "42") -> list[TaskEvent]:
    return [
        _event(task_id, Scheduled(0, 0), name=name, attempt=1),
        _event(task_id, Started("w1"), name=name, attempt=1),
        _event(task_id, Succeeded(result, 1.5), name=name, attempt=1),
    ]


async def _all(view: ViewStore) -> list[str]:
    return [t.uuid for t in await view.query(TaskQuery(limit=10_000))]


# -- idempotence and positions ----------------------------------------------------------------


async def test_apply_is_idempotent_by_offset(view: ViewStore) -> None:
    log = _Log()
    batch = log.many(TP0, [_submitted("t1"), *_run_to_success("t1")])

    assert await view.apply(batch) == 4
    first = await view.state("t1")
    assert first is not None and first.events == 4 and first.status == "success"

    # The same batch again (a redelivery after a crash before the group commit): no effect.
    assert await view.apply(batch) == 0
    assert await view.state("t1") == first

    # An overlapping batch: only the new position is applied.
    later = log.at(TP0, _event("t1", CancelRequested("late"), attempt=1))
    assert await view.apply([*batch[2:], later]) == 1
    after = await view.state("t1")
    assert after is not None
    # The final state ignored the event (see below), but its position was recorded.
    assert after == first
    assert (await view.positions())[TP0] == 5


async def test_positions_are_stored_per_partition(view: ViewStore) -> None:
    assert await view.positions() == {}
    log = _Log()
    await view.apply(log.many(TP0, [_submitted("a"), *_run_to_success("a")]))
    await view.apply(log.many(TP1, [_submitted("b"), _event("b", Scheduled(1, 1), attempt=1)]))
    assert await view.positions() == {TP0: 4, TP1: 2}

    # A batch read from the middle of a partition (retention) stores where it stopped.
    tp2 = TopicPartition(TOPIC, 2)
    await view.apply([Applied(tp2, 40, _submitted("c")), Applied(tp2, 41, _submitted("d"))])
    assert await view.positions() == {TP0: 4, TP1: 2, tp2: 42}

    # An offset below the stored position is skipped even if it is about another task.
    assert await view.apply([Applied(tp2, 41, _submitted("e"))]) == 0
    assert await view.get("e") is None


async def test_clear_empties_states_tags_and_positions(view: ViewStore) -> None:
    """What a rebuild after a log reset starts from (``on_log_reset='rebuild'``)."""
    log = _Log()
    await view.apply(log.many(TP0, [_submitted("a", tags=("x",)), *_run_to_success("a")]))
    await view.clear()
    assert await view.positions() == {}
    assert await view.counts() == {}
    assert await view.query(TaskQuery(tag="x")) == []
    await view.apply([Applied(TP0, 0, _submitted("b"))])
    assert await view.positions() == {TP0: 1}
    assert (await view.counts()) == {"new": 1}


async def test_get_returns_the_decoded_task(view: ViewStore) -> None:
    log = _Log()
    await view.apply(
        log.many(
            TP0, [_submitted("t1", name="add", tags=["x"]), *_run_to_success("t1", name="add")]
        )
    )
    task = await view.get("t1")
    assert task is not None
    assert (task.uuid, task.task_name, task.status) == ("t1", "add", "success")
    assert task.args == [1, 2] and task.kwargs == {"k": "v"}
    assert task.returning == 42
    assert task.attempt == 1 and task.worker_id == "w1" and task.tags == ["x"]
    assert task.final
    assert await view.get("missing") is None
    assert await view.state("missing") is None


# -- queries ------------------------------------------------------------------------------------


async def _three_outcomes(view: ViewStore) -> None:
    log = _Log()
    await view.apply(
        log.many(
            TP0,
            [
                _submitted("ok", name="add", tags=["math", "fast"], at_us=1_000),
                *_run_to_success("ok", name="add"),
                _submitted("bad", name="div", tags=["math"], at_us=2_000),
                _event("bad", Scheduled(0, 0), name="div", attempt=1),
                _event("bad", Started("w1"), name="div", attempt=1),
                _event(
                    "bad", Failed("ZeroDivisionError", "boom", "tb", 1.0), name="div", attempt=1
                ),
                _submitted("wait", name="add", at_us=3_000),
            ],
        )
    )


async def test_query_by_status(view: ViewStore) -> None:
    await _three_outcomes(view)
    assert [t.uuid for t in await view.query(TaskQuery(status="success"))] == ["ok"]
    failed = await view.query(TaskQuery(status="error"))
    assert [t.uuid for t in failed] == ["bad"]
    assert failed[0].error_type == "ZeroDivisionError" and failed[0].error_message == "boom"
    assert [t.uuid for t in await view.query(TaskQuery(status="new"))] == ["wait"]
    assert await view.query(TaskQuery(status="cancel")) == []


async def test_query_by_task_name(view: ViewStore) -> None:
    await _three_outcomes(view)
    assert [t.uuid for t in await view.query(TaskQuery(task_name="add"))] == ["ok", "wait"]
    assert [t.uuid for t in await view.query(TaskQuery(task_name="div"))] == ["bad"]
    assert await view.query(TaskQuery(task_name="nope")) == []
    combined = await view.query(TaskQuery(task_name="add", status="new"))
    assert [t.uuid for t in combined] == ["wait"]


async def test_query_by_tag(view: ViewStore) -> None:
    await _three_outcomes(view)
    assert [t.uuid for t in await view.query(TaskQuery(tag="math"))] == ["ok", "bad"]
    assert [t.uuid for t in await view.query(TaskQuery(tag="fast"))] == ["ok"]
    assert await view.query(TaskQuery(tag="slow")) == []
    assert [t.uuid for t in await view.query(TaskQuery(tag="math", status="error"))] == ["bad"]


async def test_query_by_queue(view: ViewStore) -> None:
    log = _Log()
    await view.apply(
        log.many(
            TP0,
            [
                _submitted("old", at_us=1_000),  # written before queues: the default queue
                _submitted("report", queue="reports", tags=["x"], at_us=2_000),
                *_run_to_success("report"),
                _submitted("plain", queue="default", at_us=3_000),
                _submitted("report2", queue="reports", at_us=4_000),
            ],
        )
    )
    assert [t.uuid for t in await view.query(TaskQuery(queue="reports"))] == ["report", "report2"]
    assert [t.uuid for t in await view.query(TaskQuery(queue="default"))] == ["old", "plain"]
    assert await view.query(TaskQuery(queue="nope")) == []
    both = TaskQuery(queue="reports", status="success", tag="x")
    assert [t.uuid for t in await view.query(both)] == ["report"]
    page = await view.page(TaskQuery(queue="reports", limit=1))
    assert [t.uuid for t in page.tasks] == ["report"] and page.next_cursor is not None
    rest = await view.page(TaskQuery(queue="reports", limit=1, after=page.next_cursor))
    assert [t.uuid for t in rest.tasks] == ["report2"]
    assert (await view.query(TaskQuery(queue="reports")))[0].queue == "reports"


@pytest.mark.parametrize("views", DURABLE_VIEW_KINDS, indirect=True)
async def test_a_store_made_before_queues_gets_its_queue_column(views: ViewFactory) -> None:
    """A file or schema written by a version without the queue column: opening it adds the
    column, filled from each stored state, and the queue filter finds the old tasks."""
    reports = TaskState("r", "job", created_us=1, queue="reports")
    legacy = TaskState("l", "job", created_us=2).to_json().replace(',"queue":null', "")
    assert "queue" not in legacy  # a state written before queues existed
    rows = [("r", reports.to_json()), ("l", legacy)]
    name = views.new_name()
    old_tasks = (
        "CREATE TABLE {s}tasks (task_id TEXT PRIMARY KEY, task_name TEXT NOT NULL, "
        "status TEXT NOT NULL, created_us BIGINT NOT NULL, updated_us BIGINT NOT NULL, "
        "state TEXT NOT NULL)"
    )
    if views.kind == "sqlite":
        import sqlite3

        db = sqlite3.connect(views.sqlite_path(name))
        with db:
            db.execute(old_tasks.format(s=""))
            db.executemany(
                "INSERT INTO tasks VALUES (?, 'job', 'new', ?, 0, ?)",
                [(tid, i, text) for i, (tid, text) in enumerate(rows)],
            )
        db.close()
    else:
        import asyncpg

        conn = await asyncpg.connect(views.dsn)
        try:
            await conn.execute(f"CREATE SCHEMA {name}")
            await conn.execute(old_tasks.format(s=f"{name}."))
            await conn.executemany(
                f"INSERT INTO {name}.tasks VALUES ($1, 'job', 'new', $2, 0, $3)",
                [(tid, i, text) for i, (tid, text) in enumerate(rows)],
            )
        finally:
            await conn.close()
    view = await views.named(name)
    assert [t.uuid for t in await view.query(TaskQuery(queue="reports"))] == ["r"]
    assert [t.uuid for t in await view.query(TaskQuery(queue="default"))] == ["l"]
    # New states go on being filed by queue; a second open finds the column there.
    log = _Log()
    await view.apply([log.at(TP0, _submitted("n", queue="reports", at_us=9))])
    again = await views.handle(view)
    assert [t.uuid for t in await again.query(TaskQuery(queue="reports"))] == ["r", "n"]


async def test_query_since_until(view: ViewStore) -> None:
    await _three_outcomes(view)
    # since is inclusive, until exclusive, both on the creation time.
    assert [t.uuid for t in await view.query(TaskQuery(since_us=2_000))] == ["bad", "wait"]
    assert [t.uuid for t in await view.query(TaskQuery(until_us=2_000))] == ["ok"]
    window = await view.query(TaskQuery(since_us=1_500, until_us=3_000))
    assert [t.uuid for t in window] == ["bad"]
    assert await view.query(TaskQuery(since_us=3_001)) == []


async def test_query_pages_oldest_first(view: ViewStore) -> None:
    log = _Log()
    ids = [f"task-{i}" for i in range(7)]
    # Submitted out of creation order, over two partitions: the order is by created time.
    for i in (3, 0, 6, 1, 5, 2, 4):
        tp = TP0 if i % 2 else TP1
        await view.apply([log.at(tp, _submitted(ids[i], at_us=10_000 + i))])

    pages = [
        [t.uuid for t in await view.query(TaskQuery(limit=3, offset=offset))]
        for offset in (0, 3, 6, 9)
    ]
    assert pages == [ids[0:3], ids[3:6], ids[6:7], []]
    assert [t.uuid for t in await view.query(TaskQuery(limit=2, offset=1, since_us=10_002))] == [
        ids[3],
        ids[4],
    ]


def test_query_rejects_bad_paging() -> None:
    with pytest.raises(ConfigurationError, match="limit"):
        TaskQuery(limit=0)
    with pytest.raises(ConfigurationError, match="limit"):
        TaskQuery(limit=10_001)
    with pytest.raises(ConfigurationError, match="offset"):
        TaskQuery(offset=-1)


async def test_counts_by_status(view: ViewStore) -> None:
    assert await view.counts() == {}
    await _three_outcomes(view)
    assert await view.counts() == {"success": 1, "error": 1, "new": 1}

    log = _Log()
    await view.apply(
        [
            log.at(TP1, _submitted("r")),
            log.at(TP1, _event("r", Scheduled(0, 0), attempt=1)),
            log.at(TP1, _event("r", Started("w"), attempt=1)),
            log.at(TP1, _event("r", RetryScheduled(2, 99, "E", "m", "tb", 1.0), attempt=1)),
        ]
    )
    assert await view.counts() == {"success": 1, "error": 1, "new": 1, "retry": 1}


# -- the fold rules the store must keep ----------------------------------------------------------


async def test_final_state_ignores_later_events(view: ViewStore) -> None:
    log = _Log()
    await view.apply(log.many(TP0, [_submitted("t1"), *_run_to_success("t1", result='"first"')]))
    final = await view.state("t1")
    assert final is not None and final.status == "success"

    # A stale duplicate attempt arrives after the outcome: it must not resurrect the task.
    stale = [
        _event("t1", Released(0), attempt=2),
        _event("t1", Started("w2"), attempt=2),
        _event("t1", Progress(0, "1"), attempt=2),
        _event("t1", Failed("E", "late", "tb", 1.0), attempt=2),
    ]
    assert await view.apply(log.many(TP0, stale)) == 4
    assert await view.state("t1") == final
    task = await view.get("t1")
    assert task is not None
    assert (task.status, task.returning, task.attempt, task.worker_id) == (
        "success",
        "first",
        1,
        "w1",
    )
    assert await view.counts() == {"success": 1}


async def test_repeated_submitted_is_ignored(view: ViewStore) -> None:
    log = _Log()
    await view.apply([log.at(TP0, _submitted("t1", args="[1]", tags=["a"], at_us=5_000))])
    first = await view.state("t1")
    assert first is not None
    # The same id submitted again (idempotent submit): the first one wins, nothing changes.
    again = _submitted("t1", args="[2]", tags=["b"], at_us=9_000, priority=2)
    assert await view.apply([log.at(TP0, again)]) == 1
    assert await view.state("t1") == first
    task = await view.get("t1")
    assert task is not None
    assert task.args == [1] and task.tags == ["a"] and task.priority == 0
    assert [t.uuid for t in await view.query(TaskQuery(tag="b"))] == []
    assert await _all(view) == ["t1"]


# -- persistence ---------------------------------------------------------------------------------


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "reopen.sqlite"
    log = _Log()
    first = SqliteViewStore(path)
    await first.start()
    await first.apply(log.many(TP0, [_submitted("a", tags=["t"]), *_run_to_success("a")]))
    await first.apply(log.many(TP1, [_submitted("b", at_us=7)]))
    state_a, state_b = await first.state("a"), await first.state("b")
    await first.close()

    second = SqliteViewStore(path)
    await second.start()
    try:
        assert await second.positions() == {TP0: 4, TP1: 1}
        assert await second.state("a") == state_a
        assert await second.state("b") == state_b
        assert await second.counts() == {"success": 1, "new": 1}
        assert [t.uuid for t in await second.query(TaskQuery(tag="t"))] == ["a"]
        # Idempotence holds across the reopen: the old positions are not applied again.
        assert await second.apply([Applied(TP0, 3, _submitted("zzz"))]) == 0
        assert await second.get("zzz") is None
        # ...and new positions are.
        assert await second.apply([log.at(TP1, _event("b", Scheduled(0, 0), attempt=1))]) == 1
        assert (await second.positions())[TP1] == 2
    finally:
        await second.close()


# -- cursor paging, shared stores ------------------------------------------------------------------


async def test_cursor_pages_are_stable_under_inserts(view: ViewStore) -> None:
    log = _Log()
    # Equal creation times: the task id breaks the tie, so the order is total.
    for i in (4, 0, 3, 1, 2):
        await view.apply([log.at(TP0, _submitted(f"t{i}", at_us=1_000 + i // 2))])

    first = await view.page(TaskQuery(limit=2))
    assert [t.uuid for t in first.tasks] == ["t0", "t1"]
    assert first.next_cursor is not None
    # A task created before the cursor arrives between pages: offsets would shift, the
    # cursor does not.
    await view.apply([log.at(TP1, _submitted("early", at_us=1))])
    second = await view.page(TaskQuery(limit=2, after=first.next_cursor))
    assert [t.uuid for t in second.tasks] == ["t2", "t3"]
    assert second.next_cursor is not None
    last = await view.page(TaskQuery(limit=2, after=second.next_cursor))
    assert [t.uuid for t in last.tasks] == ["t4"] and last.next_cursor is None
    # Filters and offsets apply past the cursor too.
    assert [t.uuid for t in await view.query(TaskQuery(after=first.next_cursor, offset=1))] == [
        "t3",
        "t4",
    ]
    assert await view.query(TaskQuery(after=first.next_cursor, status="success")) == []


def test_query_rejects_a_bad_cursor() -> None:
    for bad in ("", "12", "x:t1", "12:"):
        with pytest.raises(ConfigurationError, match="cursor"):
            TaskQuery(after=bad)


async def test_a_second_handle_sees_and_respects_the_first(views: ViewFactory) -> None:
    first = await views.fresh()
    second = await views.handle(first)
    log = _Log()
    await first.apply(log.many(TP0, [_submitted("a", tags=["t"]), *_run_to_success("a")]))
    assert await second.positions() == {TP0: 4}
    assert (await second.get("a")) == (await first.get("a"))
    assert [t.uuid for t in await second.query(TaskQuery(tag="t"))] == ["a"]
    # What one handle applied, the other skips.
    assert await second.apply([Applied(TP0, 3, _submitted("zzz"))]) == 0
    assert await second.get("zzz") is None


async def test_a_fold_that_lost_the_race_is_redone_from_the_winner(views: ViewFactory) -> None:
    """Two owners of one partition for a moment (a rebalance): the second owner saves while
    the first is folding the same records; the first must not apply them a second time."""
    store = await views.fresh()
    other = await views.handle(store)
    log = _Log()
    await store.apply([log.at(TP0, _submitted("t1"))])
    batch = log.many(TP0, _run_to_success("t1"))
    load = store._load
    raced: list[int] = []

    async def load_then_lose(task_ids: set[str]) -> dict[str, TaskState]:
        loaded = await load(task_ids)
        if not raced:
            raced.append(-1)  # once (the in-memory "other" is this very store)
            raced[0] = await other.apply(batch[:2])  # the other owner saves meanwhile
        return loaded

    store._load = load_then_lose  # type: ignore[method-assign]
    assert await store.apply(batch) == 1  # only the record the other did not apply
    assert raced == [2]
    state = await store.state("t1")
    assert state is not None and state.status == "success" and state.events == 4
    assert (await store.positions())[TP0] == 4


async def test_batches_mixing_partitions_and_repeating_records(view: ViewStore) -> None:
    log = _Log()
    a0, a1 = log.at(TP0, _submitted("a")), log.at(TP0, _event("a", Scheduled(0, 0), attempt=1))
    b0 = log.at(TP1, _submitted("b"))
    # Partitions interleaved, and a record delivered twice within one batch.
    assert await view.apply([a0, b0, a0, a1, b0]) == 3
    assert await view.positions() == {TP0: 2, TP1: 1}
    state = await view.state("a")
    assert state is not None and state.events == 2 and state.status == "scheduled"
    state_b = await view.state("b")
    assert state_b is not None and state_b.events == 1
