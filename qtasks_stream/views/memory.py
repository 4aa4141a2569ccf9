"""A view store in a dict: the default beside the in-memory event log."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from qtasks_stream.records import TopicPartition
from qtasks_stream.state import TaskState
from qtasks_stream.views.base import PositionsMoved, TaskQuery, ViewStore

__all__ = ["MemoryViewStore"]


class MemoryViewStore(ViewStore):
    def __init__(self) -> None:
        self._states: dict[str, TaskState] = {}
        self._positions: dict[TopicPartition, int] = {}

    def describe(self) -> str:
        return "memory://"

    async def clear(self) -> None:
        self._states.clear()
        self._positions.clear()

    async def positions(self) -> dict[TopicPartition, int]:
        return dict(self._positions)

    async def counts(self) -> dict[str, int]:
        return dict(Counter(s.status for s in self._states.values()))

    async def _load(self, task_ids: set[str]) -> dict[str, TaskState]:
        # Copies, so a fold in progress never shows through before _save.
        return {t: self._states[t].copy() for t in task_ids if t in self._states}

    async def _save(
        self,
        states: Sequence[TaskState],
        positions: Mapping[TopicPartition, int],
        expected: Mapping[TopicPartition, int],
    ) -> None:
        # No await from the check to the last write: atomic within the event loop.
        if any(self._positions.get(tp, 0) != offset for tp, offset in expected.items()):
            raise PositionsMoved("positions moved since the fold began")
        for state in states:
            self._states[state.task_id] = state
        self._positions.update(positions)

    async def _search(self, query: TaskQuery) -> list[TaskState]:
        found = sorted(
            (s for s in self._states.values() if query.matches(s)),
            key=lambda s: (s.created_us, s.task_id),
        )
        return found[query.offset : query.offset + query.limit]
