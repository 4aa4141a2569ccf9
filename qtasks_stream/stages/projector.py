"""The projector: folds the events topic into a view store.

The store keeps the positions it has applied beside the rows, in the same store
transaction, and the projector starts each partition from there: the store, not the
consumer group, is the authority on what was applied. Offsets are still committed to the
group so that lag can be watched with ordinary Kafka tools.

A store whose positions lie past the end of the topic describes another log (this one was
reset, or deleted and recreated): started from there, the projector would skip every new
event. :func:`check_view_positions` finds that before the projector starts, and the
projector refuses such a partition when it is assigned one later.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from qtasks_stream.errors import StaleViewError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.records import TopicPartition
from qtasks_stream.stages.base import Checkpoint, Incoming, Stage
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import Applied, ViewStore

__all__ = ["ProjectorStage", "check_view_positions"]

log = logging.getLogger("qtasks_stream.projector")


def _past_end(
    view: ViewStore,
    stored: Mapping[TopicPartition, int],
    ends: Mapping[TopicPartition, int],
) -> StaleViewError | None:
    """The error naming the partitions whose stored position lies past the end, if any."""
    stale = {tp: o for tp, o in stored.items() if tp in ends and o > ends[tp]}
    if not stale:
        return None
    tps = sorted(stale)
    topics = ", ".join(sorted({tp.topic for tp in tps}))
    detail = ", ".join(f"{tp.partition}: {stale[tp]} > {ends[tp]}" for tp in tps)
    return StaleViewError(
        f"view {view.describe()} has applied topic {topics} past its end (partition: "
        f"stored position > end offset: {detail}): the log was reset, or the topic deleted "
        "and recreated, and the view describes the old one. Open the view with "
        "open_view(url, on_log_reset='rebuild') to empty it and fold the new log, or give "
        "the app a new view"
    )


async def check_view_positions(view: ViewStore, event_log: EventLog, topology: Topology) -> None:
    """Before a projector starts: refuse (or, as ``view.on_log_reset`` says, empty) a view
    whose stored positions lie past the end of the events topic.

    Raises:
        StaleViewError: the view is stale and ``on_log_reset`` is ``"refuse"``.
    """
    topic = topology.events
    stored = {tp: o for tp, o in (await view.positions()).items() if tp.topic == topic}
    if not stored:
        return
    consumer = event_log.consumer([topic], group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(
            [TopicPartition(topic, p) for p in range(topology.partitions)]
        )
    finally:
        await consumer.close()
    error = _past_end(view, stored, ends)
    if error is None:
        return
    if view.on_log_reset != "rebuild":
        raise error
    log.warning("%s; rebuilding it (on_log_reset='rebuild')", error)
    await view.clear()


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
        # Checked before the start too; here for a topic recreated while the app runs.
        error = _past_end(self.view, {tp: stored.get(tp, 0) for tp in partitions}, ends)
        if error is not None:
            raise error
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
