"""The app the workflow Kafka test runs in `qtasks-stream worker` processes.

Each body appends a line (task id, attempt, pid) to the file named by ``EOS_SIDE_EFFECTS``
when it finishes, so the test can count how often a step ran to success.
"""

from __future__ import annotations

import asyncio
import os

from qtasks_stream import QueueTasks, current

app = QueueTasks("wfk", partitions=4, concurrency=4, shutdown_grace=2.0)


def _record(kind: str) -> None:
    path = os.environ.get("EOS_SIDE_EFFECTS")
    if path:
        ctx = current()
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{ctx.task_id} {ctx.attempt} {os.getpid()} {kind}\n")


@app.task
async def member(n: int) -> int:
    await asyncio.sleep(0.2)
    await asyncio.to_thread(_record, "member")
    return n * 2


@app.task
async def collect(values: list[int]) -> int:
    await asyncio.to_thread(_record, "callback")
    return sum(values)
