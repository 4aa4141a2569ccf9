"""How long reading one task's history from the log takes, on each Kafka event log.

``app.history(uuid)`` (also behind ``wait()`` on a task the view does not know as ended,
``get(as_of=...)`` and ``qtasks-stream history``) reads the task's partition of the events
topic and decodes the records under its key. For each event log this runs ``--tasks`` no-op
tasks through every stage on fresh topics, then times the history of ``--samples`` tasks
spread over the run. Beside it, in the same run, the baseline: the same event log's consumer
(no group) reading that partition from offset 0 to its end, bytes only. The ratio is history
time over baseline time. A history read starts at the offset of the task's submit time
(less a minute), so a run shorter than a minute reads about as much as the baseline.

    python -m bench.bench_history --bootstrap 127.0.0.1:19092 --tasks 3000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from bench.bench_kafka import (
    EVENT_LOGS,
    TASK_TIMEOUT,
    broker_arguments,
    cleanup,
    close_registry,
    kafka_config,
    make_registry,
    noop_app,
    percentile,
)
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.eventlog.partitioning import murmur2_partition
from qtasks_stream.records import TopicPartition

#: Bound on one timed read (seconds).
READ_LIMIT = 60.0


async def bare_read(event_log: EventLog, tp: TopicPartition, partitions: int) -> float:
    """Seconds for a group-less consumer to read ``tp`` from 0 to its end (bytes only)."""
    started = time.perf_counter()
    consumer = event_log.consumer([tp.topic], group_id=None, start="earliest")
    await consumer.start()
    try:
        consumer.pause(
            [TopicPartition(tp.topic, p) for p in range(partitions) if p != tp.partition], True
        )
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, 0)
        position = 0
        deadline = time.monotonic() + READ_LIMIT
        while position < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {tp} took over {READ_LIMIT}s")
            await consumer.poll(max_records=5000, timeout=0.5)
            position = await consumer.position(tp) or 0
    finally:
        await consumer.close()
    return time.perf_counter() - started


async def one_log(
    kind: str, config: KafkaConfig, registry_url: str | None, tasks: int, samples: int
) -> tuple[list[float], list[float], int, int]:
    """(history seconds, baseline seconds, events, partitions of the topic), one event log."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    registry = make_registry(registry_url, f"history-{prefix}")
    app = noop_app("history", kind, config, registry, prefix)

    try:
        async with app:
            window = asyncio.Semaphore(256)

            async def one(i: int) -> str:
                async with window:
                    task = await app.add_task("noop", i, timeout=TASK_TIMEOUT)
                    if task is None or task.status != "success":
                        raise RuntimeError(f"task {i} did not succeed: {task}")
                    return task.uuid

            ids = await asyncio.gather(*(one(i) for i in range(tasks)))
            chosen = ids[:: max(1, len(ids) // samples)][:samples]
            topic, partitions = app.topology.events, app.topology.partitions
            history: list[float] = []
            baseline: list[float] = []
            for task_id in chosen:
                # Interleaved, so that a slow moment of the box hits both alike.
                started = time.perf_counter()
                events = await app.history(task_id)
                history.append(time.perf_counter() - started)
                if [e.kind for e in events][-1] != "Succeeded":
                    raise RuntimeError(f"history of {task_id} is {events}")
                tp = TopicPartition(topic, murmur2_partition(task_id.encode(), partitions))
                baseline.append(await bare_read(app.event_log, tp, partitions))
            consumer = app.event_log.consumer([topic], group_id=None)
            await consumer.start()
            try:
                ends = await consumer.end_offsets(
                    [TopicPartition(topic, p) for p in range(partitions)]
                )
            finally:
                await consumer.close()
            return history, baseline, sum(ends.values()), partitions
    finally:
        await cleanup(config, registry_url, app.topology, keep=False)
        close_registry(registry)


def describe(seconds: list[float]) -> str:
    ordered = sorted(s * 1000 for s in seconds)
    return (
        f"median {statistics.median(ordered):7.1f} ms, p90 {percentile(ordered, 0.9):7.1f} ms, "
        f"max {ordered[-1]:7.1f} ms"
    )


async def main_async(args: argparse.Namespace) -> None:
    config = kafka_config(args.bootstrap)
    print(
        f"Kafka {args.bootstrap}, registry {args.registry or 'mock://'}, {args.tasks} no-op "
        f"tasks per event log, the history of {args.samples} of them"
    )
    for kind in [k.strip() for k in args.event_logs.split(",") if k.strip()]:
        history, baseline, events, partitions = await one_log(
            kind, config, args.registry, args.tasks, args.samples
        )
        ratio = statistics.median(history) / statistics.median(baseline)
        print(f"  {kind:9s} {events:,} events in {partitions} partitions")
        print(f"    app.history(uuid)           {describe(history)}")
        print(f"    bare read of its partition  {describe(baseline)}")
        print(f"    ratio history/bare read (medians): {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    broker_arguments(parser)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--event-logs", default=",".join(EVENT_LOGS))
    args = parser.parse_args()
    if not args.bootstrap:
        parser.error("give --bootstrap or set QTASKS_BOOTSTRAP_SERVERS")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
