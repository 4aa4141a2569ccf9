"""The process executor (CPU-bound work, hard stops) and interceptors around execution and steps."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest

from qtasks_stream import ExecuteInput, Interceptor, QueueTasks, StepInput
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.executors.base import Call
from qtasks_stream.executors.pool import LocalExecutor, ProcessExecutor
from tests.apps.cpu import die, nap, spin, square


async def test_process_executor_runs_in_another_process() -> None:
    executor = ProcessExecutor(processes=1)
    try:
        value, pid = await executor.run(Call(square, "sync", (7,), {}), lambda _: None)
    finally:
        await executor.close()
    assert value == 49
    assert pid != os.getpid()


async def test_process_executor_stops_a_runaway_call_hard() -> None:
    executor = ProcessExecutor(processes=1)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await executor.run(Call(spin, "sync", (30.0,), {}), lambda _: None)
        # The spinning process was killed: the next call gets a fresh one and returns at once.
        value, _ = await executor.run(Call(square, "sync", (3,), {}), lambda _: None)
        assert value == 9
        assert time.monotonic() - started < 15
    finally:
        await executor.close()


async def test_process_executor_refuses_coroutines_with_a_clear_error() -> None:
    async def coro() -> None:
        return None

    executor = ProcessExecutor(processes=1)
    with pytest.raises(ConfigurationError, match="plain sync functions"):
        await executor.run(Call(coro, "async", (), {}), lambda _: None)
    await executor.close()


async def test_task_on_the_process_executor_times_out_with_max_time() -> None:
    app = QueueTasks("proc", executor=ProcessExecutor(processes=1))
    app.task(name="spin", max_time=0.5)(spin)
    app.task(name="square")(square)
    async with app:
        slow = await app.add_task("spin", 30.0, timeout=20)
        fast = await app.add_task("square", 4, timeout=20)
    assert slow is not None and slow.status == "timeout"
    assert fast is not None and fast.status == "success" and fast.returning[0] == 16


async def _run_until(executor: ProcessExecutor, seconds: float, deadline: float | None) -> Any:
    try:
        async with asyncio.timeout_at(deadline):
            return await executor.run(Call(nap, "sync", (seconds,), {}), lambda _: None)
    except TimeoutError as exc:
        return exc


async def test_two_calls_of_one_process_pool_timing_out_together_both_time_out() -> None:
    # The first timeout kills the pool; the second used to find it half torn down and end
    # with AttributeError: 'NoneType' object has no attribute 'values'.
    executor = ProcessExecutor(processes=2)
    try:
        for _ in range(3):
            deadline = asyncio.get_running_loop().time() + 0.5
            outcomes = await asyncio.gather(
                _run_until(executor, 2.0, deadline), _run_until(executor, 0.8, deadline)
            )
            assert [type(o) for o in outcomes] == [TimeoutError, TimeoutError]
        value, _ = await executor.run(Call(square, "sync", (5,), {}), lambda _: None)
        assert value == 25
    finally:
        await executor.close()


async def test_a_call_beside_a_killed_one_runs_again_on_the_new_pool() -> None:
    executor = ProcessExecutor(processes=2)
    try:
        loop = asyncio.get_running_loop()
        runaway = asyncio.create_task(_run_until(executor, 5.0, loop.time() + 0.3))
        bystander = asyncio.create_task(_run_until(executor, 0.6, None))
        assert isinstance(await runaway, TimeoutError)
        assert await bystander == 0.6
    finally:
        await executor.close()


async def test_a_process_that_dies_fails_its_call_and_the_next_call_gets_a_new_pool() -> None:
    executor = ProcessExecutor(processes=1)
    try:
        with pytest.raises(BrokenProcessPool):
            await executor.run(Call(die, "sync", (), {}), lambda _: None)
        value, _ = await executor.run(Call(square, "sync", (6,), {}), lambda _: None)
        assert value == 36
    finally:
        await executor.close()


async def test_slow_tasks_timing_out_in_one_process_pool_all_end_timeout() -> None:
    app = QueueTasks("proc-race", executor=ProcessExecutor(processes=2))
    app.task(name="nap", max_time=0.5)(nap)
    async with app:
        for _ in range(3):
            tasks = await asyncio.gather(
                app.add_task("nap", 2.0, timeout=20), app.add_task("nap", 0.8, timeout=20)
            )
            assert [(t.status, t.traceback) for t in tasks if t] == [("timeout", None)] * 2


async def test_local_executor_runs_sync_generators_item_by_item() -> None:
    def gen(n: int) -> Any:
        yield from range(n)

    seen: list[int] = []
    executor = LocalExecutor(threads=1)
    result = await executor.run(Call(gen, "syncgen", (3,), {}), seen.append)
    await executor.close()
    assert result == [0, 1, 2] and seen == [0, 1, 2]


class Recorder(Interceptor):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def execute(self, input: ExecuteInput, next: Any) -> Any:
        self.log.append(f"{self.name}:before:{input.definition.name}:{input.ctx.attempt}")
        result = await next(input)
        self.log.append(f"{self.name}:after:{result}")
        return result * 10

    async def step(self, input: StepInput, next: Any) -> None:
        self.log.append(f"{self.name}:step:{input.stage}")
        await next(input)


async def test_interceptors_wrap_execution_outermost_first_and_see_every_stage_step() -> None:
    log: list[str] = []
    app = QueueTasks("icpt", interceptors=[Recorder("outer", log)])
    app.add_interceptor(Recorder("inner", log))

    @app.task(name="double")
    async def double(n: int) -> int:
        return n * 2

    async with app:
        done = await app.add_task("double", 2, timeout=10)
    assert done is not None and done.returning == 400  # 4, x10 by inner, x10 by outer
    executions = [line for line in log if ":step:" not in line]
    assert executions == [
        "outer:before:double:1",
        "inner:before:double:1",
        "inner:after:4",
        "outer:after:40",
    ]
    steps = {line.split(":step:")[1] for line in log if ":step:" in line}
    assert {"scheduler", "worker", "projector"} <= steps


async def test_interceptors_cannot_be_added_once_stages_run() -> None:
    app = QueueTasks("late")
    async with app:
        with pytest.raises(ConfigurationError, match="before the stages start"):
            app.add_interceptor(Interceptor())


def test_a_closed_process_executor_serves_a_second_event_loop() -> None:
    executor = ProcessExecutor(processes=1)

    async def busy() -> list[Any]:
        try:  # three calls for one process: two wait for it in this loop
            return await asyncio.gather(
                *(executor.run(Call(nap, "sync", (0.05,), {}), lambda _: None) for _ in range(3))
            )
        finally:
            await executor.close()

    assert asyncio.run(busy()) == [0.05] * 3
    assert asyncio.run(busy()) == [0.05] * 3
