"""Bounded waits and log reading shared by the end-to-end suites."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from qtasks_stream import QueueTasks
from qtasks_stream.errors import SerdeError
from qtasks_stream.events import TaskEvent
from qtasks_stream.records import Record

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    ok: Callable[[T], bool] = bool,
    *,
    what: str,
    limit: float,
    interval: float = 0.01,
) -> T:
    """Poll ``probe`` until ``ok`` holds for its value; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if ok(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit}s: {what} (last: {value!r})")
        await asyncio.sleep(interval)


def kinds(events: list[TaskEvent]) -> list[str]:
    return [e.kind for e in events]


def decodable_events(
    app: QueueTasks, records: Iterable[Record], task_id: str | None = None
) -> list[TaskEvent]:
    """The events among ``records`` of the events topic that decode (one task's, if given),
    in the order given; undecodable ones (garbage, tombstones) are left out."""
    topic = app.topology.events
    out = []
    for rec in records:
        if rec.value is None or (task_id is not None and rec.key != task_id.encode()):
            continue
        try:
            out.append(TaskEvent.from_avro(app.serde.decode(topic, rec.value)))
        except SerdeError:
            continue
    return out
