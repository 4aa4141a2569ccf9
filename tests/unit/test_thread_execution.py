"""Sync functions on the embedded default: a cancel or a timeout ends the attempt at once,
the thread that cannot be stopped is counted and logged, and ``max_time`` counts execution
only (not the wait for a free thread or process)."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from qtasks_stream import QueueTasks
from qtasks_stream.executors.pool import LocalExecutor, ProcessExecutor
from tests.apps.cpu import nap
from tests.e2ehelpers import eventually

LIMIT = 10.0


def _none(n: int) -> bool:
    return n == 0


async def test_cancel_of_a_running_sync_task_ends_it_cancelled_and_discards_its_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "qtasks_stream.executor")
    started, release = threading.Event(), threading.Event()
    executor = LocalExecutor(threads=2)
    app = QueueTasks("cancel-sync", executor=executor)

    @app.task
    def stubborn() -> str:  # never looks at ctx.cancelled
        started.set()
        release.wait(LIMIT)
        return "done anyway"

    async with app:
        task = await app.add_task("stubborn")
        assert task is not None
        assert await asyncio.to_thread(started.wait, LIMIT)
        await app.cancel(task.uuid, reason="enough")
        ended = await app.wait(task.uuid, timeout=3)
        assert ended is not None and ended.status == "cancel", ended
        assert ended.cancel_reason == "enough"
        assert executor.abandoned == 1 and executor.abandoned_total == 1
        release.set()
        await eventually(lambda: executor.abandoned, _none, what="thread returned", limit=LIMIT)
        later = await app.get(task.uuid)
        assert later is not None and later.status == "cancel" and later.returning is None
        kinds = [e.kind for e in await app.history(task.uuid)]
        assert kinds[-1] == "Cancelled" and "Succeeded" not in kinds
    discarded = [r.getMessage() for r in caplog.records if "discarded" in r.getMessage()]
    assert len(discarded) == 1 and task.uuid in discarded[0] and "stubborn" in discarded[0]


async def test_timed_out_threads_are_counted_and_max_time_counts_execution_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "qtasks_stream.executor")
    release = threading.Event()
    executor = LocalExecutor(threads=2)
    app = QueueTasks("starved", executor=executor)

    @app.task(max_time=0.2)
    def hog() -> None:
        release.wait(LIMIT)

    @app.task(max_time=0.3)
    def quick() -> str:
        return "ran"

    async with app:
        hogs = [await app.add_task("hog") for _ in range(2)]
        for hog_task in hogs:
            assert hog_task is not None
            ended = await app.wait(hog_task.uuid, timeout=LIMIT)
            assert ended is not None and ended.status == "timeout"
        assert executor.abandoned == 2
        held = [r.getMessage() for r in caplog.records if "threads held" in r.getMessage()]
        assert len(held) == 2 and all("hog" in line for line in held)

        # Both threads are held: the quick task waits for one, longer than its max_time.
        waiting = await app.add_task("quick")
        assert waiting is not None
        assert await app.wait(waiting.uuid, timeout=1.0) is None
        release.set()
        done = await app.wait(waiting.uuid, timeout=LIMIT)
        assert done is not None and (done.status, done.returning) == ("success", "ran")
        await eventually(lambda: executor.abandoned, _none, what="threads returned", limit=LIMIT)
        assert executor.abandoned_total == 2


async def test_max_time_on_the_process_executor_does_not_count_the_wait_for_a_process() -> None:
    app = QueueTasks("proc-wait", executor=ProcessExecutor(processes=1))
    app.task(name="nap", max_time=1.0)(nap)
    async with app:
        # One process: the fourth call waits about 0.9s for it, then runs 0.3s.
        tasks = await asyncio.gather(*(app.add_task("nap", 0.3, timeout=LIMIT) for _ in range(4)))
    assert [t.status for t in tasks if t] == ["success"] * 4
