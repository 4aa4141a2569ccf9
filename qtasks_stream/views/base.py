"""The view-store contract: the task log folded into something queryable.

The base class owns the invariants (fold, idempotence by offset, query validation, paging);
implementations supply three primitives: load states, save states with positions, search.

Several projectors may share one store (each owns some partitions of the events topic).
While a partition moves between them, its old and new owner can both be applying it for a
moment: ``_save`` therefore only commits if the stored positions are still those the fold
started from (a compare-and-set in the store's transaction), and ``apply`` folds again from
what the winner stored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from qtasks_stream.errors import ConfigurationError, ViewStoreError
from qtasks_stream.events import DEFAULT_QUEUE, TaskEvent
from qtasks_stream.records import TopicPartition
from qtasks_stream.state import PayloadDecoder, Task, TaskState, fold

__all__ = [
    "Applied",
    "LogReset",
    "PositionsMoved",
    "TaskPage",
    "TaskQuery",
    "ViewStore",
    "cursor_of",
    "queue_of",
]

#: What a projector does with a view whose positions lie past the end of the log it
#: follows (the log was reset, or its topic deleted and recreated): ``"refuse"`` to start,
#: naming the view, the topic and the offsets, or ``"rebuild"``: empty the view and fold
#: the new log from its start.
LogReset = Literal["refuse", "rebuild"]

# A save that lost the compare-and-set is folded again; more races than this in a row
# mean something else writes the positions.
_MAX_RACES = 16


@dataclass(frozen=True, slots=True)
class Applied:
    """An event with the log position it was read at."""

    tp: TopicPartition
    offset: int
    event: TaskEvent


class PositionsMoved(ViewStoreError):
    """``_save`` found stored positions other than those the fold started from."""


def queue_of(state: TaskState) -> str:
    """The queue a store files ``state`` under (its queue column)."""
    return state.queue or DEFAULT_QUEUE


def cursor_of(state: TaskState) -> str:
    """The paging cursor just past ``state`` in the stable order (created time, then id)."""
    return f"{state.created_us}:{state.task_id}"


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """Filters of :meth:`ViewStore.query`; every one given must match.

    Results come in a stable order, oldest first: by creation time, then by task id. Page
    with ``offset`` or, stable under concurrent inserts, with ``after`` = the ``next_cursor``
    of the previous :class:`TaskPage` (both may be combined: the offset counts past the cursor).
    """

    status: str | None = None
    task_name: str | None = None
    tag: str | None = None
    #: The named queue (``"default"`` matches the tasks submitted before queues existed).
    queue: str | None = None
    #: Created at or after, microseconds since the epoch.
    since_us: int | None = None
    #: Created before, microseconds since the epoch.
    until_us: int | None = None
    limit: int = 100
    offset: int = 0
    #: Only tasks after this cursor (see :func:`cursor_of`) in the stable order.
    after: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.limit <= 10_000:
            raise ConfigurationError(f"limit must be 1..10000, not {self.limit}")
        if self.offset < 0:
            raise ConfigurationError(f"offset must be >= 0, not {self.offset}")
        if self.after is not None:
            self.after_key  # noqa: B018 - validates the cursor now, at the call site

    @property
    def after_key(self) -> tuple[int, str] | None:
        """``after`` as (created_us, task_id), the sort key the stores compare with."""
        if self.after is None:
            return None
        created, sep, task_id = self.after.partition(":")
        try:
            if not sep or not task_id:
                raise ValueError(self.after)
            return int(created), task_id
        except ValueError:
            raise ConfigurationError(f"not a task cursor: {self.after!r}") from None

    def matches(self, state: TaskState) -> bool:
        after = self.after_key
        return (
            (after is None or (state.created_us, state.task_id) > after)
            and (self.status is None or state.status == self.status)
            and (self.task_name is None or state.task_name == self.task_name)
            and (self.tag is None or self.tag in state.tags)
            and (self.queue is None or queue_of(state) == self.queue)
            and (self.since_us is None or state.created_us >= self.since_us)
            and (self.until_us is None or state.created_us < self.until_us)
        )


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of a query; ``next_cursor`` is None once a page came back short."""

    tasks: list[Task]
    next_cursor: str | None


def _unapplied(
    batch: Sequence[Applied], positions: Mapping[TopicPartition, int]
) -> tuple[list[Applied], dict[TopicPartition, int]]:
    """The items of ``batch`` at or past their partition's position, and the positions after
    them. A batch comes in runs of one partition, so each run looks its partition up once:
    TopicPartition hashes in Python, which per event costs as much as the fold."""
    fresh: list[Applied] = []
    after: dict[TopicPartition, int] = {}
    run: TopicPartition | None = None
    floor = 0
    moved = False
    for item in batch:
        tp = item.tp
        if run is None or tp.partition != run.partition or tp.topic != run.topic:
            if run is not None and moved:
                after[run] = floor
            run, floor, moved = tp, max(positions.get(tp, 0), after.get(tp, 0)), False
        if item.offset >= floor:
            fresh.append(item)
            floor, moved = item.offset + 1, True
    if run is not None and moved:
        after[run] = floor
    return fresh, after


class ViewStore(ABC):
    """Applies events idempotently and answers queries about tasks."""

    #: See :data:`LogReset`; ``open_view(url, on_log_reset=...)`` sets it.
    on_log_reset: LogReset = "refuse"

    def describe(self) -> str:
        """The store as an error message names it (never with credentials)."""
        return type(self).__name__

    async def clear(self) -> None:
        """Delete every state and position at once (a rebuild starts from here)."""
        raise ViewStoreError(f"{self.describe()} cannot be cleared")

    async def start(self) -> None:
        """Open the store; a no-op by default."""

    async def close(self) -> None:
        """Close the store; a no-op by default."""

    async def apply(self, batch: Sequence[Applied]) -> int:
        """Fold ``batch`` in, skipping positions already applied; returns events applied.

        States and the new positions are saved together, so a crash between batches never
        applies an event twice nor skips one.
        """
        for _ in range(_MAX_RACES):
            positions = await self.positions()
            fresh, new_positions = _unapplied(batch, positions)
            if not fresh:
                return 0
            task_ids = {a.event.task_id for a in fresh}
            states = await self._load(task_ids)
            state_of = states.get
            for item in fresh:
                event = item.event
                states[event.task_id] = fold(state_of(event.task_id), event)
            # In key order: a store's B-tree takes sorted inserts far faster than random ones.
            changed = sorted(task_ids)
            expected = {tp: positions.get(tp, 0) for tp in new_positions}
            try:
                await self._save([states[t] for t in changed], new_positions, expected)
            except PositionsMoved:
                continue  # another projector applied part of this batch: fold what is left
            return len(fresh)
        raise ViewStoreError(f"positions kept moving under {_MAX_RACES} attempts to apply")

    async def advance(self, positions: Mapping[TopicPartition, int]) -> None:
        """Move positions past records with nothing to apply (dead-lettered ones)."""
        for _ in range(_MAX_RACES):
            current = await self.positions()
            newer = {tp: o for tp, o in positions.items() if o > current.get(tp, 0)}
            if not newer:
                return
            try:
                await self._save([], newer, {tp: current.get(tp, 0) for tp in newer})
            except PositionsMoved:
                continue
            return
        raise ViewStoreError(f"positions kept moving under {_MAX_RACES} attempts to advance")

    async def seed(
        self, states: Sequence[TaskState], positions: Mapping[TopicPartition, int]
    ) -> None:
        """Put ``states`` folded up to ``positions`` into a store that has applied nothing of
        those partitions, atomically (a snapshot's start); applying goes on from there.

        Raises:
            PositionsMoved: the store has positions of its own for those partitions.
        """
        await self._save(states, positions, dict.fromkeys(positions, 0))

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

    async def page(self, query: TaskQuery, *, payloads: PayloadDecoder | None = None) -> TaskPage:
        """Like :meth:`query`, with the cursor of the next page."""
        states = await self._search(query)
        full = len(states) == query.limit
        tasks = [s.to_task(payloads) for s in states]
        return TaskPage(tasks, cursor_of(states[-1]) if full else None)

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
        self,
        states: Sequence[TaskState],
        positions: Mapping[TopicPartition, int],
        expected: Mapping[TopicPartition, int],
    ) -> None:
        """Store ``states`` and ``positions`` atomically, if the stored positions of the
        partitions in ``expected`` are still those (0 = none stored); else store nothing and
        raise :class:`PositionsMoved`."""

    @abstractmethod
    async def _search(self, query: TaskQuery) -> list[TaskState]:
        """States matching ``query`` (``matches``), in the stable order, paged."""
