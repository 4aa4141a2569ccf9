"""The app the trigger test runs in `qtasks-stream worker` processes: one task per record of
the topic named by ``TRIGGER_TOPIC`` (Avro, written with a schema the app has never seen);
each body appends ``<task id> <pid>`` to the file named
by ``TRIGGER_SIDE_EFFECTS``."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from qtasks_stream import QueueTasks, current
from qtasks_stream.triggers import Topic


def build(topic: str) -> QueueTasks:
    app = QueueTasks("trig", partitions=4, concurrency=16, shutdown_grace=2.0)
    app.task(name="ship", trigger=Topic(topic, value="avro"))(ship)
    return app


async def ship(order: Any) -> None:
    path = os.environ.get("TRIGGER_SIDE_EFFECTS")
    if path:
        line = f"{current().task_id} {os.getpid()}\n"
        await asyncio.to_thread(_append, path, line)


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(line)


app = build(os.environ.get("TRIGGER_TOPIC", "trigger.orders"))
