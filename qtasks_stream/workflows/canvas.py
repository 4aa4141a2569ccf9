"""The canvas: signatures (``task.s(...)``), ``chain``, ``group`` and ``chord``, and their JSON.

A canvas is plain data. It travels as JSON in the ``workflow`` field of every step's
``Submitted`` event, so whichever workflow stage instance reads a step can fold the whole
workflow. Each node has a path: the indexes from the root, joined by ``.`` (a chord's
callback is ``body``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from qtasks_stream.errors import ConfigurationError

if TYPE_CHECKING:
    from qtasks_stream.client import TaskClient
    from qtasks_stream.workflows.client import WorkflowHandle

__all__ = ["Chain", "Chord", "Group", "Node", "Signature", "chain", "chord", "group", "parse"]

#: ``chord(on_error=...)``: "stop" runs the callback only if every member succeeded; "pass"
#: runs it anyway, with a failure (a dict: task_id, status, error_type, message) in place of
#: each failed member's result.
OnError = Literal["stop", "pass"]


class _Canvas:
    __slots__ = ()

    async def apply(self, client: TaskClient) -> WorkflowHandle:
        """Submit the workflow; returns its handle (its id, a way to wait and to cancel)."""
        return await client.run_workflow(self)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Signature(_Canvas):
    """A task and the arguments it gets besides its input (the result of what ran before it,
    which becomes its first positional argument)."""

    task: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Chain(_Canvas):
    """Steps one after the other; each one's result is the next one's first argument."""

    steps: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Group(_Canvas):
    """Members run in parallel (each gets the group's input); the result is their results in
    member order."""

    members: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Chord(_Canvas):
    """A group, then a callback that gets the list of its results."""

    header: Group
    body: Node
    on_error: OnError = "stop"


Node = Signature | Chain | Group | Chord


def _nodes(steps: Sequence[Any], what: str) -> tuple[Node, ...]:
    if len(steps) == 1 and isinstance(steps[0], list | tuple):
        steps = steps[0]
    if not steps:
        raise ConfigurationError(f"{what} needs at least one step")
    for step in steps:
        if not isinstance(step, Signature | Chain | Group | Chord):
            raise ConfigurationError(
                f"{what} takes signatures (task.s(...)), chains, groups and chords, not {step!r}"
            )
    return tuple(steps)


def chain(*steps: Node) -> Chain:
    return Chain(_nodes(steps, "chain"))


def group(*members: Node) -> Group:
    return Group(_nodes(members, "group"))


def chord(header: Group | Sequence[Node], body: Node, *, on_error: OnError = "stop") -> Chord:
    if on_error not in ("stop", "pass"):
        raise ConfigurationError(f"chord on_error must be 'stop' or 'pass', not {on_error!r}")
    members = header if isinstance(header, Group) else group(*header)
    return Chord(members, _nodes((body,), "chord body")[0], on_error)


def child(path: str, index: int | str) -> str:
    return f"{path}.{index}" if path else str(index)


def to_json(node: Node) -> dict[str, Any]:
    """The node as JSON data. A signature's arguments must be JSON unless the step is one the
    client submits itself (it receives no input), whose arguments go typed in its event."""
    if isinstance(node, Signature):
        return {"task": node.task, "args": list(node.args), "kwargs": dict(node.kwargs)}
    if isinstance(node, Chain):
        return {"chain": [to_json(s) for s in node.steps]}
    if isinstance(node, Group):
        return {"group": [to_json(m) for m in node.members]}
    return {"chord": to_json(node.header), "body": to_json(node.body), "on_error": node.on_error}


def dumps(node: Node, heads: set[int]) -> str:
    """The canvas as JSON text; the arguments of the signatures in ``heads`` (ids of nodes the
    client submits with typed arguments) are left out, so they need not be JSON."""

    def data(n: Node) -> dict[str, Any]:
        if isinstance(n, Signature):
            if id(n) in heads:
                return {"task": n.task}
            return to_json(n)
        if isinstance(n, Chain):
            return {"chain": [data(s) for s in n.steps]}
        if isinstance(n, Group):
            return {"group": [data(m) for m in n.members]}
        return {"chord": data(n.header), "body": data(n.body), "on_error": n.on_error}

    try:
        return json.dumps(data(node), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            "the arguments of a workflow step that receives the result of another step must "
            f"be JSON (they travel in the workflow's canvas): {exc}"
        ) from exc


def parse(text: str) -> Node:
    """The canvas from its JSON text.

    Raises:
        ConfigurationError: the text is no canvas.
    """
    try:
        return _parse(json.loads(text))
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigurationError(f"not a workflow canvas: {exc}") from exc


def _parse(data: Any) -> Node:
    if not isinstance(data, dict):
        raise ValueError(f"a node is an object, not {data!r}")
    if "task" in data:
        return Signature(
            str(data["task"]), tuple(data.get("args", ())), dict(data.get("kwargs", {}))
        )
    if "chain" in data:
        return Chain(tuple(_parse(s) for s in data["chain"]))
    if "group" in data:
        return Group(tuple(_parse(m) for m in data["group"]))
    header = _parse(data["chord"])
    if not isinstance(header, Group):
        raise ValueError("a chord's header is a group")
    on_error = data.get("on_error", "stop")
    if on_error not in ("stop", "pass"):
        raise ValueError(f"on_error {on_error!r}")
    return Chord(header, _parse(data["body"]), on_error)
