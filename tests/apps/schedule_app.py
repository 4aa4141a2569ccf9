"""The app the schedules Kafka test runs in several `qtasks-stream worker` processes.

Each run appends ``<task id> <pid>`` to the file named by ``SCHEDULE_SIDE_EFFECTS``.
"""

from __future__ import annotations

import asyncio
import os

from qtasks_stream import QueueTasks, current


def build() -> QueueTasks:
    app = QueueTasks("sched", partitions=2, concurrency=4, shutdown_grace=2.0)
    app.task(name="beat")(beat)
    return app


async def beat(n: int = 0) -> int:
    path = os.environ.get("SCHEDULE_SIDE_EFFECTS")
    if path:
        await asyncio.to_thread(_append, path, f"{current().task_id} {os.getpid()}\n")
    return n


app = build()


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(line)
