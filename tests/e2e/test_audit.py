"""Audit and re-running work on the embedded default: history attempt by attempt, the state
of a task at a past moment, and resubmits of ended tasks (also across a restart)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import TaskEvent
from qtasks_stream.ops.audit import history_document
from qtasks_stream.ops.rerun import ResubmitFilter
from tests.e2e.test_lifecycle import LIMIT, eventually, finished, kinds, log_events, settle


@pytest.fixture
def build(make_app: Callable[..., QueueTasks]) -> Callable[..., QueueTasks]:
    """``make_app`` (tests/e2e/conftest.py) with this module's default app name."""

    def make(name: str = "audit", **options: Any) -> QueueTasks:
        return make_app(name, **options)

    return make


def between(events: list[TaskEvent], kind: str) -> float:
    """Epoch seconds just after the first event of ``kind`` (and before the next event)."""
    index = next(i for i, e in enumerate(events) if e.kind == kind)
    after = events[index + 1].at_us if index + 1 < len(events) else events[index].at_us + 2
    return (events[index].at_us + after) / 2 / 1_000_000


async def test_resubmit_runs_a_new_attempt_and_history_and_as_of_follow_it(
    build: Callable[..., QueueTasks],
) -> None:
    app = build()
    fixed = False

    @app.task(retry=1, retry_on_exc=[OSError], retry_backoff=0.01)
    async def fetch(url: str) -> str:
        if not fixed:
            raise OSError(f"{url} is down")
        return url.upper()

    await app.start()
    task = await app.add_task("fetch", "http://x", timeout=LIMIT, tags=["t"])
    assert task is not None and task.status == "error" and task.attempt == 2

    fixed = True
    dry = await app.resubmit(ResubmitFilter(task_ids=frozenset({task.uuid})), dry_run=True)
    assert [(r.task_id, r.next_attempt, r.refused) for r in dry] == [(task.uuid, 3, None)]
    assert kinds(log_events(app, task.uuid))[-1] == "Failed", "a dry run wrote something"

    [chosen] = await app.resubmit(ResubmitFilter(task_name="fetch"), reason="cause fixed")
    assert chosen.event is not None and chosen.event.attempt == 3
    done = await eventually(
        lambda: app.get(task.uuid),
        lambda t: t is not None and t.status == "success",
        what="the resubmitted attempt succeeded",
    )
    assert done is not None
    assert (done.returning, done.attempt, done.error_type, done.tags) == (
        "HTTP://X",
        3,
        None,
        ["t"],
    )

    history = await app.history(task.uuid)
    assert kinds(history) == [
        "Submitted",
        "Scheduled",
        "Started",
        "RetryScheduled",
        "Released",
        "Started",
        "Failed",
        "Resubmitted",
        "Released",
        "Started",
        "Succeeded",
    ]
    assert [e.attempt for e in history] == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    resubmitted = history[7].payload
    assert resubmitted.reason == "cause fixed"  # type: ignore[union-attr]
    assert resubmitted.previous_status == "error"  # type: ignore[union-attr]

    document = history_document(task.uuid, app.topology.events, history)
    assert document["status"] == "success"
    attempts = {a["attempt"]: a for a in document["attempts"]}
    assert sorted(attempts) == [0, 1, 2, 3]
    assert [attempts[n]["outcome"] for n in (1, 2, 3)] == ["RetryScheduled", "Failed", "Succeeded"]
    assert attempts[2]["error"] == {"type": "OSError", "message": "http://x is down"}
    assert attempts[3]["error"] is None and attempts[3]["worker_id"].startswith("worker:")
    assert all(attempts[n]["duration_ms"] >= 0 for n in (1, 2, 3))

    # The task at past moments, folded from the log.
    assert await app.get(task.uuid, as_of=history[0].at_us / 1_000_000 - 1) is None
    then = await app.get(task.uuid, as_of=between(history, "RetryScheduled"))
    assert then is not None and (then.status, then.attempt) == ("retry", 1)
    moment = datetime.fromtimestamp(between(history, "Failed"), tz=UTC)
    then = await app.get(task.uuid, as_of=moment)
    assert then is not None and (then.status, then.attempt) == ("error", 2)
    assert then.error_message == "http://x is down"
    then = await app.get(task.uuid, as_of=moment.isoformat())
    assert then is not None and then.status == "error"
    assert document["state"]["status"] == (await app.get(task.uuid, as_of=now_s())).status  # type: ignore[union-attr]

    # A task that ended well is not resubmitted; an explicit id says why.
    [refused] = await app.resubmit(ResubmitFilter(task_ids=frozenset({task.uuid})))
    assert refused.event is None and "status success" in (refused.refused or "")
    [unknown] = await app.resubmit(ResubmitFilter(task_ids=frozenset({"nope"})))
    assert unknown.refused == "no events in the log"


def now_s() -> float:
    return datetime.now(UTC).timestamp() + 1


async def test_resubmit_filters_choose_among_ended_tasks(build: Callable[..., QueueTasks]) -> None:
    app = build()

    @app.task
    def boom(n: int) -> None:
        raise ValueError(n)

    @app.task
    def other(n: int) -> None:
        raise KeyError(n)

    @app.task
    def fine(n: int) -> int:
        return n

    await app.start()
    first = [await app.add_task("boom", i, timeout=LIMIT) for i in range(2)]
    cut = datetime.now(UTC).timestamp()
    later = [await app.add_task("boom", i, timeout=LIMIT) for i in range(2, 4)]
    odd = await app.add_task("other", 9, timeout=LIMIT)
    ok = await app.add_task("fine", 1, timeout=LIMIT)
    assert all(t is not None and t.status == "error" for t in [*first, *later, odd])
    assert ok is not None and ok.status == "success"

    def ids(found: list[Any]) -> set[str]:
        return {r.task_id for r in found if r.event is not None}

    everything = await app.resubmit(dry_run=True)
    assert ids(everything) == {t.uuid for t in [*first, *later, odd]}  # type: ignore[union-attr]
    by_name = await app.resubmit(ResubmitFilter(task_name="boom"), dry_run=True)
    assert ids(by_name) == {t.uuid for t in [*first, *later]}  # type: ignore[union-attr]
    since = await app.resubmit(
        ResubmitFilter(task_name="boom", since_us=int(cut * 1_000_000)), dry_run=True
    )
    assert ids(since) == {t.uuid for t in later}  # type: ignore[union-attr]
    until = await app.resubmit(ResubmitFilter(until_us=int(cut * 1_000_000)), dry_run=True)
    assert ids(until) == {t.uuid for t in first}  # type: ignore[union-attr]
    timeouts = await app.resubmit(ResubmitFilter(statuses=frozenset({"timeout"})), dry_run=True)
    assert ids(timeouts) == set()
    await settle(app)
    assert all(e.kind != "Resubmitted" for e in log_events(app)), "a dry run wrote something"


async def test_history_and_resubmit_survive_a_restart(build: Callable[..., QueueTasks]) -> None:
    log = InMemoryEventLog()
    registry = SchemaRegistryClient.new_client({"url": f"mock://audit-{uuid.uuid4().hex}"})
    attempts: list[int] = []

    def make() -> QueueTasks:
        app = build("audit-restart", event_log=log, schema_registry=registry)

        async def body(ctx: Any, fail_until: int) -> int:
            attempts.append(ctx.attempt)
            if ctx.attempt <= fail_until:
                raise OSError(f"attempt {ctx.attempt}")
            return int(ctx.attempt)

        # Its retry comes due after the restart (jitter shortens a backoff by half at most).
        @app.task(echo=True, retry=1, retry_on_exc=[OSError], retry_backoff=1.0)
        async def slow_retry(self: Any, fail_until: int) -> int:
            return await body(self.ctx, fail_until)

        @app.task(echo=True, retry=1, retry_on_exc=[OSError], retry_backoff=0.01)
        async def quick_retry(self: Any, fail_until: int) -> int:
            return await body(self.ctx, fail_until)

        return app

    first = make()
    await first.start()
    failed = await first.add_task("quick_retry", 2, timeout=LIMIT)
    assert failed is not None and failed.status == "error"
    retried = await first.add_task("slow_retry", 1)
    assert retried is not None
    await eventually(
        lambda: kinds(log_events(first, retried.uuid)),
        lambda k: "RetryScheduled" in k,
        what="the first attempt asked for a retry",
    )
    async with asyncio.timeout(LIMIT):
        await first.close()
    assert kinds(log_events(first, retried.uuid))[-1] == "RetryScheduled", "retried too early"

    second = make()
    await second.start()
    assert (await finished(second, retried.uuid)).status == "success"
    [chosen] = await second.resubmit(ResubmitFilter(task_ids=frozenset({failed.uuid})))
    assert chosen.event is not None and chosen.event.attempt == 3
    await eventually(
        lambda: second.get(failed.uuid),
        lambda t: t is not None and t.status == "success" and t.attempt == 3,
        what="the resubmitted task succeeded after the restart",
    )
    await settle(second)
    history = await second.history(retried.uuid)
    assert kinds(history) == [
        "Submitted",
        "Scheduled",
        "Started",
        "RetryScheduled",
        "Released",
        "Started",
        "Succeeded",
    ]
    assert [e.attempt for e in history if e.kind == "Started"] == [1, 2]
    history = await second.history(failed.uuid)
    assert [e.attempt for e in history if e.kind == "Started"] == [1, 2, 3]
    assert kinds(history).count("Released") == 2 and kinds(history)[-1] == "Succeeded"
    assert sorted(attempts) == [1, 1, 2, 2, 3]


async def test_history_command_prints_attempts_and_the_past(
    build: Callable[..., QueueTasks], capsys: pytest.CaptureFixture[str]
) -> None:
    from qtasks_stream.cli.audit import history as history_command

    log = InMemoryEventLog()
    registry = SchemaRegistryClient.new_client({"url": f"mock://hist-{uuid.uuid4().hex}"})
    app = build("hist", event_log=log, schema_registry=registry)

    @app.task(retry=1, retry_on_exc=[OSError], retry_backoff=0.01)
    async def down() -> None:
        raise OSError("still down")

    await app.start()
    task = await app.add_task("down", timeout=LIMIT)
    assert task is not None and task.status == "error"
    events = await app.history(task.uuid)

    def tool() -> QueueTasks:
        return build("hist", event_log=log, schema_registry=registry)

    assert await history_command(tool(), task.uuid, False, None) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == f"task {task.uuid} (down): error, attempt 2"
    assert [line.split("  ")[0] for line in text if line.startswith("attempt")] == [
        "attempt 0 (before the first attempt, client requests)",
        "attempt 1",
        "attempt 2",
    ]
    assert "→ RetryScheduled" in text[3] and "OSError: still down" in text[3]
    assert "→ Failed" in next(line for line in text if line.startswith("attempt 2"))

    at = str(between(events, "RetryScheduled"))
    assert await history_command(tool(), task.uuid, True, at) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["status"], document["attempt"]) == ("retry", 1)
    assert [a["attempt"] for a in document["attempts"]] == [0, 1]
    assert document["as_of"] is not None

    early = str(events[0].at_us / 1_000_000 - 60)
    assert await history_command(tool(), task.uuid, False, early) == 1
    assert "had no events yet" in capsys.readouterr().err
    assert await history_command(tool(), str(uuid.uuid4()), False, None) == 1
