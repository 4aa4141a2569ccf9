"""A workflow as the log has it: its canvas, and per step its task, attempts and outcome
(``qtasks-stream history --tree``).

Every step of a workflow is on the workflow's partition, so one partition is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qtasks_stream.errors import RecordDecodeError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.partitioning import murmur2_partition
from qtasks_stream.eventlog.reading import read_records
from qtasks_stream.events import CancelRequested, Submitted, TaskEvent
from qtasks_stream.ops.audit import BytesDecoder, history_document
from qtasks_stream.records import Record
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.codec import RecordCodec
from qtasks_stream.workflows.canvas import Chain, Group, Node, Signature, child, parse
from qtasks_stream.workflows.fold import StepOutcome, advance, is_step_id

__all__ = ["TREE_FORMAT", "format_tree", "workflow_document"]

TREE_FORMAT = "qtasks.workflow.v1"
_FAILED = frozenset({"error", "cancel", "timeout", "dead_letter"})


async def workflow_document(
    event_log: EventLog,
    serde: Serde,
    topic: str,
    partitions: int,
    some_id: str,
    decode: BytesDecoder | None = None,
) -> dict[str, Any] | None:
    """The workflow ``some_id`` names (its id, or a step's), as one JSON-ready document;
    None when the log has no workflow of that id."""
    partition = murmur2_partition(some_id.encode(), partitions)
    wanted = some_id.encode()
    events: dict[str, list[TaskEvent]] = {}
    codec = RecordCodec(serde)

    async def keep(records: list[Record]) -> None:
        for rec in records:
            if rec.key is None or rec.value is None:
                continue
            if not (is_step_id(rec.key) or rec.key == wanted):
                continue
            try:
                event = codec.event(rec)
            except RecordDecodeError:
                continue  # dead-lettered, and its DeadLettered event says so
            events.setdefault(event.task_id, []).append(event)

    await read_records(event_log, topic, partitions, keep, only=[partition])
    workflow_id = some_id
    for event in events.get(some_id, ()):
        if isinstance(event.payload, Submitted) and event.payload.workflow_id:
            workflow_id = event.payload.workflow_id
    steps: dict[str, tuple[Submitted, list[TaskEvent]]] = {}
    for history in events.values():
        first = history[0].payload
        if isinstance(first, Submitted) and first.workflow_id == workflow_id:
            assert first.workflow_step is not None
            steps[first.workflow_step] = (first, history)
    if not steps:
        return None
    text = next(s.workflow for s, _ in steps.values() if s.workflow)
    assert text is not None
    canvas = parse(text)
    outcomes: dict[str, StepOutcome] = {}
    docs: dict[str, dict[str, Any]] = {}
    for path, (submitted, history) in steps.items():
        task_id = history[0].task_id
        doc = history_document(task_id, topic, history, None, decode)
        status = doc["status"]
        outcomes[path] = StepOutcome(
            task_id,
            "succeeded" if status == "success" else "failed" if status in _FAILED else "running",
        )
        docs[path] = {
            "path": path,
            "task_id": task_id,
            "task_name": doc["task_name"],
            "status": status,
            "group_id": submitted.group_id,
            "parents": list(submitted.workflow_parents),
            "attempts": [
                {k: v for k, v in attempt.items() if k != "events"}
                for attempt in doc["attempts"]
                if attempt["attempt"] > 0
            ],
        }
    cancelled = any(isinstance(e.payload, CancelRequested) for e in events.get(workflow_id, ()))
    root = advance(canvas, outcomes, [])
    status = "cancelled" if cancelled and root.status == "running" else root.status
    return {
        "format": TREE_FORMAT,
        "workflow_id": workflow_id,
        "events_topic": topic,
        "status": status,
        "cancel_requested": cancelled,
        "tree": _node(canvas, "", docs),
    }


def _node(node: Node, path: str, docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(node, Signature):
        path = path or "0"
        return {"type": "task", "task": node.task, "step": docs.get(path, {"path": path})}
    if isinstance(node, Chain):
        children: Sequence[Node] = node.steps
        kind = "chain"
    elif isinstance(node, Group):
        children, kind = node.members, "group"
    else:
        header = _node(node.header, path, docs)
        body = _node(node.body, child(path, "body"), docs)
        return {
            "type": "chord",
            "path": path,
            "on_error": node.on_error,
            "header": header,
            "body": body,
        }
    return {
        "type": kind,
        "path": path,
        "children": [_node(c, child(path, i), docs) for i, c in enumerate(children)],
    }


def format_tree(document: dict[str, Any]) -> list[str]:
    """The text listing of a :func:`workflow_document`: one line per node, indented."""
    lines = [f"workflow {document['workflow_id']}: {document['status']}"]

    def walk(node: dict[str, Any], depth: int) -> None:
        pad = "  " * depth
        if node["type"] == "task":
            step = node["step"]
            if "task_id" not in step:
                lines.append(f"{pad}{step['path']} {node['task']}: not submitted")
                return
            lines.append(f"{pad}{step['path']} {node['task']} {step['task_id']}: {step['status']}")
            for attempt in step["attempts"]:
                parts = [f"{pad}  attempt {attempt['attempt']}"]
                if attempt["worker_id"]:
                    parts.append(f"on {attempt['worker_id']}")
                if attempt["outcome"]:
                    parts.append(f"→ {attempt['outcome']}")
                if attempt["error"]:
                    parts.append(f"{attempt['error']['type']}: {attempt['error']['message']}")
                lines.append("  ".join(parts))
            return
        if node["type"] == "chord":
            lines.append(f"{pad}chord (on_error={node['on_error']})")
            walk(node["header"], depth + 1)
            lines.append(f"{pad}  then")
            walk(node["body"], depth + 1)
            return
        lines.append(f"{pad}{node['type']}")
        for c in node["children"]:
            walk(c, depth + 1)

    walk(document["tree"], 1)
    return lines
