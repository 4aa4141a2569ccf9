"""The app the exactly-once test runs in several `qtasks-stream worker` processes.

Each body appends one line to the side-effect file named by ``EOS_SIDE_EFFECTS`` when it
finishes, so the test can count how often a body ran to success in which process.
"""

from __future__ import annotations

import asyncio
import os

from qtasks_stream import QueueTasks


def build() -> QueueTasks:
    app = QueueTasks("eos", partitions=4, concurrency=8, shutdown_grace=2.0)
    app.task(name="work")(work)
    return app


async def work(n: int) -> int:
    await asyncio.sleep(0.05)
    path = os.environ.get("EOS_SIDE_EFFECTS")
    if path:
        from qtasks_stream import current

        ctx = current()
        await asyncio.to_thread(_append, path, f"{ctx.task_id} {ctx.attempt} {os.getpid()}\n")
    return n * 2


app = build()


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(line)
