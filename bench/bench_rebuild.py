"""View rebuild rate: the events topic folded from offset 0 into each view store.

A topic of synthetic task lifecycles (Submitted, Scheduled, Started, Progress, Succeeded,
Avro-encoded by the project's serde, 4 partitions) is written once; then, in the same run:

- raw consume: the same event log's consumer reads the whole topic (no group), bytes only;
- raw consume+decode: the same, plus Avro decoding into ``TaskEvent`` as ``rebuild`` does it
  (``decode_events``, the kind header as a hint; what any fold needs);
- rebuild: ``qtasks_stream.ops.replay.rebuild`` into a fresh store of each kind: memory,
  SQLite (a file in a temporary folder) and PostgreSQL when a DSN is given (a fresh schema,
  dropped afterwards).

Every measurement runs ``--rounds`` times, interleaved, and the best of each is reported.
Each starts from a collected heap with what survives frozen (``gc.freeze``, as in
``bench_tracing``): the embedded log's records and what earlier measurements left stay in
this process, and without it a measurement paid for the full collections of that heap
(the log's 100,000 records are not in a rebuild's process that reads Kafka).
Rates are events/s; each ratio is rebuild rate / raw consume+decode rate (targets: memory
at least 0.8, SQLite and PostgreSQL at least 0.5), with the ratio to bytes-only consume
beside it. Beside the wall-time ratio, the same ratio in CPU time of this process (every
thread: SQLite writes in one), which other load on a shared box moves far less; the
PostgreSQL server's CPU is not in it (its wall time is). The embedded
in-memory log is the default; ``--bootstrap`` runs the same on a real broker
(confluent-kafka event log, a fresh topic deleted at the end).

    python -m bench.bench_rebuild --events 200000
    python -m bench.bench_rebuild --events 200000 --postgres postgresql://qtasks@127.0.0.1:15432/qtasks
    python -m bench.bench_rebuild --bootstrap 127.0.0.1:39092 --postgres ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import Progress, Scheduled, Started, Submitted, Succeeded, TaskEvent
from qtasks_stream.ops.replay import decode_events, rebuild
from qtasks_stream.records import OutRecord, TopicPartition
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import ViewStore
from qtasks_stream.views.memory import MemoryViewStore
from qtasks_stream.views.sqlite import SqliteViewStore

#: Targets (issue 16): rebuild rate as a share of raw consume+decode, per store.
TARGETS = {"memory": 0.8, "sqlite": 0.5, "postgres": 0.5}
EVENTS_PER_TASK = 5
PARTITIONS = 4
#: Bound on every read of the whole topic (seconds).
READ_LIMIT = 900.0


def lifecycles(tasks: int) -> list[TaskEvent]:
    """``tasks`` successful lifecycles, interleaved in blocks of 100 tasks as in a busy log.

    Task ids are random UUIDs, as ``add_task`` makes them: stores index them in no order.
    """
    rng = random.Random(5)
    out: list[TaskEvent] = []
    for block in range(0, tasks, 100):
        ids = [
            str(uuid.UUID(int=rng.getrandbits(128), version=4))
            for _ in range(block, min(block + 100, tasks))
        ]
        steps: list[Callable[[str], TaskEvent]] = [
            lambda t: TaskEvent.new(
                t, "job", 0, "bench", Submitted("[1, 2]", "{}", 0, tags=("bench",))
            ),
            lambda t: TaskEvent.new(t, "job", 1, "bench", Scheduled(0, 0)),
            lambda t: TaskEvent.new(t, "job", 1, "bench", Started("w1")),
            lambda t: TaskEvent.new(t, "job", 1, "bench", Progress(0, "1")),
            lambda t: TaskEvent.new(t, "job", 1, "bench", Succeeded("3", 0.001)),
        ]
        for step in steps:
            out.extend(step(t) for t in ids)
    return out


async def write(
    event_log: EventLog, serde: AvroSerde, topic: str, events: Sequence[TaskEvent]
) -> None:
    producer = event_log.producer()
    await producer.start()
    try:
        for start in range(0, len(events), 5000):
            await producer.send(
                [
                    # With the headers the pipeline writes: readers take the kind as a hint.
                    OutRecord(
                        topic,
                        e.task_id.encode(),
                        serde.encode(topic, e.to_avro()),
                        e.record_headers(),
                    )
                    for e in events[start : start + 5000]
                ]
            )
    finally:
        await producer.close()


#: (events, wall seconds, CPU seconds) of one measurement.
Timing = tuple[int, float, float]


@contextlib.contextmanager
def collected_heap() -> Iterator[None]:
    """The heap collected and frozen for one measurement (see the module's docstring)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def raw_read(
    event_log: EventLog, serde: AvroSerde, topic: str, *, decode: bool, batch: int
) -> Timing:
    """Read the whole topic once, as ``rebuild`` does; returns (records, seconds, CPU)."""
    consumer = event_log.consumer([topic], group_id=None, start="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        with collected_heap():
            started, cpu = time.perf_counter(), time.process_time()
            for tp in tps:
                consumer.seek(tp, 0)
            todo = set(tps)
            count = 0
            deadline = time.monotonic() + READ_LIMIT
            while todo:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {topic} took over {READ_LIMIT}s")
                records = await consumer.poll(max_records=batch, timeout=0.5)
                count += len(records)
                # The decoding rebuild does, so the ratio is what the store costs on top of it.
                if decode and len(decode_events(serde, records)) != len(records):
                    raise AssertionError(f"{topic} holds records that do not decode")
                for tp in list(todo):
                    if (await consumer.position(tp) or 0) >= ends[tp]:
                        todo.discard(tp)
            return count, time.perf_counter() - started, time.process_time() - cpu
    finally:
        await consumer.close()


async def timed_rebuild(
    event_log: EventLog, serde: AvroSerde, topic: str, view: ViewStore, batch: int
) -> Timing:
    await view.start()
    try:
        with collected_heap():
            started, cpu = time.perf_counter(), time.process_time()
            applied = await rebuild(event_log, serde, topic, PARTITIONS, view, batch_size=batch)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        counts = await view.counts()
        assert counts == {"success": applied // EVENTS_PER_TASK}, counts
        return applied, seconds, cpu
    finally:
        await view.close()


async def main_async(args: argparse.Namespace) -> int:
    tasks = max(1, args.events // EVENTS_PER_TASK)
    topology = Topology(f"bench{uuid.uuid4().hex[:8]}", "qtasks.", PARTITIONS, 3)
    topic = topology.events
    registry = SchemaRegistryClient.new_client({"url": f"mock://{topology.app}"})
    serde = AvroSerde(registry, topology.topic_schemas())
    event_log: EventLog
    if args.bootstrap:
        from bench.bench_kafka import kafka_config, make_event_log

        event_log = make_event_log(args.event_log, kafka_config(args.bootstrap))
        where = f"Kafka at {args.bootstrap} ({args.event_log} event log)"
    else:
        event_log = InMemoryEventLog()
        where = "the embedded in-memory log"
    await event_log.create_topics([s for s in topology.specs() if s.name == topic])
    await serde.start()
    try:
        events = lifecycles(tasks)
        started = time.perf_counter()
        await write(event_log, serde, topic, events)
        print(
            f"wrote {len(events)} events ({tasks} tasks, {PARTITIONS} partitions) to {where} "
            f"in {time.perf_counter() - started:.1f}s; batch size {args.batch}",
            flush=True,
        )
        # Rounds interleave every measurement, and the best of each is kept: on a shared
        # box a burst of other load then hits all of them alike instead of one.
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for decode in (False, True):
                timing = await raw_read(event_log, serde, topic, decode=decode, batch=args.batch)
                assert timing[0] == len(events), (timing[0], len(events))
                keep(best, "consume+decode" if decode else "consume", timing)
            for name, timing in await stores(event_log, serde, topic, args):
                keep(best, name, timing)
        raw, raw_cpu = best["consume+decode"]
        print(f"best of {args.rounds} rounds (events/s by wall time, and by CPU time):")
        print(f"{'raw consume (bytes only)':<34}{best['consume'][0]:>12,.0f} events/s")
        print(
            f"{'raw consume+decode (baseline)':<34}{raw:>12,.0f} events/s"
            f"{raw_cpu:>12,.0f} per CPU s"
        )
        for name, target in TARGETS.items():
            if name not in best:
                continue
            rate, cpu_rate = best[name]
            ratio = rate / raw
            verdict = "met" if ratio >= target else "NOT met"
            print(
                f"{'rebuild into ' + name:<34}{rate:>12,.0f} events/s{cpu_rate:>12,.0f} per CPU s"
                f"  ratio {ratio:.2f} (CPU {cpu_rate / raw_cpu:.2f}), "
                f"target >= {target}: {verdict}"
            )
        return 0
    finally:
        await serde.close()
        if args.bootstrap:
            from confluent_kafka.admin import AdminClient

            AdminClient({"bootstrap.servers": args.bootstrap}).delete_topics([topic])
        await event_log.close()


def keep(best: dict[str, tuple[float, float]], name: str, timing: Timing) -> None:
    """Keep the best wall rate and the best CPU rate of ``name`` (each may be another round's)."""
    count, seconds, cpu = timing
    wall_rate, cpu_rate = best.get(name, (0.0, 0.0))
    best[name] = (max(wall_rate, count / seconds), max(cpu_rate, count / max(cpu, 1e-9)))


async def stores(
    event_log: EventLog, serde: AvroSerde, topic: str, args: argparse.Namespace
) -> list[tuple[str, Timing]]:
    rows = [("memory", await timed_rebuild(event_log, serde, topic, MemoryViewStore(), args.batch))]
    with tempfile.TemporaryDirectory(prefix="qtasks-bench-") as folder:
        sqlite = SqliteViewStore(Path(folder) / "view.sqlite")
        rows.append(("sqlite", await timed_rebuild(event_log, serde, topic, sqlite, args.batch)))
    if args.postgres:
        from qtasks_stream.views.postgres import PostgresViewStore

        schema = f"bench_{uuid.uuid4().hex[:8]}"
        store = PostgresViewStore(args.postgres, schema=schema)
        try:
            rows.append(
                ("postgres", await timed_rebuild(event_log, serde, topic, store, args.batch))
            )
        finally:
            dropper = PostgresViewStore(args.postgres, schema=schema, pool_size=1)
            await dropper.start()
            await dropper.drop()
            await dropper.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events to write and fold")
    parser.add_argument("--batch", type=int, default=5000, help="records per poll and per apply")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each (best kept)")
    parser.add_argument(
        "--event-log",
        choices=("confluent", "aiokafka"),
        default="confluent",
        help="with --bootstrap",
    )
    parser.add_argument(
        "--bootstrap", default="", help="a Kafka broker (default: the embedded in-memory log)"
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get("QTASKS_POSTGRES_DSN", ""),
        help="PostgreSQL DSN (default QTASKS_POSTGRES_DSN; none: PostgreSQL is skipped)",
    )
    args = parser.parse_args(argv)
    if not args.postgres:
        print("no PostgreSQL DSN (--postgres or QTASKS_POSTGRES_DSN): skipping it", file=sys.stderr)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
