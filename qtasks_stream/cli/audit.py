"""The audit and operations commands of ``qtasks-stream``: ``history``, ``replay``,
``resubmit``, ``snapshot`` and ``dlq list|replay``.

Only wiring: each command parses its options and calls the module that does the work
(:mod:`qtasks_stream.ops.audit`, :mod:`~qtasks_stream.ops.replay`,
:mod:`~qtasks_stream.ops.rerun`, :mod:`~qtasks_stream.ops.snapshot`,
:mod:`~qtasks_stream.ops.dlq`) on an app :mod:`qtasks_stream.cli.main` already moved onto the
deployment's settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from qtasks_stream.app import QueueTasks
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.ops import audit, dlq, rerun, snapshot
from qtasks_stream.ops.replay import compare_views, format_positions, parse_offsets, replay_into
from qtasks_stream.records import TopicPartition
from qtasks_stream.views.url import open_view

__all__ = ["COMMANDS", "add_parsers", "run"]

#: The commands this module adds (``history`` is declared by the CLI itself).
COMMANDS = ("replay", "resubmit", "snapshot", "dlq")
_SHOWN_DIFFERENCES = 50


def add_history_options(history: argparse.ArgumentParser) -> None:
    history.add_argument(
        "--as-of", default=None, help="the task as it stood then: ISO 8601 or epoch seconds"
    )
    history.add_argument(
        "--tree",
        action="store_true",
        help="the workflow the id names (its id or a step's): steps, attempts, outcomes",
    )


def add_parsers(sub: Any) -> None:
    """Add the commands of :data:`COMMANDS` to the CLI's subparsers."""
    replay = sub.add_parser("replay", help="build a new view from the log, beside the live one")
    replay.add_argument("-A", "--app", required=True, help="module:app")
    replay.add_argument("--into", required=True, help="view URL: memory:// or sqlite:///path")
    start = replay.add_mutually_exclusive_group()
    start.add_argument("--from-time", default=None, help="apply events from then on")
    start.add_argument("--from-offsets", default=None, help="PARTITION:OFFSET,... to start at")
    start.add_argument(
        "--from-snapshot", action="store_true", help="start from the latest snapshot"
    )
    replay.add_argument(
        "--verify", action="store_true", help="compare with the app's live view; exit 1 if any"
    )

    resubmit = sub.add_parser("resubmit", help="new attempts of failed or dead-lettered tasks")
    resubmit.add_argument("-A", "--app", required=True, help="module:app")
    resubmit.add_argument("--task", default=None, help="only tasks of this name")
    resubmit.add_argument(
        "--status",
        default=",".join(sorted(rerun.RESUBMITTABLE)),
        help="comma-separated statuses (default: %(default)s)",
    )
    resubmit.add_argument("--since", default=None, help="created at or after (ISO 8601/epoch)")
    resubmit.add_argument("--until", default=None, help="created before (ISO 8601/epoch)")
    resubmit.add_argument("--id", action="append", default=None, help="a task id (repeatable)")
    resubmit.add_argument("--reason", default="", help="recorded in the Resubmitted event")
    resubmit.add_argument("--dry-run", action="store_true", help="list, write nothing")

    snap = sub.add_parser("snapshot", help="write a snapshot of every task's state")
    snap.add_argument("-A", "--app", required=True, help="module:app")

    letters = sub.add_parser("dlq", help="inspect or replay the dead-letter topic")
    letters.add_argument("action", choices=["list", "replay"])
    letters.add_argument("-A", "--app", required=True, help="module:app")
    letters.add_argument("--json", action="store_true", help="list: one JSON document")
    letters.add_argument("--stage", default=None, help="only dead letters of this stage")
    letters.add_argument("--topic", default=None, help="only records of this original topic")
    letters.add_argument("--key", default=None, help="only records with this key (task id)")
    letters.add_argument("--reason-contains", default=None, help="only if the reason has this")
    letters.add_argument(
        "--offset", action="append", default=None, help="PARTITION:OFFSET in the DLQ (repeatable)"
    )
    letters.add_argument("--reason", default="", help="replay: recorded with the replay")
    letters.add_argument("--dry-run", action="store_true", help="replay: list, write nothing")


async def history(
    app: QueueTasks, task_id: str, as_json: bool, as_of: str | None, tree: bool = False
) -> int:
    if tree:
        return await _tree(app, task_id, as_json)
    try:
        at = audit.parse_time_us(as_of) if as_of is not None else None
        events = await app.history(task_id)
        # Built while the registry client is open: typed payloads need their schemas.
        document = audit.history_document(
            task_id, app.topology.events, events, at, app.payloads.decode_plain
        )
    finally:
        await app.close()
    if not events:
        print(f"no events for task {task_id} in {app.topology.events}", file=sys.stderr)
        return 1
    if at is not None and all(e.at_us > at for e in events):
        print(f"task {task_id} had no events yet at {as_of}", file=sys.stderr)
        return 1
    if as_json:
        # default=str: logical types (timestamps, UUIDs) in typed payloads.
        print(json.dumps(document, indent=2, default=str))
    else:
        print("\n".join(audit.format_history(document)))
    return 0


async def _tree(app: QueueTasks, some_id: str, as_json: bool) -> int:
    from qtasks_stream.workflows.tree import format_tree, workflow_document

    try:
        await app.connect()
        document = await workflow_document(
            app.event_log,
            app.serde,
            app.topology.events,
            app.topology.partitions,
            some_id,
            app.payloads.decode_plain,
        )
    finally:
        await app.close()
    if document is None:
        print(f"no workflow {some_id} in {app.topology.events}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(document, indent=2, default=str))
    else:
        print("\n".join(format_tree(document)))
    return 0


async def run(command: str, app: QueueTasks, args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS` on ``app``; closes it."""
    try:
        await app.connect()
        if command == "replay":
            return await _replay(app, args, sys.stdout, sys.stderr)
        if command == "resubmit":
            return await _resubmit(app, args)
        if command == "snapshot":
            return await _snapshot(app)
        return await _dlq(app, args)
    finally:
        await app.close()


async def _replay(app: QueueTasks, args: argparse.Namespace, out: TextIO, progress: TextIO) -> int:
    topology = app.topology
    if args.verify and (args.from_time or args.from_offsets):
        raise ConfigurationError(
            "--verify compares whole views: it works from offset 0 or --from-snapshot only"
        )
    start = (
        parse_offsets(args.from_offsets, topology.events, topology.partitions)
        if args.from_offsets
        else None
    )
    from_us = audit.parse_time_us(args.from_time) if args.from_time else None
    view = open_view(args.into)
    live = app.view
    await view.start()
    try:
        if args.from_snapshot:
            taken = await snapshot.read_snapshot(app.event_log, app.serde, topology)
            if taken is None:
                raise ConfigurationError(f"no snapshot in {topology.snapshots}: run `snapshot`")
            await snapshot.seed_view(view, taken)
            print(
                f"from snapshot {taken.snapshot_id}: {len(taken.states)} tasks, "
                f"offsets {format_positions(taken.covers)}",
                file=out,
            )
        until: dict[TopicPartition, int] | None = None
        if args.verify:
            await live.start()
            # Up to where the live view is, so that the two are comparable.
            live_at = await live.positions()
            until = {
                TopicPartition(topology.events, p): live_at.get(
                    TopicPartition(topology.events, p), 0
                )
                for p in range(topology.partitions)
            }
        result = await replay_into(
            view,
            app.event_log,
            app.serde,
            topology.events,
            topology.partitions,
            start=start,
            until=until,
            from_us=from_us,
            out=progress,
        )
        print(
            f"replayed {result.records} records into {args.into} in {result.seconds:.2f} s: "
            f"{result.events_per_s:,.0f} events/s ({result.applied} applied, "
            f"{result.skipped} before --from-time, {result.undecodable} undecodable); "
            f"offsets {format_positions(await view.positions())}",
            file=out,
        )
        if not args.verify:
            return 0
        differences = await compare_views(live, view)
        if await live.positions() != live_at:
            differences.append("the live view moved during the comparison: stop it and rerun")
        for line in differences[:_SHOWN_DIFFERENCES]:
            print(line, file=out)
        if len(differences) > _SHOWN_DIFFERENCES:
            print(f"... and {len(differences) - _SHOWN_DIFFERENCES} more", file=out)
        print(f"verify: {len(differences)} differences with the live view", file=out)
        return 1 if differences else 0
    finally:
        await view.close()
        if args.verify:
            await live.close()


async def _resubmit(app: QueueTasks, args: argparse.Namespace) -> int:
    statuses = frozenset(s.strip() for s in args.status.split(",") if s.strip())
    what = rerun.ResubmitFilter(
        task_name=args.task,
        statuses=statuses,
        since_us=audit.parse_time_us(args.since) if args.since else None,
        until_us=audit.parse_time_us(args.until) if args.until else None,
        task_ids=frozenset(args.id) if args.id else None,
    )
    found = await app.resubmit(what, reason=args.reason, dry_run=args.dry_run)
    chosen = [r for r in found if r.event is not None]
    for r in found:
        what_happens = (
            f"refused: {r.refused}"
            if r.refused
            else f"attempt {r.next_attempt} {'would be ' if args.dry_run else ''}resubmitted"
        )
        print(f"{r.task_id}\t{r.task_name}\t{r.status}\t{what_happens}")
    verb = "would resubmit" if args.dry_run else "resubmitted"
    print(f"{verb} {len(chosen)} tasks, refused {len(found) - len(chosen)}", file=sys.stderr)
    return 0


async def _snapshot(app: QueueTasks) -> int:
    taken, result = await snapshot.write_snapshot(
        app.event_log, app.serde, app.topology, out=sys.stderr
    )
    print(
        f"snapshot {taken.snapshot_id}: {len(taken.states)} tasks, covers "
        f"{format_positions(taken.covers)} of {app.topology.events} "
        f"({result.records} new records folded in {result.seconds:.2f} s: "
        f"{result.events_per_s:,.0f} events/s) → {app.topology.snapshots}"
    )
    return 0


def _dlq_filter(args: argparse.Namespace) -> Any:
    offsets = set()
    for text in args.offset or ():
        partition, sep, offset = text.partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise ConfigurationError(f"--offset is PARTITION:OFFSET, not {text!r}")
        offsets.add((int(partition), int(offset)))

    def select(letter: dlq.DeadLetter) -> bool:
        return (
            (args.stage is None or letter.stage == args.stage)
            and (args.topic is None or letter.source_topic == args.topic)
            and (args.key is None or letter.task_id == args.key)
            and (args.reason_contains is None or args.reason_contains in letter.reason)
            and (not offsets or (letter.partition, letter.offset) in offsets)
        )

    return select


async def _dlq(app: QueueTasks, args: argparse.Namespace) -> int:
    select = _dlq_filter(args)
    topic = app.topology.deadletter
    if args.action == "list":
        letters = [d for d in await dlq.list_dead_letters(app.event_log, app.topology) if select(d)]
        if args.json:
            print(json.dumps({"topic": topic, "records": [d.to_json(topic) for d in letters]}))
        else:
            for d in letters:
                print(
                    f"{topic}/{d.partition}/{d.offset}\tkey={d.task_id}\tstage={d.stage}\t"
                    f"source={d.source}\treason={d.reason}\theaders="
                    + ",".join(k for k, _ in d.headers)
                )
            print(f"{len(letters)} dead letters", file=sys.stderr)
        return 0
    outcomes = await dlq.replay(
        app.event_log,
        app.serde,
        app.topology,
        select,
        reason=args.reason,
        dry_run=args.dry_run,
    )
    for o in outcomes:
        print(f"{topic}/{o.letter.partition}/{o.letter.offset}\t{o.letter.source}\t{o.result}")
    replayed = sum(o.result in ("replayed", "would replay") for o in outcomes)
    print(f"{replayed} of {len(outcomes)} selected dead letters replayed", file=sys.stderr)
    return 0
