"""Memory of a long-running embedded app: RSS at intervals over many no-op tasks.

Prints, every ``--every`` tasks, the process RSS beside what grows with tasks: the records
the in-memory log holds, the ended tasks the scheduler remembers (both bounded by the events
retention) and the tasks the view holds (the memory view keeps every task: it is the task
store). Run it with a short retention to see the log level off, and with ``--retention-ms
-1`` (keep forever, the growth issue 12.11 saw) for comparison; ``--view sqlite`` keeps the
tasks on disk instead of in memory.

    python -m bench.bench_embedded_memory --tasks 30000 --retention-ms 5000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from qtasks_stream import QueueTasks
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.stages.scheduler import SchedulerStage
from qtasks_stream.views.url import open_view


def rss_mb() -> float:
    """The resident set size now (not the peak), from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def run(tasks: int, every: int, window: int, retention_ms: int, view_url: str) -> None:
    log = InMemoryEventLog()
    app = QueueTasks(
        "mem", event_log=log, retention_ms=retention_ms, view=open_view(view_url), concurrency=64
    )

    @app.task(name="noop")
    async def noop(i: int) -> int:
        return i

    slots = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with slots:
            done = await app.add_task("noop", i, timeout=120)
            assert done is not None and done.status == "success", done

    def report(done: int, started: float) -> None:
        topics = app.topology.specs()
        held = sum(len(log.records(spec.name)) for spec in topics)
        scheduler = app.runners["scheduler"].stage
        assert isinstance(scheduler, SchedulerStage)
        ended = scheduler.held()["ended"]
        print(
            f"{done:>8} tasks  {time.perf_counter() - started:7.1f} s  RSS {rss_mb():7.1f} MB  "
            f"log records {held:>8}  scheduler ended {ended:>7}",
            flush=True,
        )

    async with app:
        await app.add_task("noop", -1, timeout=30)  # warm up every stage
        started = time.perf_counter()
        print(f"retention_ms={retention_ms} view={view_url} window={window}")
        report(0, started)
        for first in range(0, tasks, every):
            await asyncio.gather(*(one(i) for i in range(first, min(tasks, first + every))))
            report(min(tasks, first + every), started)
        counts = await app.counts()
        # A projector slower than the retention misses deleted events, as it would on Kafka.
        print(f"view holds {sum(counts.values())} tasks")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=30_000)
    parser.add_argument("--every", type=int, default=3_000, help="tasks between two reports")
    parser.add_argument("--window", type=int, default=256, help="tasks in flight")
    parser.add_argument("--retention-ms", type=int, default=5_000)
    parser.add_argument("--view", choices=("memory", "sqlite"), default="memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = "memory://" if args.view == "memory" else f"sqlite:///{tmp}/view.db"
        asyncio.run(run(args.tasks, args.every, args.window, args.retention_ms, url))


if __name__ == "__main__":
    main()
