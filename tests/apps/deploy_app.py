"""The app of the deployment test: one module that a worker process loads with ``-A`` (the CLI
moves it onto the environment's settings) and that a client builds with its own settings."""

from __future__ import annotations

from qtasks_stream import QueueTasks, Settings


def build(settings: Settings | None = None) -> QueueTasks:
    app = QueueTasks("deploy", partitions=2, settings=settings)
    app.task(name="square")(square)
    return app


async def square(n: int) -> int:
    return n * n


app = build()
