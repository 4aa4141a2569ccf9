"""``qtasks-stream``: the command line.

Commands: ``demo``, ``worker -A module:app``, ``history TASK_ID -A module:app``,
``replay``, ``resubmit``, ``snapshot``, ``dlq list|replay`` (see :mod:`.audit`),
``schedules add|list|pause|resume|delete|runs -A module:app`` (see :mod:`.schedules`),
``schemas check|register -A module:app``, ``acl grant|list`` (see docs/security.md) and
``dev up|down|status [--postgres] [--secure]``. Each command builds
:class:`~qtasks_stream.settings.Settings` from the environment (the variables
are in docs/configuration.md) and moves the app it loads onto them. ``worker`` and the
commands that read a deployment's log refuse the embedded in-memory default; ``demo`` runs on
it. ``worker`` and ``demo`` trace and measure through OpenTelemetry when the standard
``OTEL_*`` settings ask for it (see ``qtasks_stream.telemetry.config``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from qtasks_stream.acl.roles import ROLES
from qtasks_stream.app import STAGES, QueueTasks
from qtasks_stream.cli import audit as cli_audit
from qtasks_stream.cli import console as console_command
from qtasks_stream.cli import schedules as schedules_cli
from qtasks_stream.errors import ConfigurationError, QTasksStreamError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.settings import Settings
from qtasks_stream.telemetry.config import Telemetry

__all__ = ["main"]


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


def telemetry_from(app: QueueTasks, settings: Settings) -> Telemetry | None:
    """Install the tracing and metrics the ``OTEL_*`` settings ask for on ``app``; returns
    what to shut down at exit (None when telemetry is off: no interceptor, no cost)."""
    from qtasks_stream.telemetry.config import telemetry_from_env

    telemetry = telemetry_from_env(
        settings.telemetry,
        service_name=f"qtasks-stream.{app.name}",
        messaging_system="kafka" if settings.shared_log else "qtasks.memory",
    )
    if telemetry is not None:
        for interceptor in telemetry.interceptors:
            app.add_interceptor(interceptor)
    return telemetry


def _shared(command: str, app: QueueTasks) -> QueueTasks:
    """``app``, if its event log is one other processes can reach: a command that reads or
    feeds the log of a deployment refuses the private in-memory log (it would read nothing,
    or run tasks nobody submits)."""
    if isinstance(app.event_log, InMemoryEventLog):
        raise ConfigurationError(
            f"`{command}` needs the deployment's Kafka event log, but none is configured (the "
            "embedded in-memory log lives in this process only): set QTASKS_BOOTSTRAP_SERVERS "
            "to host:port, and QTASKS_SCHEMA_REGISTRY_URL to its schema registry "
            "(see docs/configuration.md)"
        )
    return app


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
    worker.add_argument(
        "--queues",
        default=None,
        help="comma-separated named queues whose work this worker takes "
        "(default: every queue the app's tasks name)",
    )

    history = sub.add_parser("history", help="every event of one task, read from the log")
    history.add_argument("task_id")
    history.add_argument("-A", "--app", required=True, help="module:app")
    history.add_argument("--json", action="store_true", help="one JSON document, by attempt")
    cli_audit.add_history_options(history)
    cli_audit.add_parsers(sub)
    console_command.add_parser(sub)
    schedules_cli.add_parser(sub)

    schemas = sub.add_parser(
        "schemas", help="check or register an app's Avro schemas (a gate for CI pipelines)"
    )
    schemas.add_argument("action", choices=["check", "register"])
    schemas.add_argument("-A", "--app", required=True, help="module:app")
    schemas.add_argument(
        "--level", default=None, help="compatibility level (default BACKWARD_TRANSITIVE)"
    )

    acl = sub.add_parser(
        "acl", help="grant or list the Kafka ACLs of an app's roles (docs/security.md)"
    )
    acl.add_argument("action", choices=["grant", "list"])
    acl.add_argument("-A", "--app", default=None, help="module:app (grant: required)")
    acl.add_argument("--principal", default=None, help="User:NAME (grant: required)")
    acl.add_argument("--role", choices=ROLES, default=None)
    acl.add_argument(
        "--reader-groups",
        default=None,
        metavar="PREFIX",
        help="with --role reader: the consumer-group prefix it may use "
        "(default <prefix><app>.reader.)",
    )

    dev = sub.add_parser(
        "dev", help="a local Kafka broker (and optionally PostgreSQL) for development and tests"
    )
    dev.add_argument("action", choices=["up", "down", "status"])
    dev.add_argument(
        "--home",
        default=None,
        help="folder for jars, data and logs (default: $QTASKS_DEV_HOME, else "
        "$XDG_CACHE_HOME/qtasks-stream/dev, else ~/.cache/qtasks-stream/dev)",
    )
    dev.add_argument("--wipe", action="store_true", help="with down: delete data and logs")
    dev.add_argument(
        "--secure",
        action="store_true",
        help="with up: SASL_SSL (SCRAM-SHA-512), a local CA and deny-by-default ACLs "
        "(see docs/security.md)",
    )
    dev.add_argument(
        "--no-registry", action="store_true", help="the broker only, without the schema registry"
    )
    dev.add_argument(
        "--postgres",
        action="store_true",
        help="also PostgreSQL (the machine's own) for the PostgreSQL view",
    )
    # Chosen ports are recorded in the home: status and down find them without the options.
    for option, default, variable in (
        ("--port", 19092, "QTASKS_DEV_PORT"),
        ("--controller-port", 19093, "QTASKS_DEV_CONTROLLER_PORT"),
        ("--registry-port", 18081, "QTASKS_DEV_REGISTRY_PORT"),
        ("--postgres-port", 15432, "QTASKS_DEV_POSTGRES_PORT"),
    ):
        dev.add_argument(
            option, type=int, default=None, help=f"with up (default ${variable}, else {default})"
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
        from qtasks_stream.ops.snapshot import snapshot_every as every

        snapshots = asyncio.create_task(
            every(snapshot_every, app.event_log, app.serde, app.topology, stop)
        )
    try:
        await stop.wait()
        if snapshots is not None:
            await snapshots  # ends at the stop (a snapshot being written finishes first)
    finally:
        await app.close()


def _dev(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from qtasks_stream.devenv.environment import DevEnvironment, home_from, ports_from

    ports = ports_from(
        {
            "kafka": args.port,
            "controller": args.controller_port,
            "registry": args.registry_port,
            "postgres": args.postgres_port,
        },
        env,
    )
    # up says whether the broker is secured; status and down find it in the home's record.
    secure = args.secure if args.action == "up" else None
    dev = DevEnvironment(home_from(args.home, env), ports, secure=secure)
    registry = not args.no_registry
    if args.action == "down":
        dev.down(wipe=args.wipe, registry=registry, postgres=args.postgres)
        return 0
    if args.action == "up":
        exports, code = dev.up(registry=registry, postgres=args.postgres), 0
    else:
        status = dev.status(registry=registry, postgres=args.postgres)
        for service in (status.kafka, status.registry, status.postgres):
            if service is not None:
                print(f"# {service}", file=sys.stderr)
        exports, code = status.exports(), 0 if status.running else 1
    for name, value in exports.items():
        print(f"export {name}={value}")
    return code


def _acl(args: argparse.Namespace, settings: Settings) -> int:
    from qtasks_stream.acl.kafka import grant, list_acls

    # The settings' principal must be allowed to alter the cluster's ACLs (a super user).
    config = settings.kafka_config()
    if args.action == "list":
        for line in list_acls(config, args.principal):
            print(line)
        return 0
    if not (args.app and args.principal and args.role):
        raise ConfigurationError("acl grant needs -A module:app, --principal User:NAME and --role")
    app = load_app(args.app).configure(settings)
    for rule in grant(
        config, app.topology, args.principal, args.role, reader_groups=args.reader_groups
    ):
        print(f"{args.principal} ALLOW {rule}")
    return 0


def _schemas(action: str, app: QueueTasks, level: str | None, settings: Settings) -> int:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from qtasks_stream.serde.compat import (
        DEFAULT_COMPATIBILITY,
        check_compatibility,
        register_schemas,
        subject_schemas_for,
    )

    conf = settings.registry_conf()
    if conf is None:
        raise ConfigurationError("set QTASKS_SCHEMA_REGISTRY_URL to the registry to check against")
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
        settings = Settings.from_env(env)
        if args.command == "demo":
            from qtasks_stream.demo import build_demo_app, run_demo

            app = QueueTasks(args.name, settings=settings)
            telemetry = telemetry_from(app, settings)
            try:
                asyncio.run(run_demo(build_demo_app(app), args.tasks, sys.stdout))
            finally:
                if telemetry is not None:
                    telemetry.shutdown()  # flushes what the exporters still hold
            return 0
        if args.command == "worker":
            if args.snapshot_every is not None and not args.snapshot_every > 0:
                raise ConfigurationError(
                    f"--snapshot-every must be > 0 seconds, not {args.snapshot_every:g}"
                )
            loaded = load_app(args.app)
            if args.queues is not None:
                loaded.serve_queues(q.strip() for q in args.queues.split(",") if q.strip())
            app = _shared("worker", loaded.configure(settings))
            telemetry = telemetry_from(app, settings)
            stages = [s.strip() for s in args.stages.split(",") if s.strip()]
            try:
                asyncio.run(_run_worker(app, stages, args.snapshot_every))
            finally:
                if telemetry is not None:
                    telemetry.shutdown()
            return 0
        if args.command == "history":
            app = _shared("history", load_app(args.app).configure(settings))
            return asyncio.run(
                cli_audit.history(app, args.task_id, args.json, args.as_of, args.tree)
            )
        if args.command in cli_audit.COMMANDS:
            app = _shared(args.command, load_app(args.app).configure(settings))
            return asyncio.run(cli_audit.run(args.command, app, args))
        if args.command == "console":
            app = load_app(args.app).configure(settings)
            token = env.get(console_command.TOKEN_VARIABLE) or None
            return console_command.run(app, args, token, settings.shared_log)
        if args.command == "schedules":
            app = _shared("schedules", load_app(args.app).configure(settings))
            return asyncio.run(schedules_cli.run(app, args))
        if args.command == "acl":
            return _acl(args, settings)
        if args.command == "schemas":
            app = load_app(args.app).configure(settings)
            return _schemas(args.action, app, args.level, settings)
        return _dev(args, env)
    except QTasksStreamError as exc:
        print(f"qtasks-stream: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
