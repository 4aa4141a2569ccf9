"""What a chain step and a chord join cost, beside a plain task, in the same run.

On the embedded default (or on the deployment the environment configures, with
``--from-env``), one app runs every stage. Measured, each as the median of ``--rounds``:

- plain task: ``add_task(..., timeout=)`` of a no-op, submit to result;
- chain step: a chain of ``--steps`` no-ops, submit to result, divided by the steps (each
  step after the first waits for the workflow stage to read the one before it end);
- group: ``--members`` no-ops in parallel, submit to the last result;
- chord join: a chord of the same members and a no-op callback, less the group: the fold of
  the members' ends and the callback's submit and run.

    python -m bench.bench_workflows --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

from qtasks_stream import QueueTasks
from qtasks_stream.workflows import chain, chord, group


async def median_ms(rounds: int, run: Callable[[], Awaitable[None]]) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await run()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


async def main(rounds: int, steps: int, members: int, from_env: bool) -> None:
    app = QueueTasks.from_env("wfbench") if from_env else QueueTasks("wfbench", concurrency=64)

    @app.task
    async def noop(i: int) -> int:
        return i

    @app.task
    async def total(values: list[int]) -> int:
        return sum(values)

    async def plain() -> None:
        task = await app.add_task("noop", 1, timeout=60)
        assert task is not None and task.status == "success"

    async def one_chain() -> None:
        handle = await app.run_workflow(chain(noop.s(1), *(noop.s() for _ in range(steps - 1))))
        result = await handle.result(60)
        assert result is not None and result.status == "success"

    async def one_group() -> None:
        handle = await app.run_workflow(group(*(noop.s(i) for i in range(members))))
        result = await handle.result(60)
        assert result is not None and result.status == "success"

    async def one_chord() -> None:
        handle = await app.run_workflow(chord([noop.s(i) for i in range(members)], total.s()))
        result = await handle.result(60)
        assert result is not None and result.value == sum(range(members))

    async with app:
        for warm in (plain, one_chain, one_chord):
            await warm()
        plain_ms = await median_ms(rounds, plain)
        chain_ms = await median_ms(rounds, one_chain)
        group_ms = await median_ms(rounds, one_group)
        chord_ms = await median_ms(rounds, one_chord)
    where = os.environ.get("QTASKS_EVENT_LOG", "memory") if from_env else "embedded default"
    print(f"workflows on {where}, median of {rounds} rounds")
    print(f"  plain task (submit to result)        {plain_ms:8.2f} ms")
    print(f"  chain of {steps} steps                    {chain_ms:8.2f} ms")
    print(f"  per chain step                       {chain_ms / steps:8.2f} ms")
    print(f"  group of {members} members                 {group_ms:8.2f} ms")
    print(f"  chord of {members} members + callback      {chord_ms:8.2f} ms")
    print(f"  chord join (chord less group)        {chord_ms - group_ms:8.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--from-env", action="store_true", help="QueueTasks.from_env")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.steps, args.members, args.from_env))
