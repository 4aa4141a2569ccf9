"""The app the secured-broker tests run: one task, so its ACLs are the whole topology's."""

from __future__ import annotations

from qtasks_stream import QueueTasks


def build() -> QueueTasks:
    app = QueueTasks("sec", partitions=2, lanes=2)
    app.task(name="double")(double)
    return app


async def double(n: int) -> int:
    return n * 2


app = build()
