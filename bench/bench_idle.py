"""What an idle app costs: CPU of a process running every stage and a client, doing nothing.

For each Kafka event log, an app with every stage in this process runs one task (so the
client's result listener is up too), settles for two seconds, then the process's CPU time
(every thread: Python and the Kafka clients' own) is read over ``--seconds`` of idling.
Then, as deployed, the stages in a ``qtasks-stream worker`` process and a client-only
process (this one) apart: after one task, each process's CPU over the same idle seconds
(the worker's from /proc/<pid>/stat). Targets (issue 16): an idle worker process at most
1% of a core, an idle client at most 0.5%; the worker process needs a real registry.
Beside it, in the same run, the baseline: one plain confluent-kafka consumer, assigned to an
idle topic, polling it in one-second calls with the long poll (``long_fetch_max_wait_ms``:
what consumers that never pause get, and the confluent worker's lane consumer, which pauses
in its own buffer), and again with the 50 ms long poll and 50 ms calls a consumer
that pauses in the client keeps (aiokafka's lanes, readers without a group). The ratio says
how many such bare clients the idle app costs.

    python -m bench.bench_idle --bootstrap 127.0.0.1:19092 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path

import confluent_kafka as ck

from bench.bench_kafka import (
    EVENT_LOGS,
    START_TIMEOUT,
    TASK_TIMEOUT,
    broker_arguments,
    cleanup,
    close_registry,
    delete_topics,
    kafka_config,
    make_registry,
    noop_app,
    start_worker,
    stop_worker,
    warm_up,
)
from qtasks_stream.eventlog.kafka_admin import ensure_topics
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.records import TopicSpec

SETTLE = 2.0
WORKER_TARGET = 0.01
CLIENT_TARGET = 0.005
_TICKS = os.sysconf("SC_CLK_TCK")


def cores(seconds: float, cpu: float) -> float:
    return cpu / seconds


async def idle_app(
    kind: str, config: KafkaConfig, registry_url: str | None, seconds: float
) -> float:
    """Cores an idle app uses (every stage and a client in this process)."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    registry = make_registry(registry_url, f"idle-{prefix}")
    app = noop_app("idle", kind, config, registry, prefix)

    try:
        async with asyncio.timeout(START_TIMEOUT):
            await app.start()
        done = await app.add_task("noop", 0, timeout=TASK_TIMEOUT)
        if done is None or done.status != "success":
            raise RuntimeError(f"{kind}: the first task did not succeed: {done}")
        await asyncio.sleep(SETTLE)
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.sleep(seconds)
        return cores(time.perf_counter() - started, time.process_time() - cpu)
    finally:
        await app.close()
        close_registry(registry)
        await cleanup(config, registry_url, app.topology, keep=False)


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: state is field 3, utime and stime fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def idle_apart(
    kind: str, config: KafkaConfig, registry_url: str, seconds: float
) -> tuple[float, float]:
    """Cores an idle worker process (every stage) and an idle client-only process use."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    registry = make_registry(registry_url, f"idle-apart-{prefix}")
    app = noop_app("bench", kind, config, registry, prefix)
    worker = start_worker(kind, config, registry_url, prefix, 64)
    try:
        await warm_up(app, kind)
        await asyncio.sleep(SETTLE)
        started, cpu = time.perf_counter(), time.process_time()
        worker_cpu = process_cpu(worker.pid)
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - started
        return (
            cores(elapsed, process_cpu(worker.pid) - worker_cpu),
            cores(elapsed, time.process_time() - cpu),
        )
    finally:
        await app.close()
        stop_worker(worker)
        close_registry(registry)
        await cleanup(config, registry_url, app.topology, keep=False)


def idle_client(
    config: KafkaConfig, topic: str, seconds: float, fetch_wait_ms: int, call_s: float
) -> float:
    """Cores one plain confluent-kafka consumer uses polling an idle topic in ``call_s``
    calls, with ``fetch.wait.max.ms`` at ``fetch_wait_ms`` (blocking)."""
    consumer = ck.Consumer(
        config.to_librdkafka(
            {
                "group.id": f"bench-idle-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": fetch_wait_ms,
            }
        )
    )
    try:
        consumer.assign([ck.TopicPartition(topic, 0, ck.OFFSET_END)])
        deadline = time.monotonic() + SETTLE
        while time.monotonic() < deadline:
            consumer.consume(1, 0.2)
        started, cpu = time.perf_counter(), time.process_time()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            consumer.consume(1, call_s)
        return cores(time.perf_counter() - started, time.process_time() - cpu)
    finally:
        consumer.close()


async def main_async(args: argparse.Namespace) -> None:
    config = kafka_config(args.bootstrap)
    print(f"Kafka {args.bootstrap}, {args.seconds:.0f} s of idling each")
    topic = f"bench-idle-{uuid.uuid4().hex[:8]}"
    await ensure_topics(config, [TopicSpec(topic, 1)])
    try:
        bare = await asyncio.to_thread(
            idle_client, config, topic, args.seconds, config.long_fetch_max_wait_ms, 1.0
        )
        # What a consumer pausing in the client asks (aiokafka's worker lanes): a 50 ms long
        # poll, a thread waking every 50 ms.
        eager = await asyncio.to_thread(
            idle_client, config, topic, args.seconds, config.fetch_max_wait_ms, 0.05
        )
    finally:
        await asyncio.to_thread(delete_topics, config, [topic])
    print(f"  one plain confluent-kafka consumer: {bare * 100:.2f}% of a core")
    print(
        f"  the same, fetch.wait.max.ms={config.fetch_max_wait_ms} and 50 ms calls: "
        f"{eager * 100:.2f}% of a core"
    )
    for kind in [k.strip() for k in args.event_logs.split(",") if k.strip()]:
        used = await idle_app(kind, config, args.registry, args.seconds)
        print(
            f"  {kind:9s} idle app (every stage and a client): {used * 100:.1f}% of a core "
            f"= {used / bare:.0f} plain consumers"
        )
        if not (args.registry or "").startswith("http"):
            print(f"  {kind:9s} (no --registry: the worker-process measurement needs one)")
            continue
        worker, client = await idle_apart(kind, config, args.registry, args.seconds)
        print(
            f"  {kind:9s} idle worker process: {worker * 100:.2f}% of a core "
            f"(target <= {WORKER_TARGET * 100:.0f}%: {verdict(worker <= WORKER_TARGET)}); "
            f"idle client-only process: {client * 100:.2f}% "
            f"(target <= {CLIENT_TARGET * 100:.1f}%: {verdict(client <= CLIENT_TARGET)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    broker_arguments(parser)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--event-logs", default=",".join(EVENT_LOGS))
    args = parser.parse_args()
    if not args.bootstrap:
        parser.error("give --bootstrap or set QTASKS_BOOTSTRAP_SERVERS")
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
