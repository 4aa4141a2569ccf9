"""The dead-letter stage: turns dead letters about tasks into ``DeadLettered`` events.

Stages put records they cannot decode or process into the dead-letter topic with their
original key, bytes and headers plus ``qtasks.dlq.*`` headers. This stage reads that topic
and, where the key is a task id, records the fact in the task's history, once per source
record (several stages may give up on the same record). Records of the schedules topic
(keyed by schedule name) and of a topic that is not the app's (a trigger's foreign topic,
keyed by its writer) are not keyed by a task: they stay dead letters only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from qtasks_stream.events import TRACEPARENT_HEADER, DeadLettered, TaskEvent
from qtasks_stream.stages.base import Checkpoint, Incoming, Stage
from qtasks_stream.stages.runner import DLQ_REASON, DLQ_SOURCE, DLQ_STAGE
from qtasks_stream.topology import Topology

__all__ = ["DeadLetterStage"]

_SEEN_MEMORY = 100_000


class DeadLetterStage(Stage):
    name = "deadletter"
    decode = False

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.count = 0

    @property
    def topics(self) -> Sequence[str]:
        return [self._topology.deadletter]

    async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
        for item in batch:
            rec = item.record
            self.count += 1
            headers = {k: v.decode(errors="replace") for k, v in rec.headers}
            source = headers.get(DLQ_SOURCE, "")
            if rec.key is None or not source or source in self._seen:
                continue
            try:
                task_id = rec.key.decode()
            except UnicodeDecodeError:
                continue
            self._seen[source] = None
            if len(self._seen) > _SEEN_MEMORY:
                self._seen.popitem(last=False)
            parts = source.rsplit("/", 2)
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                continue
            if (
                parts[0] == self._topology.schedules
                or parts[0] not in self._topology.topic_schemas()
            ):
                continue  # not keyed by a task id: the dead letter is all there is
            event = TaskEvent.new(
                task_id,
                "",
                0,
                "deadletter",
                DeadLettered(
                    reason=headers.get(DLQ_REASON, ""),
                    stage=headers.get(DLQ_STAGE, ""),
                    source_topic=parts[0],
                    source_partition=int(parts[1]),
                    source_offset=int(parts[2]),
                ),
                # The dead letter keeps the original headers: the task's trace goes on.
                traceparent=headers.get(TRACEPARENT_HEADER) or None,
            )
            checkpoint.emit(self._topology.events, task_id, event, rec)
