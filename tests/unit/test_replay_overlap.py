"""A replay keeps one apply in flight while it reads and decodes the next batch: the apply
must move on meanwhile, even with a log whose polls return without yielding (the embedded
one, and confluent-kafka's while records are buffered)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

import qtasks_stream.ops.replay as replay_module
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import Submitted, TaskEvent
from qtasks_stream.records import OutRecord, Record
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.serde.base import Serde
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import Applied
from qtasks_stream.views.memory import MemoryViewStore

BATCH = 500


class RoundTripStore(MemoryViewStore):
    """A memory store whose apply waits on the event loop a few times, as a store's round
    trips to a server do, and notes how many records were decoded when it ended."""

    def __init__(self, decoded: list[int]) -> None:
        super().__init__()
        self._decoded = decoded
        self.ended_at: list[int] = []

    async def apply(self, batch: Sequence[Applied]) -> int:
        for _ in range(4):
            await asyncio.sleep(0)
        applied = await super().apply(batch)
        self.ended_at.append(self._decoded[0])
        return applied


async def test_an_apply_in_flight_ends_while_the_next_batch_decodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topology = Topology(f"t{uuid.uuid4().hex[:8]}", "qtasks.", 1, 1)
    registry = SchemaRegistryClient.new_client({"url": f"mock://{topology.app}"})
    serde = AvroSerde(registry, topology.topic_schemas())
    event_log = InMemoryEventLog()
    await event_log.create_topics([s for s in topology.specs() if s.name == topology.events])
    await serde.start()
    producer = event_log.producer()
    await producer.start()
    events = [
        TaskEvent.new(str(uuid.uuid4()), "job", 0, "t", Submitted("[]", "{}", 0))
        for _ in range(3 * BATCH)
    ]
    await producer.send(
        [
            OutRecord(
                topology.events, e.task_id.encode(), serde.encode(topology.events, e.to_avro())
            )
            for e in events
        ]
    )
    await producer.close()

    decoded = [0]
    decode = replay_module.decode_events

    def counting(serde: Serde, records: Sequence[Record]) -> list[Applied]:
        out = decode(serde, records)
        decoded[0] += len(out)
        return out

    monkeypatch.setattr(replay_module, "decode_events", counting)
    store = RoundTripStore(decoded)
    result = await replay_module.replay_into(
        store, event_log, serde, topology.events, 1, batch_size=BATCH
    )
    await serde.close()
    await event_log.close()

    assert result.applied == 3 * BATCH
    assert await store.counts() == {"new": 3 * BATCH}
    # The first two applies end before the batch after theirs is fully decoded (without
    # yields they ended only once it was: at 2 * BATCH and 3 * BATCH records).
    assert store.ended_at[0] < 2 * BATCH, store.ended_at
    assert store.ended_at[1] < 3 * BATCH, store.ended_at
