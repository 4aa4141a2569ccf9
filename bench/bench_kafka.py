"""No-op task throughput and submit-to-result latency on a real Kafka broker.

For each Kafka event log (aiokafka, confluent-kafka) every stage runs in this process on a
fresh topic prefix, exactly-once (transactions) as always, with a bounded number of tasks
in flight; a warm-up task first lets every consumer group settle before the clock starts.

Baseline, measured in the same run on the same broker: plain confluent-kafka moving the
records those tasks cause (5 per task: Submitted, Scheduled, Started, Succeeded on the
events topic and one WorkItem on a lane), Avro-encoded beforehand with the project's serde
so sizes match, produced by a plain idempotent producer and read by a plain consumer, end
to end. The ratio pipeline records/s / raw records/s says what the pipeline costs on top
of the bare log; the target is at least one third.

    python -m bench.bench_kafka --bootstrap 127.0.0.1:19092 \
        --registry http://127.0.0.1:18081/apis/ccompat/v7 --tasks 3000

``--bootstrap``/``--registry`` default to ``QTASKS_BOOTSTRAP_SERVERS`` and
``QTASKS_SCHEMA_REGISTRY_URL``; without a registry an in-process ``mock://`` one is used.
Topics (and registry subjects) the run creates are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import confluent_kafka as ck
import fastavro
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.app import STAGES
from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.kafka_admin import ensure_topics
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.events import (
    Scheduled,
    Started,
    Submitted,
    Succeeded,
    TaskEvent,
    WorkItem,
    event_kind,
)
from qtasks_stream.serde.avro import AvroSerde, subject_for
from qtasks_stream.serde.schemas import load_schema_text
from qtasks_stream.topology import Topology

RECORDS_PER_TASK = 5
#: Decodes one task needs at the least, whatever the design around fastavro: the projector
#: reads its 4 events, the result listener Started and Succeeded (the rest it skips by the
#: kind header), the scheduler the Submitted, a worker the WorkItem.
DECODES_PER_TASK = 8
TARGET_RATIO = 1 / 3
EVENT_LOGS = ("aiokafka", "confluent")

#: Deadlines (seconds) on every wait.
START_TIMEOUT = 60.0
WARMUP_TIMEOUT = 60.0
TASK_TIMEOUT = 60.0
CLOSE_TIMEOUT = 45.0
RAW_TIMEOUT = 60.0
CLEANUP_TIMEOUT = 15.0


def kafka_config(bootstrap: str) -> KafkaConfig:
    """Settings for a one-broker cluster: groups settle fast, requests fail in bounded time."""
    return KafkaConfig(
        bootstrap_servers=bootstrap,
        client_id="qtasks-bench",
        session_timeout_ms=6_000,
        heartbeat_interval_ms=500,
        max_poll_interval_ms=60_000,
        metadata_max_age_ms=10_000,
        request_timeout_ms=15_000,
        transaction_timeout_ms=30_000,
    )


def make_event_log(kind: str, config: KafkaConfig) -> EventLog:
    if kind == "aiokafka":
        from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog

        return AioKafkaEventLog(config)
    from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog

    return ConfluentEventLog(config)


def noop_app(
    name: str,
    kind: str,
    config: KafkaConfig,
    registry: SchemaRegistryClient,
    prefix: str,
    **options: Any,
) -> QueueTasks:
    """An app on ``prefix`` with the benches' one task, ``noop(i) -> i``."""
    app = QueueTasks(
        name,
        event_log=make_event_log(kind, config),
        schema_registry=registry,
        topic_prefix=prefix,
        **options,
    )

    @app.task(name="noop")
    async def noop(i: int) -> int:
        return i

    return app


def make_registry(url: str | None, tag: str) -> SchemaRegistryClient:
    return SchemaRegistryClient.new_client({"url": url or f"mock://bench-{tag}"})


def close_registry(registry: SchemaRegistryClient) -> None:
    with contextlib.suppress(Exception):
        registry.__exit__()  # type: ignore[no-untyped-call]


def percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# -- cleanup ----------------------------------------------------------------------------------


def delete_topics(config: KafkaConfig, topics: Sequence[str]) -> None:
    """Best effort: the bench's own topics only (fresh prefixes)."""
    if not topics:
        return
    admin = AdminClient(config.to_librdkafka({"log_level": 4}))
    futures = admin.delete_topics(
        list(topics), operation_timeout=CLEANUP_TIMEOUT, request_timeout=CLEANUP_TIMEOUT
    )
    for topic, future in futures.items():
        try:
            future.result(timeout=CLEANUP_TIMEOUT)
        except Exception as exc:
            print(f"  (could not delete topic {topic}: {exc})", file=sys.stderr)


def delete_subjects(registry: SchemaRegistryClient, topics: Sequence[str]) -> None:
    """Best effort: the subjects registered for the bench's own topics."""
    for topic in topics:
        subject = subject_for(topic)
        with contextlib.suppress(Exception):
            registry.delete_subject(subject)
            registry.delete_subject(subject, permanent=True)


async def cleanup(
    config: KafkaConfig,
    registry_url: str | None,
    topology: Topology,
    keep: bool,
    topics: Sequence[str] | None = None,
) -> None:
    """Delete the topics (default: all of ``topology``) and their registry subjects."""
    if keep:
        return
    if topics is None:
        topics = [spec.name for spec in topology.specs()]
    try:
        async with asyncio.timeout(CLEANUP_TIMEOUT * 2):
            await asyncio.to_thread(delete_topics, config, topics)
            if registry_url:
                registry = make_registry(registry_url, "cleanup")
                try:
                    schemas = [t for t in topology.topic_schemas() if t in topics]
                    await asyncio.to_thread(delete_subjects, registry, schemas)
                finally:
                    close_registry(registry)
    except TimeoutError:
        print(f"  (cleanup of {topology.base} timed out)", file=sys.stderr)


# -- the pipeline -----------------------------------------------------------------------------


async def warm_up(app: QueueTasks, kind: str, attempts: int = 3) -> None:
    """One task through every stage, so every consumer group has settled.

    Retried (bounded) on an event-log error: right after its topics were created the
    result listener's start can meet a transient NOT_LEADER_FOR_PARTITION (it fails before
    anything is sent, so a retry submits no duplicate).
    """
    deadline = time.monotonic() + WARMUP_TIMEOUT
    for attempt in range(1, attempts + 1):
        remaining = deadline - time.monotonic()
        try:
            done = await app.add_task("noop", -1, timeout=max(1.0, remaining))
        except EventLogError as exc:
            if attempt == attempts or remaining <= 1.0:
                raise
            print(f"  ({kind}: warm-up attempt {attempt} failed, retrying: {exc})", file=sys.stderr)
            await asyncio.sleep(0.5)
            continue
        if done is None or done.status != "success":
            raise RuntimeError(f"{kind}: the warm-up task did not succeed in time: {done}")
        return


@dataclass
class PipelineResult:
    kind: str
    tasks: int
    elapsed: float
    latencies: list[float]
    #: CPU seconds this process used over the timed run (every thread: Python, librdkafka).
    cpu: float
    #: CPU seconds the worker process used over the timed run (None: stages in this process).
    worker_cpu: float | None = None

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.elapsed

    @property
    def records_per_s(self) -> float:
        return self.tasks_per_s * RECORDS_PER_TASK


async def pipeline(
    kind: str,
    config: KafkaConfig,
    registry_url: str | None,
    *,
    tasks: int,
    window: int,
    concurrency: int,
    keep: bool,
    worker_process: bool = False,
    worker_stages: Sequence[str] = (),
) -> PipelineResult:
    """With ``worker_process`` the stages run in a ``qtasks-stream worker`` subprocess (as
    a deployment runs them, and as a Celery worker runs apart from its client) and this
    process only submits and awaits; that needs a real registry, shared by both.
    ``worker_stages``: the stages it runs (default: all), to see what each one costs."""
    if worker_process and not (registry_url or "").startswith("http"):
        raise ValueError("a worker process needs a real schema registry (--registry)")
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    registry = make_registry(registry_url, f"{kind}-{prefix}")
    app = noop_app(
        "bench", kind, config, registry, prefix, concurrency=concurrency, shutdown_grace=5.0
    )

    latencies: list[float] = []
    slots = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with slots:
            t0 = time.perf_counter()
            done = await app.add_task("noop", i, timeout=TASK_TIMEOUT)
            if done is None:
                raise TimeoutError(f"task {i} did not finish within {TASK_TIMEOUT}s")
            if done.status != "success":
                raise RuntimeError(f"task {i} ended {done.status}: {done}")
            latencies.append(time.perf_counter() - t0)

    worker: subprocess.Popen[bytes] | None = None
    try:
        if worker_process:
            worker = start_worker(
                kind, config, registry_url or "", prefix, concurrency, stages=worker_stages
            )
        else:
            async with asyncio.timeout(START_TIMEOUT):
                await app.start()
        warm = time.perf_counter()
        await warm_up(app, kind)
        print(f"  {kind}: stages up, warm-up task took {time.perf_counter() - warm:.1f}s")
        worker_cpu_started = process_cpu(worker.pid) if worker is not None else 0.0
        started, cpu_started = time.perf_counter(), time.process_time()
        # Bounded overall as well (>= 50 tasks/s): a stalled pipeline fails, never hangs;
        # the task group cancels the other submits at the first failure.
        async with asyncio.timeout(TASK_TIMEOUT + tasks / 50), asyncio.TaskGroup() as group:
            for i in range(tasks):
                group.create_task(one(i))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        worker_cpu = process_cpu(worker.pid) - worker_cpu_started if worker is not None else None
    finally:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await app.close()
        except TimeoutError:
            print(f"  ({kind}: closing the app timed out)", file=sys.stderr)
        if worker is not None:
            stop_worker(worker)
        close_registry(registry)
        await cleanup(config, registry_url, app.topology, keep)
    return PipelineResult(kind, tasks, elapsed, latencies, cpu, worker_cpu)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) process ``pid`` has used so far (Linux)."""
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_worker(
    kind: str,
    config: KafkaConfig,
    registry_url: str,
    prefix: str,
    concurrency: int,
    *,
    stages: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """The ``stages`` (default: every stage) of ``bench.peer_stream:app`` in a worker process
    on the bench's topics."""
    env = {
        **os.environ,
        "QTASKS_BOOTSTRAP_SERVERS": config.bootstrap_servers,
        "QTASKS_EVENT_LOG": kind,
        "QTASKS_SCHEMA_REGISTRY_URL": registry_url,
        "QTASKS_TOPIC_PREFIX": prefix,
        "QTASKS_BENCH_CONCURRENCY": str(concurrency),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qtasks_stream",
            "worker",
            "-A",
            "bench.peer_stream:app",
            *(["--stages", ",".join(stages)] if stages else []),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=CLOSE_TIMEOUT)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


# -- the raw limit ----------------------------------------------------------------------------


@dataclass
class RawResult:
    records: int
    elapsed: list[float]  # one per round
    value_bytes: int
    encode_us: float
    decode_us: float
    #: Decoding as a stage does: the kind header as the hint, then the typed value.
    stage_decode_us: float
    #: fastavro alone (schemaless writer and reader on the parsed schemas, no wrapper): the
    #: least any Python pipeline on fastavro pays per record.
    bare_encode_us: float
    bare_decode_us: float

    @property
    def rates(self) -> list[float]:
        return sorted(self.records / e for e in self.elapsed)

    @property
    def records_per_s(self) -> float:
        """The median round."""
        return statistics.median(self.rates)


Wire = tuple[str, bytes, bytes, list[tuple[str, str | bytes | None]]]


def task_records(serde: AvroSerde, topology: Topology, n: int) -> list[Wire]:
    """The records of ``n`` no-op tasks, as the pipeline writes them (keys, headers, Avro)."""
    out: list[Wire] = []
    events, lane = topology.events, topology.lane(0)
    worker = f"worker:{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    for i in range(n):
        task_id = str(uuid.uuid4())
        key = task_id.encode()
        # attempt, source and payload as the client, scheduler and worker write them
        steps = (
            (0, "client", Submitted(f"[{i}]", "{}", 0)),
            (1, "scheduler", Scheduled(0, 0)),
            (1, worker, Started(worker)),
            (1, worker, Succeeded(str(i), 0.05)),
        )
        for attempt, source, payload in steps:
            event = TaskEvent.new(task_id, "noop", attempt, source, payload)
            value = serde.encode(events, event.to_avro())
            out.append((events, key, value, list(event.record_headers())))
        item = WorkItem(task_id, "noop", 1, f"[{i}]", "{}", 0, 0)
        out.append((lane, key, serde.encode(lane, item.to_avro()), []))
    return out


def transfer(
    config: KafkaConfig, topics: Sequence[str], partitions: int, wire: list[Wire], rounds: int
) -> list[float]:
    """Produce ``wire`` with a plain idempotent producer while a plain consumer reads it back;
    per round, seconds from the first produce to the last record consumed (runs in a thread).

    The first task's records warm the clients up, untimed; the rest are moved ``rounds``
    times (the same records again), since one round of a few thousand tasks is short enough
    for a broker hiccup to halve it.
    """
    producer = ck.Producer(
        config.to_librdkafka(
            {
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "partitioner": "murmur2_random",
            }
        )
    )
    consumer = ck.Consumer(
        config.to_librdkafka(
            {
                "group.id": f"bench-raw-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
            }
        )
    )
    try:
        consumer.assign(
            [
                ck.TopicPartition(t, p, ck.OFFSET_BEGINNING)
                for t in topics
                for p in range(partitions)
            ]
        )

        def produce(records: Sequence[Wire]) -> None:
            for n, (topic, key, value, headers) in enumerate(records):
                while True:
                    try:
                        producer.produce(topic, value, key, headers=headers or None)
                        break
                    except BufferError:
                        producer.poll(0.05)
                if n % 1000 == 0:
                    producer.poll(0)

        def consume(count: int, deadline: float) -> None:
            while count > 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"raw consumer still missed {count} records")
                for msg in consumer.consume(1000, 0.1):
                    error = msg.error()
                    if error is None:
                        count -= 1
                    elif error.code() != ck.KafkaError._PARTITION_EOF:
                        raise ck.KafkaException(error)

        # Warm up as the pipeline does: one task's records, not timed.
        warm, timed = wire[:RECORDS_PER_TASK], wire[RECORDS_PER_TASK:]
        produce(warm)
        producer.flush(RAW_TIMEOUT)
        consume(len(warm), time.monotonic() + RAW_TIMEOUT)

        def reader(count: int, finished: list[float], failure: list[BaseException]) -> None:
            try:
                consume(count, time.monotonic() + RAW_TIMEOUT)
                finished.append(time.perf_counter())
            except BaseException as exc:
                failure.append(exc)

        elapsed: list[float] = []
        for _ in range(rounds):
            finished: list[float] = []
            failure: list[BaseException] = []
            thread = threading.Thread(
                target=reader,
                args=(len(timed), finished, failure),
                name="bench-raw-consumer",
                daemon=True,
            )
            started = time.perf_counter()
            thread.start()
            produce(timed)
            if producer.flush(RAW_TIMEOUT) > 0:
                raise TimeoutError(f"raw producer could not deliver within {RAW_TIMEOUT}s")
            thread.join(RAW_TIMEOUT + 5)
            if thread.is_alive():
                raise TimeoutError("raw consumer did not finish")
            if failure:
                raise failure[0]
            elapsed.append(finished[0] - started)
        return elapsed
    finally:
        producer.flush(5)
        consumer.close()


def bare_fastavro(
    serde: AvroSerde, schemas: Mapping[str, str], sample: Sequence[Wire]
) -> tuple[float, float]:
    """Microseconds per record for fastavro's schemaless writer and reader alone, on the
    sample's own values and parsed schemas (``schemas``: topic -> schema name), no wrapper."""
    parsed = {t: fastavro.parse_schema(json.loads(load_schema_text(n))) for t, n in schemas.items()}
    values = [(parsed[topic], serde.decode(topic, value)) for topic, _k, value, _h in sample]
    bodies = [(parsed[topic], value[5:]) for topic, _k, value, _h in sample]  # no wire header
    t0 = time.perf_counter()
    for schema, data in values:
        fastavro.schemaless_writer(io.BytesIO(), schema, data)
    encode_us = (time.perf_counter() - t0) / len(values) * 1e6
    t0 = time.perf_counter()
    for schema, body in bodies:
        fastavro.schemaless_reader(io.BytesIO(body), schema, None)
    decode_us = (time.perf_counter() - t0) / len(bodies) * 1e6
    return encode_us, decode_us


async def raw_limit(
    config: KafkaConfig, registry_url: str | None, *, tasks: int, rounds: int, keep: bool
) -> RawResult:
    topology = Topology("raw", f"bench-{uuid.uuid4().hex[:8]}.")
    topics = [topology.events, topology.lane(0)]
    registry = make_registry(registry_url, f"raw-{topology.prefix}")
    schemas = {topology.events: "TaskEvent", topology.lane(0): "WorkItem"}
    serde = AvroSerde(registry, schemas)
    try:
        await ensure_topics(config, [s for s in topology.specs() if s.name in topics])
        await serde.start()
        wire = task_records(serde, topology, tasks + 1)  # + the warm-up task
        timed = wire[RECORDS_PER_TASK:]
        # What the serde costs per record (the pipeline pays it in the event-loop thread).
        t0 = time.perf_counter()
        task_records(serde, topology, min(tasks, 1000))
        encode_us = (time.perf_counter() - t0) / (min(tasks, 1000) * RECORDS_PER_TASK) * 1e6
        sample = timed[:5000]
        t0 = time.perf_counter()
        for topic, _key, value, _headers in sample:
            serde.decode(topic, value)
        decode_us = (time.perf_counter() - t0) / len(sample) * 1e6
        build = {topology.events: TaskEvent.from_avro, topology.lane(0): WorkItem.from_avro}
        headed = [(topic, value, event_kind(tuple(h))) for topic, _key, value, h in sample]
        t0 = time.perf_counter()
        for topic, value, kind in headed:
            build[topic](serde.decode(topic, value, branch=kind))
        stage_decode_us = (time.perf_counter() - t0) / len(sample) * 1e6
        bare_encode_us, bare_decode_us = bare_fastavro(serde, schemas, sample)
        elapsed = await asyncio.to_thread(
            transfer, config, topics, topology.partitions, wire, rounds
        )
        value_bytes = sum(len(v) for _t, _k, v, _h in timed) // len(timed)
        return RawResult(
            len(timed),
            elapsed,
            value_bytes,
            encode_us,
            decode_us,
            stage_decode_us,
            bare_encode_us,
            bare_decode_us,
        )
    finally:
        await serde.close()
        close_registry(registry)
        await cleanup(config, registry_url, topology, keep, topics)


# -- main -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> bool | None:
    """Measure and print; whether every pipeline met the target (None: nothing to compare)."""
    config = kafka_config(args.bootstrap)
    kinds = [k.strip() for k in args.event_logs.split(",") if k.strip()]
    print(
        f"Kafka {args.bootstrap}, registry {args.registry or 'mock://'}, {args.tasks} no-op "
        f"tasks, {args.window} in flight, worker concurrency {args.concurrency}, stages "
        + ("in a worker process" if args.worker_process else "in this process")
    )
    raw: RawResult | None = None
    if not args.no_raw:
        raw = await raw_limit(
            config, args.registry, tasks=args.tasks, rounds=args.raw_rounds, keep=args.keep
        )
    results: list[PipelineResult] = []
    failed: list[str] = []
    for kind in kinds:
        try:
            results.append(
                await pipeline(
                    kind,
                    config,
                    args.registry,
                    tasks=args.tasks,
                    window=args.window,
                    concurrency=args.concurrency,
                    keep=args.keep,
                    worker_process=args.worker_process,
                    worker_stages=worker_stages(args),
                )
            )
        except Exception as exc:  # report it, and still measure the other event log
            failed.append(f"{kind}: {exc!r}")
    met_all = True
    print()
    if raw is not None:
        print(
            f"  raw confluent-kafka (idempotent producer -> consumer, {raw.records:,} Avro "
            f"records, mean value {raw.value_bytes} B): {raw.records_per_s:,.0f} records/s "
            f"(median of {len(raw.rates)} rounds, {raw.rates[0]:,.0f}..{raw.rates[-1]:,.0f})"
        )
        print(
            f"    Avro serde alone: encode {raw.encode_us:.1f} us, decode {raw.decode_us:.1f} us "
            f"per record; {raw.stage_decode_us:.1f} us decoding as a stage does (kind header, "
            "typed value); not in the raw figure"
        )
        # What the target leaves one task, against the least fastavro alone costs one task.
        budget_us = RECORDS_PER_TASK / (raw.records_per_s * TARGET_RATIO) * 1e6
        floor_us = RECORDS_PER_TASK * raw.bare_encode_us + DECODES_PER_TASK * raw.bare_decode_us
        print(
            f"    budget at the target: {budget_us:.0f} us of wall time per task "
            f"({RECORDS_PER_TASK} records at a third of raw); fastavro alone (encode "
            f"{raw.bare_encode_us:.1f} us, decode {raw.bare_decode_us:.1f} us per record) costs "
            f"{floor_us:.0f} us of one core per task ({RECORDS_PER_TASK} encodes, "
            f"{DECODES_PER_TASK} decodes) = {floor_us / budget_us:.2f} cores"
        )
    worker_process = args.worker_process
    for result in results:
        ordered = sorted(result.latencies)
        p50, p99 = statistics.median(ordered) * 1000, percentile(ordered, 0.99) * 1000
        print(
            f"  {result.kind:9s} pipeline: {result.tasks_per_s:,.0f} tasks/s = "
            f"{result.records_per_s:,.0f} records/s; latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )
        print(
            f"    CPU of this process: {result.cpu / result.tasks * 1e6:.0f} us per task "
            f"({result.cpu / result.elapsed:.2f} cores"
            + (", stages elsewhere)" if worker_process else ")")
        )
        if result.worker_cpu is not None:
            worker_us = result.worker_cpu / result.tasks * 1e6
            print(
                f"    CPU of the worker process: {worker_us:.0f} us per task "
                f"({result.worker_cpu / result.elapsed:.2f} cores); client + worker "
                f"{(result.cpu + result.worker_cpu) / result.tasks * 1e6:.0f} us per task"
            )
        if raw is not None:
            ratio = result.records_per_s / raw.records_per_s
            met = ratio >= TARGET_RATIO
            met_all &= met
            print(
                f"    ratio pipeline/raw: {ratio:.3f} (target >= {TARGET_RATIO:.3f}): "
                f"{'met' if met else 'NOT met'}"
            )
    for failure in failed:
        print(f"  pipeline FAILED, {failure}")
    if failed:
        raise SystemExit(1)
    return met_all if raw is not None and results else None


def broker_arguments(parser: argparse.ArgumentParser) -> None:
    """``--bootstrap`` and ``--registry``, defaulting to the variables ``dev up`` prints."""
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("QTASKS_BOOTSTRAP_SERVERS") or None,
        help="Kafka bootstrap servers (default: $QTASKS_BOOTSTRAP_SERVERS)",
    )
    parser.add_argument(
        "--registry",
        default=os.environ.get("QTASKS_SCHEMA_REGISTRY_URL") or None,
        help="schema registry URL (default: $QTASKS_SCHEMA_REGISTRY_URL, else mock://)",
    )


def worker_stages_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--worker-stages",
        type=_stage_list,
        default=(),
        help="comma-separated stages the worker process runs (default: all), "
        "to see what a stage costs; the worker stage among them",
    )


def _stage_list(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stages {unknown}; choose from {list(STAGES)}")
    if stages and "worker" not in stages:
        raise argparse.ArgumentTypeError("the worker stage must be among them: it runs the tasks")
    return stages


def worker_stages(args: argparse.Namespace) -> tuple[str, ...]:
    stages: tuple[str, ...] = args.worker_stages
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    broker_arguments(parser)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--window", type=int, default=256, help="tasks in flight")
    parser.add_argument("--concurrency", type=int, default=64, help="worker slots")
    parser.add_argument(
        "--event-logs",
        default=",".join(EVENT_LOGS),
        help="comma-separated subset of aiokafka,confluent (empty: the raw baseline only)",
    )
    parser.add_argument("--no-raw", action="store_true", help="skip the raw confluent baseline")
    parser.add_argument(
        "--worker-process",
        action="store_true",
        help="run the stages in a `qtasks-stream worker` process (needs --registry)",
    )
    parser.add_argument(
        "--raw-rounds", type=int, default=5, help="times the raw records are moved (median)"
    )
    worker_stages_argument(parser)
    parser.add_argument("--keep", action="store_true", help="keep the topics and subjects")
    args = parser.parse_args()
    if not args.bootstrap:
        parser.error("give --bootstrap or set QTASKS_BOOTSTRAP_SERVERS")
    if min(args.tasks, args.window, args.concurrency, args.raw_rounds) < 1:
        parser.error("--tasks, --window, --concurrency and --raw-rounds must be >= 1")
    unknown = {k.strip() for k in args.event_logs.split(",") if k.strip()} - set(EVENT_LOGS)
    if unknown:
        parser.error(f"unknown event logs {sorted(unknown)}; choose from {list(EVENT_LOGS)}")
    met = asyncio.run(run(args))
    if met is not None:
        print(f"  target (every pipeline >= 1/3 of raw): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
