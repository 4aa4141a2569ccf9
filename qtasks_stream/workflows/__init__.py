"""Workflows: tasks started by other tasks (``chain``, ``group``, ``chord``), as events.

``chain(a.s(1), b.s(), c.s())`` runs a, b, c in turn, each result the next one's first
argument; ``group(...)`` runs its members in parallel and collects their results in order;
``chord(group, callback)`` runs the callback on that list. ``await app.run_workflow(canvas)``
(or ``await canvas.apply(app)``) submits it and returns a :class:`WorkflowHandle`. The
workflow stage folds the steps' ends and submits what follows (see docs/workflows.md).
"""

from qtasks_stream.workflows.canvas import Chain, Chord, Group, Signature, chain, chord, group
from qtasks_stream.workflows.client import WorkflowHandle, WorkflowResult

__all__ = [
    "Chain",
    "Chord",
    "Group",
    "Signature",
    "WorkflowHandle",
    "WorkflowResult",
    "chain",
    "chord",
    "group",
]
