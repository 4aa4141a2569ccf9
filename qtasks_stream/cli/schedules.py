"""``qtasks-stream schedules add|list|pause|resume|delete|runs -A module:app``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.schedules.api import run_tick
from qtasks_stream.schedules.records import Schedule
from qtasks_stream.schedules.timing import iso

if TYPE_CHECKING:
    from qtasks_stream.app import QueueTasks

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add the ``schedules`` command to the CLI's subparsers ``sub``."""
    parser = sub.add_parser("schedules", help="define, pause, resume, delete or list schedules")
    actions = parser.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="create a schedule, or change it to this definition")
    add.add_argument("name")
    add.add_argument("--task", required=True, help="registered task each tick submits")
    when = add.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="five-field cron expression, e.g. '0 2 * * *'")
    when.add_argument("--every", type=float, metavar="SECONDS", help="interval in seconds")
    add.add_argument("--tz", default="UTC", help="IANA time zone of the cron (default UTC)")
    add.add_argument("--args", default="[]", help="JSON array of positional arguments")
    add.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    add.add_argument("--catch-up", choices=["skip", "one", "all"], default="one")
    add.add_argument("--catch-up-limit", type=int, default=10)
    add.add_argument("--overlap", choices=["skip", "allow"], default="skip")
    add.add_argument("--tag", action="append", default=[], help="tag of each run (repeatable)")
    listing = actions.add_parser("list", help="every schedule and its latest tick")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    for action in ("pause", "resume", "delete"):
        actions.add_parser(action, help=f"{action} a schedule").add_argument("name")
    runs = actions.add_parser("runs", help="every run of a schedule in the log, by tick")
    runs.add_argument("name")
    runs.add_argument("--json", action="store_true", help="one JSON object per line")
    for action in actions.choices.values():
        action.add_argument("-A", "--app", required=True, help="module:app")


async def run(app: QueueTasks, args: argparse.Namespace) -> int:
    try:
        if args.action == "add":
            positional = json.loads(args.args)
            keywords = json.loads(args.kwargs)
            if not isinstance(positional, list) or not isinstance(keywords, dict):
                raise ConfigurationError("--args must be a JSON array, --kwargs a JSON object")
            every = timedelta(seconds=args.every) if args.every is not None else None
            schedule = await app.schedules.add(
                args.name,
                task=args.task,
                cron=args.cron,
                every=every,
                tz=args.tz,
                args=positional,
                kwargs=keywords,
                catch_up=args.catch_up,
                catch_up_limit=args.catch_up_limit,
                overlap=args.overlap,
                tags=args.tag,
            )
            print(_line(schedule))
        elif args.action == "list":
            for schedule in await app.schedules.all():
                print(json.dumps(_document(schedule)) if args.json else _line(schedule))
        elif args.action == "runs":
            for state in await app.schedules.runs(args.name):
                run = {
                    "tick": run_tick(state),
                    "task_id": state.task_id,
                    "status": state.status,
                    "attempt": state.attempt,
                }
                print(json.dumps(run) if args.json else "\t".join(map(str, run.values())))
        elif args.action == "pause":
            print(_line(await app.schedules.pause(args.name)))
        elif args.action == "resume":
            print(_line(await app.schedules.resume(args.name)))
        else:
            await app.schedules.delete(args.name)
            print(f"deleted {args.name}", file=sys.stderr)
        return 0
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"--args/--kwargs are not JSON: {exc}") from exc
    finally:
        await app.close()


def _document(schedule: Schedule) -> dict[str, Any]:
    definition = schedule.definition
    assert definition is not None
    tick = schedule.tick
    return {
        "name": schedule.name,
        "task": definition.task,
        "cron": definition.cron,
        "every_s": definition.every_us / 1e6 if definition.every_us is not None else None,
        "tz": definition.timezone,
        "paused": definition.paused,
        "catch_up": definition.catch_up,
        "catch_up_limit": definition.catch_up_limit,
        "overlap": definition.overlap,
        "last_tick": iso(tick.tick_us) if tick is not None else None,
        "last_outcome": tick.outcome if tick is not None else None,
        "last_task_id": tick.task_id if tick is not None else None,
    }


def _line(schedule: Schedule) -> str:
    doc = _document(schedule)
    when = f"cron {doc['cron']!r} {doc['tz']}" if doc["cron"] else f"every {doc['every_s']:g}s"
    state = "paused" if doc["paused"] else "active"
    last = (
        f"last {doc['last_tick']} {doc['last_outcome']} {doc['last_task_id'] or '-'}"
        if doc["last_tick"]
        else "no tick yet"
    )
    return f"{doc['name']}\t{doc['task']}\t{when}\t{state}\t{last}"
