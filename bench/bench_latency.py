"""Submit-to-result latency of one task at a time, beside the floor of a bare exactly-once
round trip measured in the same run on the same broker.

The floors are plain confluent-kafka, no framework:

* **two transactional hops**: the client produces a request in a transaction, a responder
  reads it ``read_committed`` and answers in a transaction that also commits its offset,
  the client reads the answer ``read_committed``;
* **one transactional hop**: the same, with the request sent by a plain idempotent producer.

The pipeline is qtasks-stream with its stages in a ``qtasks-stream worker`` process and this
process only submitting and awaiting (as deployed), one task in flight, exactly-once on.
Targets (issue #16): pipeline p50 <= 1.25x and p99 <= 2x the two-hop floor.

    python -m bench.bench_latency --bootstrap 127.0.0.1:19092 \
        --registry http://127.0.0.1:18081/apis/ccompat/v7 --tasks 300 --round-trips 300
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import confluent_kafka as ck
from confluent_kafka.admin import AdminClient, NewTopic

from bench.bench_kafka import (
    broker_arguments,
    delete_topics,
    kafka_config,
    percentile,
    pipeline,
    worker_stages,
    worker_stages_argument,
)
from qtasks_stream.eventlog.kafka_config import KafkaConfig

#: Deadlines (seconds) on every wait.
SETUP_TIMEOUT = 30.0
ROUND_TRIP_TIMEOUT = 10.0
P50_TARGET = 1.25
P99_TARGET = 2.0


@dataclass
class Latencies:
    label: str
    seconds: list[float]
    #: CPU seconds of the whole process (client and responder threads) over the run.
    cpu: float

    def p50_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    def p99_ms(self) -> float:
        return percentile(sorted(self.seconds), 0.99) * 1000

    def line(self) -> str:
        return (
            f"{self.label}: p50 {self.p50_ms():.1f} ms, p99 {self.p99_ms():.1f} ms over "
            f"{len(self.seconds)} round trips, {self.cpu / len(self.seconds) * 1e6:.0f} us CPU each"
        )


def _conf(config: KafkaConfig, **extra: object) -> dict[str, object]:
    return {**config.to_librdkafka({"log_level": 4}), **extra}


def _create(config: KafkaConfig, topics: Sequence[str]) -> None:
    admin = AdminClient(_conf(config))
    futures = admin.create_topics([NewTopic(t, 1, 1) for t in topics])
    for future in futures.values():
        future.result(timeout=SETUP_TIMEOUT)


def _responder(config: KafkaConfig, request: str, answer: str, stop: threading.Event) -> None:
    """Reads each request read_committed and answers it in a transaction with its offset."""
    consumer = ck.Consumer(
        _conf(
            config,
            **{
                "group.id": f"floor-{uuid.uuid4().hex[:8]}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            },
        )
    )
    producer = ck.Producer(
        _conf(config, **{"transactional.id": f"floor-{uuid.uuid4().hex}", "linger.ms": 0})
    )
    producer.init_transactions(SETUP_TIMEOUT)
    consumer.subscribe([request])
    try:
        while not stop.is_set():
            msg = consumer.poll(0.05)
            if msg is None or msg.error():
                continue
            producer.begin_transaction()
            producer.produce(answer, key=msg.key(), value=msg.value())
            producer.send_offsets_to_transaction(
                [ck.TopicPartition(request, msg.partition(), msg.offset() + 1)],
                consumer.consumer_group_metadata(),
            )
            producer.commit_transaction(ROUND_TRIP_TIMEOUT)
    finally:
        consumer.close()


def floor(config: KafkaConfig, round_trips: int, *, transactional_request: bool) -> Latencies:
    tag = uuid.uuid4().hex[:8]
    request, answer = f"floor-{tag}.request", f"floor-{tag}.answer"
    _create(config, [request, answer])
    stop = threading.Event()
    responder = threading.Thread(
        target=_responder, args=(config, request, answer, stop), daemon=True
    )
    responder.start()
    extra: dict[str, object] = (
        {"transactional.id": f"floor-client-{tag}"}
        if transactional_request
        else {"enable.idempotence": True}
    )
    producer = ck.Producer(_conf(config, **extra, **{"linger.ms": 0}))
    if transactional_request:
        producer.init_transactions(SETUP_TIMEOUT)
    reader = ck.Consumer(
        _conf(
            config,
            **{"group.id": f"floor-reader-{tag}", "isolation.level": "read_committed"},
        )
    )
    # From the start of the fresh topic: a logical END resolved after the first answer
    # landed would miss it.
    reader.assign([ck.TopicPartition(answer, 0, ck.OFFSET_BEGINNING)])

    def round_trip(i: int) -> float:
        key = f"{i}".encode()
        t0 = time.perf_counter()
        if transactional_request:
            producer.begin_transaction()
            producer.produce(request, key=key, value=b"x" * 200)
            producer.commit_transaction(ROUND_TRIP_TIMEOUT)
        else:
            producer.produce(request, key=key, value=b"x" * 200)
            producer.flush(ROUND_TRIP_TIMEOUT)
        deadline = t0 + ROUND_TRIP_TIMEOUT
        while time.perf_counter() < deadline:
            msg = reader.poll(0.05)
            if msg is not None and not msg.error() and msg.key() == key:
                return time.perf_counter() - t0
        raise TimeoutError(f"no answer to request {i} within {ROUND_TRIP_TIMEOUT}s")

    try:
        for i in range(5):  # warm-up: group join, first transactions
            round_trip(-1 - i)
        cpu0 = time.process_time()
        seconds = [round_trip(i) for i in range(round_trips)]
        cpu = time.process_time() - cpu0
    finally:
        stop.set()
        responder.join(timeout=SETUP_TIMEOUT)
        reader.close()
        delete_topics(config, [request, answer])
    label = (
        "floor, two transactional hops"
        if transactional_request
        else ("floor, one transactional hop (idempotent request)")
    )
    return Latencies(label, seconds, cpu)


async def run(args: argparse.Namespace) -> None:
    config = kafka_config(args.bootstrap)
    print(
        f"Kafka {args.bootstrap}, registry {args.registry}: one task at a time, "
        f"worker in its own process, exactly-once"
    )
    two_hops = await asyncio.to_thread(floor, config, args.round_trips, transactional_request=True)
    one_hop = await asyncio.to_thread(floor, config, args.round_trips, transactional_request=False)
    result = await pipeline(
        args.event_log,
        config,
        args.registry,
        tasks=args.tasks,
        window=1,
        concurrency=16,
        keep=False,
        worker_process=True,
        worker_stages=worker_stages(args),
    )
    # CPU of the client and the worker process, as the floors count their responder's.
    stream = Latencies(
        f"qtasks-stream ({args.event_log}), client + worker CPU",
        result.latencies,
        result.cpu + (result.worker_cpu or 0.0),
    )
    print()
    for line in (two_hops, one_hop, stream):
        print(f"  {line.line()}")
    p50_ratio = stream.p50_ms() / two_hops.p50_ms()
    p99_ratio = stream.p99_ms() / two_hops.p99_ms()
    print(
        f"  ratio to the two-hop floor: p50 {p50_ratio:.2f}x (target <= {P50_TARGET}x: "
        f"{'met' if p50_ratio <= P50_TARGET else 'NOT met'}), p99 {p99_ratio:.2f}x "
        f"(target <= {P99_TARGET}x: {'met' if p99_ratio <= P99_TARGET else 'NOT met'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    broker_arguments(parser)
    parser.add_argument("--tasks", type=int, default=300, help="pipeline tasks, one at a time")
    parser.add_argument("--round-trips", type=int, default=300, help="floor round trips")
    parser.add_argument("--event-log", default="confluent", choices=["aiokafka", "confluent"])
    worker_stages_argument(parser)
    args = parser.parse_args()
    if not args.bootstrap or not (args.registry or "").startswith("http"):
        parser.error("give --bootstrap and an http --registry (the worker process shares it)")
    if min(args.tasks, args.round_trips) < 1:
        parser.error("--tasks and --round-trips must be >= 1")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
