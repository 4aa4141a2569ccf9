"""Console render times: the task list page with 100,000 tasks in a SQLite view (and in
PostgreSQL with a DSN), and the page of a task of 50 attempts, each beside its baseline.

- list page: ``GET /`` (one page of 50 rows plus the counts by status), ``GET /?status=error``
  and a page deep in the list (by cursor), rendered by the console through httpx's ASGI
  transport (no socket), beside the raw view calls the page makes (``page`` + ``counts``).
  The view is filled fast: states written straight through the store's API
  (``ViewStore.seed``), not folded from a log.
- task page: ``GET /tasks/ID`` of a task of 50 attempts (each Released, Started,
  RetryScheduled; then Failed), whose ~150 events are in the embedded log, beside
  ``app.history(ID)`` alone (the log read the page makes).

Every measurement runs ``--rounds`` times; the median and the worst are printed. The
target for the list page is under 300 ms.

    python -m bench.bench_console
    python -m bench.bench_console --postgres postgresql://qtasks@127.0.0.1:15432/qtasks
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from qtasks_stream import QueueTasks
from qtasks_stream.console.server import console_app
from qtasks_stream.console.settings import ConsoleSettings
from qtasks_stream.events import (
    Failed,
    Payload,
    Released,
    RetryScheduled,
    Started,
    Submitted,
    TaskEvent,
    as_record,
    new_task_id,
    now_us,
)
from qtasks_stream.records import TopicPartition
from qtasks_stream.state import TaskState
from qtasks_stream.views.base import TaskQuery, ViewStore
from qtasks_stream.views.sqlite import SqliteViewStore

TARGET_MS = 300.0
STATUSES = (
    ["success"] * 90
    + ["error"] * 4
    + ["process", "retry", "scheduled", "new"] * 1
    + [
        "dead_letter",
        "cancel",
    ]
)
NAMES = ["charge", "ship", "email", "report"]
TOKEN = "bench-console-token-0123"


def states(count: int) -> list[TaskState]:
    """``count`` task states a minute apart's worth of microseconds, statuses mostly success."""
    rng = random.Random(7)
    start = now_us() - count * 1000
    out = []
    for i in range(count):
        status = rng.choice(STATUSES)
        out.append(
            TaskState(
                task_id=str(uuid.UUID(int=rng.getrandbits(128))),
                task_name=rng.choice(NAMES),
                status=status,
                args=f"[{i}]",
                result="null" if status != "success" else f"{i * 2}",
                error_type="RuntimeError" if status == "error" else None,
                error_message="upstream said no" if status == "error" else None,
                attempt=1,
                created_us=start + i * 1000,
                updated_us=start + i * 1000 + 500,
                tags=[f"batch-{i % 100}"],
                submitted=True,
                events=4,
            )
        )
    return out


async def timed(call: Callable[[], Awaitable[object]], rounds: int) -> tuple[float, float]:
    """Median and worst of ``rounds`` calls, in ms (one warm-up call first)."""
    await call()
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        await call()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), max(times)


def client(app: QueueTasks) -> httpx.AsyncClient:
    settings = ConsoleSettings(TOKEN, public_reads=True)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=console_app(app, settings)), base_url="http://bench"
    )


def line(what: str, figures: tuple[float, float], note: str = "") -> None:
    median, worst = figures
    print(f"  {what:<44} median {median:8.1f} ms   worst {worst:8.1f} ms  {note}")


async def list_page(label: str, view: ViewStore, tasks: int, rounds: int) -> None:
    await view.start()
    filled = states(tasks)
    began = time.perf_counter()
    await view.seed(filled, {TopicPartition("bench.events", 0): 1})
    print(f"{label}: {tasks:,} tasks written in {time.perf_counter() - began:.1f} s")
    app = QueueTasks("bench", view=view)
    middle = f"{filled[tasks // 2].created_us}:{filled[tasks // 2].task_id}"
    async with client(app) as http:

        async def get(path: str) -> None:
            response = await http.get(path)
            assert response.status_code == 200, response.text[:300]

        async def raw(query: TaskQuery) -> None:
            await view.page(query)
            await view.counts()

        for what, path, query in [
            ("first page", "/", TaskQuery(limit=50)),
            ("status=error", "/?status=error", TaskQuery(status="error", limit=50)),
            (
                "page after the middle (cursor)",
                f"/?after={middle}",
                TaskQuery(limit=50, after=middle),
            ),
        ]:
            page = await timed(lambda p=path: get(p), rounds)  # type: ignore[misc]
            base = await timed(lambda q=query: raw(q), rounds)  # type: ignore[misc]
            verdict = "meets" if page[0] < TARGET_MS else "MISSES"
            line(f"list page, {what}", page, f"{verdict} the {TARGET_MS:.0f} ms target")
            line(
                "  baseline: view.page + view.counts",
                base,
                f"page/baseline {page[0] / base[0]:.1f}x",
            )
    await view.close()


async def task_page(attempts: int, rounds: int) -> None:
    app = QueueTasks("bench")
    app.task(name="flaky")(_flaky)
    await app.connect()
    task_id = new_task_id()
    topic = app.topology.events
    at = now_us()

    def event(attempt: int, source: str, payload: Payload, moment: int) -> TaskEvent:
        made = TaskEvent.new(task_id, "flaky", attempt, source, payload)
        return dataclasses.replace(made, at_us=moment)

    events = [event(0, "client", Submitted('["x"]', "{}", 0), at)]
    for n in range(1, attempts + 1):
        at += 1000
        events.append(event(n, "scheduler", Released(0), at))
        events.append(event(n, "worker:w1", Started("w1"), at + 10))
        outcome: Payload = (
            RetryScheduled(n + 1, at + 500, "IOError", "flaky", "Traceback ...", 5.0)
            if n < attempts
            else Failed("IOError", "flaky", "Traceback (most recent call last): ...", 5.0)
        )
        events.append(event(n, "worker:w1", outcome, at + 20))
    await app.event_log.producer().send([as_record(app.serde, topic, task_id, e) for e in events])
    async with client(app) as http:

        async def get() -> None:
            response = await http.get(f"/tasks/{task_id}")
            assert response.status_code == 200 and 'data-attempt="50"' in response.text

        page = await timed(get, rounds)
        base = await timed(lambda: app.history(task_id), rounds)
    print(f"task page, {attempts} attempts ({len(events)} events), embedded log:")
    line("task page", page)
    line("  baseline: app.history (the log read)", base, f"page/baseline {page[0] / base[0]:.1f}x")
    await app.close()


async def _flaky(x: str) -> str:
    return x


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--attempts", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--postgres", default=os.environ.get("QTASKS_TEST_POSTGRES_DSN"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        await list_page(
            "SQLite", SqliteViewStore(Path(folder) / "view.db"), args.tasks, args.rounds
        )
    if args.postgres:
        from qtasks_stream.views.postgres import PostgresViewStore

        schema = f"bench_{uuid.uuid4().hex[:8]}"
        try:
            await list_page(
                f"PostgreSQL (schema {schema})",
                PostgresViewStore(args.postgres, schema=schema),
                args.tasks,
                args.rounds,
            )
        finally:
            dropper = PostgresViewStore(args.postgres, schema=schema, pool_size=1)
            await dropper.start()
            await dropper.drop()
            await dropper.close()
    else:
        print("PostgreSQL: skipped (no --postgres DSN nor QTASKS_TEST_POSTGRES_DSN)")
    await task_page(args.attempts, args.rounds)


if __name__ == "__main__":
    asyncio.run(main())
