"""The app the console tests look at: tasks that succeed, fail with retries, report progress,
run until cancelled, one in a queue of its own, and one whose submits the stages cannot read
while ``BROKEN`` holds its name (how a test makes a dead letter, then "fixes the cause" and
replays it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qtasks_stream import QueueTasks
from qtasks_stream.errors import SerdeError
from qtasks_stream.serde.base import Serde

#: Task names whose ``Submitted`` events the stages cannot decode (a deployment's bug).
BROKEN: set[str] = set()


class UnreadableSubmits(Serde):
    """A serde that refuses the submits of the tasks named in :data:`BROKEN`."""

    def __init__(self, inner: Serde) -> None:
        self.inner = inner

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def encode(self, topic: str, value: dict[str, Any]) -> bytes:
        return self.inner.encode(topic, value)

    def decode(self, topic: str, data: bytes, *, branch: str | None = None) -> dict[str, Any]:
        value = self.inner.decode(topic, data, branch=branch)
        payload = value.get("payload")
        if (
            isinstance(payload, tuple)
            and payload[0].endswith(".Submitted")
            and value["task_name"] in BROKEN
        ):
            raise SerdeError(f"this build cannot read submits of {value['task_name']!r}")
        return value


@dataclass
class Order:
    """A typed argument and result: they travel as Avro records."""

    id: int
    note: str


def build(name: str = "console", **options: Any) -> QueueTasks:
    app = QueueTasks(name, shutdown_grace=1.0, **options)

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(retry=2, retry_on_exc=[RuntimeError], retry_backoff=0.01)
    def fails(message: str) -> None:
        raise RuntimeError(message)

    @app.task
    def count(n: int) -> Iterator[int]:
        yield from range(n)

    @app.task
    async def sleepy(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "woke"

    @app.task
    async def later() -> str:
        return "late"

    @app.task(queue="reports")
    async def report(title: str) -> str:
        return f"report {title}"

    @app.task
    async def receipt(order: Order) -> Order:
        return Order(order.id + 1, order.note.upper())

    return app


def with_unreadable_submits(app: QueueTasks) -> QueueTasks:
    app.serde = UnreadableSubmits(app.serde)
    return app
