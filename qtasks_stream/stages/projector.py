"""The projector: folds the events topic into a view store.

The store keeps the positions it has applied beside the rows, in the same store
transaction, and the projector starts each partition from there: the store, not the
consumer group, is the authority on what was applied. Offsets are still committed to the
group so that lag can be watched with ordinary Kafka tools.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from qtasks_stream.records import TopicPartition
from qtasks_stream.stages.base import Checkpoint, Incoming, Stage
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import Applied, ViewStore

__all__ = ["ProjectorStage"]


class ProjectorStage(Stage):
    name = "projector"

    def __init__(self, topology: Topology, view: ViewStore) -> None:
        self._topology = topology
        self.view = view
        self.applied = 0
        self._applied_to: dict[TopicPartition, int] = {}

    @property
    def topics(self) -> Sequence[str]:
        return [self._topology.events]

    async def on_assigned(
        self, partitions: Sequence[TopicPartition], ends: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        stored = await self.view.positions()
        return {tp: stored.get(tp, 0) for tp in partitions}

    async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
        self.applied += await self.view.apply(
            [Applied(i.record.tp, i.record.offset, i.value) for i in batch]
        )
        for item in batch:
            self._applied_to[item.record.tp] = item.record.offset + 1

    async def advanced(
        self, positions: Mapping[TopicPartition, int], checkpoint: Checkpoint
    ) -> None:
        # Records dead-lettered before decoding never reach handle(); without this the view
        # would re-read (and the runner re-judge) them after every restart.
        skipped = {tp: o for tp, o in positions.items() if o > self._applied_to.get(tp, 0)}
        if skipped:
            await self.view.advance(skipped)
            self._applied_to.update(skipped)
