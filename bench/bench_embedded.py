"""No-op task throughput and submit-to-result latency on the embedded default.

Baseline, measured in the same run: the same in-memory event log moving the records one
task causes (5 records: Submitted, Scheduled, WorkItem, Started, Succeeded), Avro-encoded
and decoded with the same serde, with no stage logic. The ratio says what the pipeline
costs on top of the bare log.

    python -m bench.bench_embedded --tasks 5000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import Scheduled, Started, Submitted, Succeeded, TaskEvent, WorkItem
from qtasks_stream.records import OutRecord
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.topology import Topology

RECORDS_PER_TASK = 5


async def pipeline(tasks: int, window: int) -> tuple[float, list[float]]:
    app = QueueTasks("bench", concurrency=64)

    @app.task(name="noop")
    async def noop(i: int) -> int:
        return i

    latencies: list[float] = []
    slots = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with slots:
            t0 = time.perf_counter()
            done = await app.add_task("noop", i, timeout=120)
            assert done is not None and done.status == "success", done
            latencies.append(time.perf_counter() - t0)

    async with app:
        await app.add_task("noop", -1, timeout=30)  # warm up every stage
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(tasks)))
        elapsed = time.perf_counter() - started
    return tasks / elapsed, latencies


async def raw_log(tasks: int) -> float:
    """Records/s of the bare log: encode, append, poll, decode; no stages."""
    topology = Topology("raw")
    log = InMemoryEventLog()
    await log.create_topics(topology.specs())
    serde = AvroSerde(
        SchemaRegistryClient.new_client({"url": "mock://bench-raw"}), topology.topic_schemas()
    )
    await serde.start()
    producer = log.producer()
    consumer = log.consumer([topology.events, topology.lane(0)], group_id="raw")
    await consumer.start()
    payloads = [
        Submitted("[1]", "{}", 0),
        Scheduled(0, 0),
        Started("worker"),
        Succeeded("1", 0.1),
    ]
    total = tasks * RECORDS_PER_TASK
    started = time.perf_counter()
    seen = 0
    batch = 500
    for first in range(0, tasks, batch // RECORDS_PER_TASK):
        out = []
        for i in range(first, min(tasks, first + batch // RECORDS_PER_TASK)):
            key = f"task-{i}"
            for payload in payloads:
                event = TaskEvent.new(key, "noop", 1, "bench", payload)
                out.append(
                    OutRecord(
                        topology.events,
                        key.encode(),
                        serde.encode(topology.events, event.to_avro()),
                    )
                )
            item = WorkItem(key, "noop", 1, "[1]", "{}", 0, 0)
            out.append(
                OutRecord(
                    topology.lane(0), key.encode(), serde.encode(topology.lane(0), item.to_avro())
                )
            )
        await producer.send(out)
        for rec in await consumer.poll(max_records=batch, timeout=1.0):
            value = serde.decode(rec.topic, rec.value or b"")
            if rec.topic == topology.events:
                TaskEvent.from_avro(value)
            else:
                WorkItem.from_avro(value)
            seen += 1
    while seen < total:
        for rec in await consumer.poll(max_records=batch, timeout=1.0):
            serde.decode(rec.topic, rec.value or b"")
            seen += 1
    return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--window", type=int, default=256, help="tasks in flight per client")
    args = parser.parse_args()
    raw = asyncio.run(raw_log(args.tasks))
    rate, latencies = asyncio.run(pipeline(args.tasks, args.window))
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"embedded default, {args.tasks} no-op tasks, {args.window} in flight")
    print(
        f"  pipeline: {rate:,.0f} tasks/s = {rate * RECORDS_PER_TASK:,.0f} records/s; "
        f"latency p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
    )
    print(f"  baseline (bare in-memory log + Avro, same records): {raw:,.0f} records/s")
    print(f"  ratio pipeline/baseline: {rate * RECORDS_PER_TASK / raw:.2f}")


if __name__ == "__main__":
    main()
