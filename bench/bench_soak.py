"""Soak: many tasks at a steady rate with the worker apart, and each process's memory.

The stages run in a ``qtasks-stream worker`` process and this process is the client (as
deployed). Tasks are submitted at ``--rate`` per second (at most ``--window`` in flight),
each awaited; every ``--sample`` tasks the resident set size of both processes is read
from /proc. The target (issue 16): from 50,000 tasks to the end (200,000) each process's
RSS grows by no more than 10%. CPU per task of each process is printed beside it.

The worker keeps the app's view: in memory by default, which holds every task and so grows
with the run by design; ``--view-url`` (``QTASKS_VIEW_URL`` of the worker) gives it a
durable one, as a deployment would, so what grows is what the pipeline itself keeps.

    python -m bench.bench_soak --bootstrap 127.0.0.1:19092 \\
        --registry http://127.0.0.1:18081/apis/ccompat/v7 --tasks 200000 --rate 400
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path

from bench.bench_idle import process_cpu
from bench.bench_kafka import (
    EVENT_LOGS,
    TASK_TIMEOUT,
    broker_arguments,
    cleanup,
    close_registry,
    kafka_config,
    make_registry,
    noop_app,
    start_worker,
    stop_worker,
    warm_up,
)

GROWTH_TARGET = 0.10
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (from /proc/<pid>/statm)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE / 1e6


async def soak(args: argparse.Namespace) -> int:
    config = kafka_config(args.bootstrap)
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    registry = make_registry(args.registry, f"soak-{prefix}")
    app = noop_app("bench", args.event_log, config, registry, prefix)
    worker = start_worker(args.event_log, config, args.registry, prefix, args.concurrency)
    me = os.getpid()
    samples: list[tuple[int, float, float, float, float, float]] = []
    slots = asyncio.Semaphore(args.window)
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        try:
            task = await app.add_task("noop", i, timeout=TASK_TIMEOUT)
            if task is None or task.status != "success":
                raise RuntimeError(f"task {i} did not succeed: {task}")
            done += 1
        finally:
            slots.release()

    try:
        await warm_up(app, args.event_log)
        print(
            f"{args.event_log}: {args.tasks} tasks at {args.rate}/s, {args.window} in flight "
            f"at most, worker view {args.view_url or 'in memory'}\n"
            f"  "
            f"worker process {worker.pid}; RSS MB and CPU us/task per {args.sample}",
            flush=True,
        )
        started, cpu, worker_cpu = time.perf_counter(), time.process_time(), 0.0
        worker_cpu = process_cpu(worker.pid)
        last = (started, time.process_time(), worker_cpu, 0)
        async with asyncio.TaskGroup() as group:
            for i in range(args.tasks):
                # A steady rate: task i goes at started + i / rate (or when a slot frees).
                delay = started + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                group.create_task(one(i))
                if (i + 1) % args.sample == 0:
                    now, c, w = time.perf_counter(), time.process_time(), process_cpu(worker.pid)
                    n = i + 1 - last[3]
                    row = (
                        i + 1,
                        rss_mb(me),
                        rss_mb(worker.pid),
                        (c - last[1]) / n * 1e6,
                        (w - last[2]) / n * 1e6,
                        n / (now - last[0]),
                    )
                    samples.append(row)
                    last = (now, c, w, i + 1)
                    print(
                        f"  {row[0]:>8} tasks  client {row[1]:7.1f} MB {row[3]:6.0f} us/task  "
                        f"worker {row[2]:7.1f} MB {row[4]:6.0f} us/task  {row[5]:6.0f} tasks/s",
                        flush=True,
                    )
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        worker_cpu = process_cpu(worker.pid) - worker_cpu
    finally:
        await app.close()
        stop_worker(worker)
        close_registry(registry)
        await cleanup(config, args.registry, app.topology, keep=False)
    print(
        f"{done} tasks in {elapsed:.0f}s = {done / elapsed:.0f} tasks/s; CPU per task: client "
        f"{cpu / done * 1e6:.0f} us, worker {worker_cpu / done * 1e6:.0f} us"
    )
    return report(samples, args.tasks)


def report(samples: list[tuple[int, float, float, float, float, float]], tasks: int) -> int:
    """Growth of each process's RSS from the sample nearest 1/4 of the run to the last."""
    if len(samples) < 2:
        print("too few samples for a growth figure")
        return 1
    quarter = min(samples, key=lambda s: abs(s[0] - tasks // 4))
    end = samples[-1]
    failed = 0
    for name, col in (("client", 1), ("worker", 2)):
        growth = end[col] / quarter[col] - 1
        met = growth <= GROWTH_TARGET
        failed += not met
        print(
            f"{name}: RSS {quarter[col]:.1f} MB at {quarter[0]} tasks -> {end[col]:.1f} MB at "
            f"{end[0]}: {growth:+.1%} (target <= +{GROWTH_TARGET:.0%}: "
            f"{'met' if met else 'NOT met'})"
        )
    return 0 if not failed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    broker_arguments(parser)
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=400.0, help="tasks submitted per second")
    parser.add_argument("--window", type=int, default=256, help="tasks in flight at most")
    parser.add_argument("--concurrency", type=int, default=64, help="worker slots")
    parser.add_argument("--sample", type=int, default=10_000, help="tasks between samples")
    parser.add_argument("--event-log", choices=EVENT_LOGS, default="confluent")
    parser.add_argument("--view-url", default="", help="the worker's view (QTASKS_VIEW_URL)")
    args = parser.parse_args()
    if not args.bootstrap:
        parser.error("give --bootstrap or set QTASKS_BOOTSTRAP_SERVERS")
    if not (args.registry or "").startswith("http"):
        parser.error("the worker process needs a real schema registry (--registry)")
    if args.tasks < 4 * args.sample or args.rate <= 0 or args.window <= 0:
        parser.error("--tasks must be >= 4 x --sample, --rate and --window > 0")
    if args.view_url:
        # The worker process inherits this process's environment (start_worker).
        os.environ["QTASKS_VIEW_URL"] = args.view_url
    return asyncio.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
