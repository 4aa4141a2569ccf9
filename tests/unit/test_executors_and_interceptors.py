"""The process executor (CPU-bound work, hard stops) and interceptors around execution and steps."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from qtasks_stream import ExecuteInput, Interceptor, QueueTasks, StepInput
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.executors.base import Call
from qtasks_stream.executors.pool import LocalExecutor, ProcessExecutor
from tests.apps.cpu import spin, square


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
