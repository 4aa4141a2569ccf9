"""The stage contract and the checkpoint a stage hands its outputs to.

A stage decides; it never talks to the event log. Its runner polls, decodes, calls the
stage, and commits what the stage put into the :class:`Checkpoint`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qtasks_stream.records import OutRecord, Record, TopicPartition

__all__ = ["Checkpoint", "Incoming", "Restore", "Stage"]


@dataclass(frozen=True, slots=True)
class Incoming:
    """A polled record and its decoded value (``None`` for stages that take raw bytes)."""

    record: Record
    value: Any


class Checkpoint(ABC):
    """Collects outputs and finished inputs until the runner commits them together."""

    @abstractmethod
    def emit(self, topic: str, key: str, value: Any, origin: Record | None = None) -> None:
        """Queue ``value`` (encoded with ``topic``'s schema) for the next commit.

        With ``origin``, the output is dropped if ``origin``'s partition is revoked before
        the commit: the new owner of the partition redoes the work.
        """

    @abstractmethod
    def emit_raw(self, record: OutRecord, origin: Record | None = None) -> None:
        """Queue an already-encoded record."""

    @abstractmethod
    def done(self, record: Record) -> None:
        """``record`` is fully handled: its offset may be committed."""

    @abstractmethod
    def dead_letter(self, record: Record, reason: str, error: BaseException | None) -> None:
        """Keep ``record``'s bytes and headers in the dead-letter topic, with the reason."""


class Stage(ABC):
    """One lifecycle step. Lifecycles and rebalance hooks are no-ops by default."""

    #: The consumer-group suffix, and the stage's name in logs and dead letters.
    name: str = ""
    #: Whether values are decoded before :meth:`handle` (False: raw records).
    decode: bool = True
    #: False when records finish later than :meth:`handle` returns (the worker).
    done_on_return: bool = True
    #: False: a record the stage cannot decode is skipped, not dead-lettered (a stage that
    #: reads a topic another stage of the app dead-letters already, once is enough).
    dead_letters: bool = True
    #: True for a stage whose :meth:`paused_topics` ever names a topic: its consumer keeps
    #: a short fetch wait, so a resumed partition is fetched soon (see
    #: :meth:`EventLog.consumer <qtasks_stream.eventlog.base.EventLog.consumer>`).
    pauses: bool = False

    @property
    @abstractmethod
    def topics(self) -> Sequence[str]:
        """The topics the stage consumes."""

    async def start(self, checkpoint: Checkpoint) -> None:
        """Called once before the first poll."""

    async def stop(self) -> None:
        """Called once after the last commit."""

    async def on_assigned(
        self, partitions: Sequence[TopicPartition], ends: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Partitions arrived (``ends``: their end offsets); returns positions to seek to."""
        return {}

    async def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions go after this returns; drop their state."""

    def positions_wanted(self) -> Collection[TopicPartition]:
        """Partitions whose read position :meth:`advanced` should report after every poll,
        even an empty one (besides those the poll returned records of)."""
        return ()

    async def advanced(
        self, positions: Mapping[TopicPartition, int], checkpoint: Checkpoint
    ) -> None:
        """After each poll: the consumer's next offset per partition, past records the stage
        never saw (dead-lettered before decoding) and past transaction markers."""

    def wants_value(self, record: Record) -> bool:
        """False lets the runner skip decoding ``record`` (handed over with value None)."""
        return True

    def capacity(self) -> int:
        """How many more records the stage accepts now: backpressure."""
        return 1 << 30

    def paused_topics(self) -> Collection[str]:
        """Topics not to fetch from now (their buffer is full), while others still flow;
        only for a stage that sets :attr:`pauses`."""
        return ()

    async def tick(self, checkpoint: Checkpoint) -> float | None:
        """Timers: emit what is due; return seconds until the next, or None."""
        return None

    @abstractmethod
    async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
        """Decide on a batch; outputs and dead letters go to ``checkpoint``."""


class Restore:
    """Partitions a stage re-reads from offset 0 up to their end offset at assignment, to
    rebuild its state before acting on them: its :meth:`Stage.positions_wanted` and the
    bookkeeping of :meth:`Stage.advanced`, written once for the stages that restore."""

    def __init__(self) -> None:
        self._ends: dict[TopicPartition, int] = {}

    def begin(
        self, partitions: Sequence[TopicPartition], ends: Mapping[TopicPartition, int]
    ) -> list[TopicPartition]:
        """Restore those of ``partitions`` that hold records; returns them (to read from 0)."""
        started = [tp for tp in partitions if ends.get(tp, 0) > 0]
        for tp in started:
            self._ends[tp] = ends[tp]
        return started

    def drop(self, partitions: Collection[TopicPartition]) -> None:
        for tp in partitions:
            self._ends.pop(tp, None)

    def wanted(self) -> list[TopicPartition]:
        """The partitions still restoring (for :meth:`Stage.positions_wanted`)."""
        return list(self._ends)

    def reached(self, positions: Mapping[TopicPartition, int]) -> list[tuple[TopicPartition, int]]:
        """Those restoring partitions ``positions`` has brought to their end, with their end;
        they are restored from now on."""
        done = [(tp, end) for tp, end in self._ends.items() if positions.get(tp, -1) >= end]
        for tp, _ in done:
            del self._ends[tp]
        return done

    def __contains__(self, tp: object) -> bool:
        return tp in self._ends

    def __bool__(self) -> bool:
        return bool(self._ends)
