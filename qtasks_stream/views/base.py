"""The view-store contract: the task log folded into something queryable.

The base class owns the invariants (fold, idempotence by offset, query validation);
implementations supply three primitives: load states, save states with positions, search.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.events import TaskEvent
from qtasks_stream.records import TopicPartition
from qtasks_stream.state import PayloadDecoder, Task, TaskState, fold

__all__ = ["Applied", "TaskQuery", "ViewStore"]


@dataclass(frozen=True, slots=True)
class Applied:
    """An event with the log position it was read at."""

    tp: TopicPartition
    offset: int
    event: TaskEvent


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """Filters of :meth:`ViewStore.query`; every one given must match."""

    status: str | None = None
    task_name: str | None = None
    tag: str | None = None
    #: Created at or after, microseconds since the epoch.
    since_us: int | None = None
    #: Created before, microseconds since the epoch.
    until_us: int | None = None
    limit: int = 100
    offset: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.limit <= 10_000:
            raise ConfigurationError(f"limit must be 1..10000, not {self.limit}")
        if self.offset < 0:
            raise ConfigurationError(f"offset must be >= 0, not {self.offset}")

    def matches(self, state: TaskState) -> bool:
        return (
            (self.status is None or state.status == self.status)
            and (self.task_name is None or state.task_name == self.task_name)
            and (self.tag is None or self.tag in state.tags)
            and (self.since_us is None or state.created_us >= self.since_us)
            and (self.until_us is None or state.created_us < self.until_us)
        )


class ViewStore(ABC):
    """Applies events idempotently and answers queries about tasks."""

    async def start(self) -> None:
        """Open the store; a no-op by default."""

    async def close(self) -> None:
        """Close the store; a no-op by default."""

    async def apply(self, batch: Sequence[Applied]) -> int:
        """Fold ``batch`` in, skipping positions already applied; returns events applied.

        States and the new positions are saved together, so a crash between batches never
        applies an event twice nor skips one.
        """
        positions = await self.positions()
        fresh = [a for a in batch if a.offset >= positions.get(a.tp, 0)]
        if not fresh:
            return 0
        states = await self._load({a.event.task_id for a in fresh})
        new_positions: dict[TopicPartition, int] = {}
        for item in fresh:
            task_id = item.event.task_id
            states[task_id] = fold(states.get(task_id), item.event)
            new_positions[item.tp] = item.offset + 1
        changed = {a.event.task_id for a in fresh}
        await self._save([states[t] for t in changed], new_positions)
        return len(fresh)

    async def advance(self, positions: Mapping[TopicPartition, int]) -> None:
        """Move positions past records with nothing to apply (dead-lettered ones)."""
        current = await self.positions()
        newer = {tp: o for tp, o in positions.items() if o > current.get(tp, 0)}
        if newer:
            await self._save([], newer)

    async def get(self, task_id: str, *, payloads: PayloadDecoder | None = None) -> Task | None:
        state = (await self._load({task_id})).get(task_id)
        return state.to_task(payloads) if state is not None else None

    async def state(self, task_id: str) -> TaskState | None:
        return (await self._load({task_id})).get(task_id)

    async def query(
        self, query: TaskQuery, *, payloads: PayloadDecoder | None = None
    ) -> list[Task]:
        """Tasks matching ``query``; ``payloads`` decodes typed Avro arguments and results."""
        return [s.to_task(payloads) for s in await self._search(query)]

    @abstractmethod
    async def positions(self) -> dict[TopicPartition, int]:
        """The next offset to apply, per partition."""

    @abstractmethod
    async def counts(self) -> dict[str, int]:
        """Number of tasks per status."""

    @abstractmethod
    async def _load(self, task_ids: set[str]) -> dict[str, TaskState]:
        """The stored states of those of ``task_ids`` that exist."""

    @abstractmethod
    async def _save(
        self, states: Sequence[TaskState], positions: Mapping[TopicPartition, int]
    ) -> None:
        """Store ``states`` and ``positions`` atomically."""

    @abstractmethod
    async def _search(self, query: TaskQuery) -> list[TaskState]:
        """States matching ``query``, oldest first, paged."""
