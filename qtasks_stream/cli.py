"""``qtasks-stream``: the command line, and the only place that reads the environment.

Commands: ``demo``, ``worker -A module:app``, ``history TASK_ID -A module:app``,
``replay``, ``resubmit``, ``snapshot``, ``dlq list|replay`` (see :mod:`.cli_audit`),
``schedules add|list|pause|resume|delete|runs -A module:app`` (see :mod:`.schedules.cli`),
``schemas check|register -A module:app`` and ``dev up|down|status [--postgres]``. With
``QTASKS_BOOTSTRAP_SERVERS`` set, apps run on that Kafka
(``QTASKS_EVENT_LOG`` = aiokafka or confluent, ``QTASKS_SCHEMA_REGISTRY_URL``,
``QTASKS_TOPIC_PREFIX``, ``QTASKS_INSTANCE_ID``, ``QTASKS_TRANSACTION_TIMEOUT_MS``, security
settings ``QTASKS_SECURITY_PROTOCOL``/``QTASKS_SASL_*``/``QTASKS_SSL_CAFILE`` and
``QTASKS_KAFKA_EXTRA`` as a JSON object of client properties); otherwise on the embedded
default. ``worker`` and ``demo`` trace and measure through OpenTelemetry when the standard
``OTEL_*`` settings ask for it (see ``qtasks_stream.telemetry.config``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qtasks_stream import cli_audit
from qtasks_stream.app import STAGES, QueueTasks
from qtasks_stream.errors import ConfigurationError, QTasksStreamError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.schedules import cli as schedules_cli
from qtasks_stream.telemetry.config import Telemetry

__all__ = ["main"]

#: Seconds one registry request may take before the client retries it.
_REGISTRY_TIMEOUT_S = 10


def load_app(spec: str) -> QueueTasks:
    """``module:attribute`` → the QueueTasks it names (an app, or a function returning one)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"-A wants module:app, not {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    target = getattr(module, attr, None)
    if callable(target) and not isinstance(target, QueueTasks):
        try:
            target = target()  # an app factory
        except TypeError as exc:
            raise ConfigurationError(
                f"{spec!r} is a callable that is not an app factory: {exc}"
            ) from exc
    if not isinstance(target, QueueTasks):
        raise ConfigurationError(f"{spec!r} is not a QueueTasks app (got {type(target).__name__})")
    return target


def event_log_from_env(env: Mapping[str, str]) -> EventLog | None:
    """The Kafka event log the environment asks for, or None for the embedded default."""
    bootstrap = env.get("QTASKS_BOOTSTRAP_SERVERS", "")
    if not bootstrap:
        return None
    from qtasks_stream.eventlog.kafka_config import KafkaConfig

    extra = json.loads(env.get("QTASKS_KAFKA_EXTRA", "{}"))
    config = KafkaConfig(
        bootstrap_servers=bootstrap,
        security_protocol=env.get("QTASKS_SECURITY_PROTOCOL", "PLAINTEXT"),
        sasl_mechanism=env.get("QTASKS_SASL_MECHANISM") or None,
        sasl_username=env.get("QTASKS_SASL_USERNAME") or None,
        sasl_password=env.get("QTASKS_SASL_PASSWORD") or None,
        ssl_cafile=env.get("QTASKS_SSL_CAFILE") or None,
        transaction_timeout_ms=int(env.get("QTASKS_TRANSACTION_TIMEOUT_MS", "10000")),
        extra=extra,
    )
    kind = env.get("QTASKS_EVENT_LOG", "confluent")
    if kind == "aiokafka":
        from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog

        return AioKafkaEventLog(config)
    if kind == "confluent":
        from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog

        return ConfluentEventLog(config)
    raise ConfigurationError(f"QTASKS_EVENT_LOG must be aiokafka or confluent, not {kind!r}")


def configure(app: QueueTasks, env: Mapping[str, str]) -> QueueTasks:
    """Move ``app`` onto what the environment configures (nothing set: embedded default)."""
    event_log = event_log_from_env(env)
    registry = None
    url = env.get("QTASKS_SCHEMA_REGISTRY_URL", "")
    if url:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        # Bounded: the client's default is to wait forever; with a timeout it retries instead.
        conf: dict[str, Any] = {"url": url, "timeout": _REGISTRY_TIMEOUT_S}
        if env.get("QTASKS_SCHEMA_REGISTRY_AUTH"):
            conf["basic.auth.user.info"] = env["QTASKS_SCHEMA_REGISTRY_AUTH"]
        registry = SchemaRegistryClient(conf)
    prefix = env.get("QTASKS_TOPIC_PREFIX") or None
    instance = env.get("QTASKS_INSTANCE_ID") or None
    if event_log is not None or registry is not None or prefix or instance:
        app.use(
            event_log=event_log,
            schema_registry=registry,
            topic_prefix=prefix,
            instance_id=instance,
            own_registry=registry is not None,
        )
    return app


def telemetry_from(app: QueueTasks, env: Mapping[str, str]) -> Telemetry | None:
    """Install the tracing and metrics the ``OTEL_*`` settings ask for on ``app``; returns
    what to shut down at exit (None when telemetry is off: no interceptor, no cost)."""
    from qtasks_stream.telemetry.config import telemetry_from_env

    telemetry = telemetry_from_env(
        env,
        service_name=f"qtasks-stream.{app.name}",
        messaging_system="kafka" if env.get("QTASKS_BOOTSTRAP_SERVERS") else "qtasks.memory",
    )
    if telemetry is not None:
        for interceptor in telemetry.interceptors:
            app.add_interceptor(interceptor)
    return telemetry


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtasks-stream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the demo job through every stage")
    demo.add_argument("--tasks", type=int, default=2000, help="tasks to submit (>= 5)")
    demo.add_argument("--name", default="demo", help="application name")

    worker = sub.add_parser("worker", help="run the stages of an app until SIGINT/SIGTERM")
    worker.add_argument("-A", "--app", required=True, help="module:app")
    worker.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}"
    )
    worker.add_argument(
        "--snapshot-every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="also write a snapshot of every task's state this often (see `snapshot`)",
    )

    history = sub.add_parser("history", help="every event of one task, read from the log")
    history.add_argument("task_id")
    history.add_argument("-A", "--app", required=True, help="module:app")
    history.add_argument("--json", action="store_true", help="one JSON document, by attempt")
    cli_audit.add_history_options(history)
    cli_audit.add_parsers(sub)
    schedules_cli.add_parser(sub)

    schemas = sub.add_parser(
        "schemas", help="check or register an app's Avro schemas (a gate for CI pipelines)"
    )
    schemas.add_argument("action", choices=["check", "register"])
    schemas.add_argument("-A", "--app", required=True, help="module:app")
    schemas.add_argument(
        "--level", default=None, help="compatibility level (default BACKWARD_TRANSITIVE)"
    )

    dev = sub.add_parser(
        "dev", help="a local Kafka broker (and optionally PostgreSQL) for development and tests"
    )
    dev.add_argument("action", choices=["up", "down", "status"])
    dev.add_argument("--home", default=None, help="folder for jars, data and logs")
    dev.add_argument("--wipe", action="store_true", help="with down: delete data and logs")
    dev.add_argument(
        "--no-registry", action="store_true", help="the broker only, without the schema registry"
    )
    dev.add_argument(
        "--postgres",
        action="store_true",
        help="also PostgreSQL (the machine's own, on 127.0.0.1:15432) for the PostgreSQL view",
    )
    return parser


async def _run_worker(
    app: QueueTasks, stages: Sequence[str], snapshot_every: float | None = None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await app.start(stages)
    print(
        f"worker {app.instance_id}: running {', '.join(stages)} of app {app.name!r}"
        + (f", a snapshot every {snapshot_every:g}s" if snapshot_every else ""),
        file=sys.stderr,
    )
    snapshots: asyncio.Task[int] | None = None
    if snapshot_every:
        from qtasks_stream.snapshot import snapshot_every as every

        snapshots = asyncio.create_task(
            every(snapshot_every, app.event_log, app.serde, app.topology, stop)
        )
    try:
        await stop.wait()
        if snapshots is not None:
            await snapshots  # ends at the stop (a snapshot being written finishes first)
    finally:
        await app.close()


def _dev(
    action: str,
    home: str | None,
    wipe: bool,
    registry: bool,
    postgres: bool,
    env: Mapping[str, str],
) -> int:
    from qtasks_stream.devenv.kafka import DevKafka
    from qtasks_stream.devenv.postgres import DevPostgres
    from qtasks_stream.devenv.registry import DevRegistry

    folder = Path(home or env.get("QTASKS_DEV_HOME") or Path.cwd() / ".cache" / "dev")
    broker = DevKafka(home=folder / "kafka")
    schemas = DevRegistry(home=folder / "registry") if registry else None
    database = DevPostgres(home=folder / "postgres") if postgres else None
    if action == "up":
        bootstrap = broker.up()
        print(f"export QTASKS_BOOTSTRAP_SERVERS={bootstrap}")
        if schemas is not None:
            print(f"export QTASKS_SCHEMA_REGISTRY_URL={schemas.up()}")
        if database is not None:
            print(f"export QTASKS_POSTGRES_DSN={database.up()}")
        return 0
    if action == "down":
        if database is not None:
            database.down(wipe=wipe)
        if schemas is not None:
            schemas.down(wipe=wipe)
        broker.down(wipe=wipe)
        return 0
    kafka_status = broker.status()
    print(f"# kafka: {kafka_status}", file=sys.stderr)
    running = kafka_status.running
    if running:
        print(f"export QTASKS_BOOTSTRAP_SERVERS={kafka_status.bootstrap}")
    if schemas is not None:
        registry_status = schemas.status()
        print(f"# registry: {registry_status}", file=sys.stderr)
        if registry_status.running:
            print(f"export QTASKS_SCHEMA_REGISTRY_URL={registry_status.url}")
        running = running and registry_status.running
    if database is not None:
        postgres_status = database.status()
        print(f"# postgres: {postgres_status}", file=sys.stderr)
        if postgres_status.running:
            print(f"export QTASKS_POSTGRES_DSN={postgres_status.dsn}")
        running = running and postgres_status.running
    return 0 if running else 1


def _schemas(action: str, app: QueueTasks, level: str | None, env: Mapping[str, str]) -> int:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from qtasks_stream.serde.compat import (
        DEFAULT_COMPATIBILITY,
        check_compatibility,
        register_schemas,
        subject_schemas_for,
    )

    url = env.get("QTASKS_SCHEMA_REGISTRY_URL", "")
    if not url:
        raise ConfigurationError("set QTASKS_SCHEMA_REGISTRY_URL to the registry to check against")
    conf: dict[str, Any] = {"url": url, "timeout": _REGISTRY_TIMEOUT_S}
    if env.get("QTASKS_SCHEMA_REGISTRY_AUTH"):
        conf["basic.auth.user.info"] = env["QTASKS_SCHEMA_REGISTRY_AUTH"]
    # The topics' subjects and the typed tasks' argument and result subjects.
    subjects = subject_schemas_for(app.topology)
    subjects.update(app.payloads.subject_schemas(app.definitions.values()))
    with SchemaRegistryClient(conf) as registry:
        if action == "check":
            problems = check_compatibility(registry, subjects, level or DEFAULT_COMPATIBILITY)
            for problem in problems:
                print(problem)
            print(f"{len(subjects)} subjects checked, {len(problems)} problems", file=sys.stderr)
            return 1 if problems else 0
        ids = register_schemas(registry, subjects, level or DEFAULT_COMPATIBILITY)
        for subject, schema_id in sorted(ids.items()):
            print(f"{subject}\t{schema_id}")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    env = os.environ
    try:
        if args.command == "demo":
            from qtasks_stream.demo import build_demo_app, run_demo

            app = configure(QueueTasks(args.name), env)
            telemetry = telemetry_from(app, env)
            try:
                asyncio.run(run_demo(build_demo_app(app), args.tasks, sys.stdout))
            finally:
                if telemetry is not None:
                    telemetry.shutdown()  # flushes what the exporters still hold
            return 0
        if args.command == "worker":
            app = configure(load_app(args.app), env)
            telemetry = telemetry_from(app, env)
            stages = [s.strip() for s in args.stages.split(",") if s.strip()]
            try:
                if args.snapshot_every is not None and not args.snapshot_every > 0:
                    raise ConfigurationError(
                        f"--snapshot-every must be > 0 seconds, not {args.snapshot_every:g}"
                    )
                asyncio.run(_run_worker(app, stages, args.snapshot_every))
            finally:
                if telemetry is not None:
                    telemetry.shutdown()
            return 0
        if args.command == "history":
            app = configure(load_app(args.app), env)
            return asyncio.run(cli_audit.history(app, args.task_id, args.json, args.as_of))
        if args.command in cli_audit.COMMANDS:
            app = configure(load_app(args.app), env)
            return asyncio.run(cli_audit.run(args.command, app, args))
        if args.command == "schedules":
            app = configure(load_app(args.app), env)
            return asyncio.run(schedules_cli.run(app, args))
        if args.command == "schemas":
            app = configure(load_app(args.app), env)
            return _schemas(args.action, app, args.level, env)
        return _dev(args.action, args.home, args.wipe, not args.no_registry, args.postgres, env)
    except QTasksStreamError as exc:
        print(f"qtasks-stream: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
