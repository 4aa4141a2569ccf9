"""RecordCodec: records read from the log into typed values, one error for every failure."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.errors import RecordDecodeError, RegistryUnavailableError, SerdeError
from qtasks_stream.events import ControlCommand, Started, TaskEvent, as_record
from qtasks_stream.records import Record
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.codec import RecordCodec
from qtasks_stream.topology import Topology

TOPOLOGY = Topology("codec", partitions=4, lanes=1)


@pytest.fixture
async def serde() -> AvroSerde:
    registry = SchemaRegistryClient.new_client({"url": f"mock://codec-{uuid.uuid4().hex}"})
    avro = AvroSerde(registry, TOPOLOGY.topic_schemas())
    await avro.start()
    return avro


def _read(topic: str, value: bytes | None, headers: Any = (), partition: int = 2) -> Record:
    return Record(topic, partition, 41, b"key", value, headers)


async def test_a_record_decodes_into_the_type_asked(serde: AvroSerde) -> None:
    codec = RecordCodec(serde)
    event = TaskEvent.new("t1", "job", 1, "test", Started("w1"))
    out = as_record(serde, TOPOLOGY.events, "t1", event)
    assert codec.event(_read(out.topic, out.value, out.headers)) == event
    command = ControlCommand("t1", "enough", 7)
    out = as_record(serde, TOPOLOGY.control, "t1", command)
    assert codec.decode(_read(out.topic, out.value), ControlCommand) == command


async def test_every_failure_is_one_error_naming_the_record_and_its_cause(
    serde: AvroSerde,
) -> None:
    codec = RecordCodec(serde)
    where = f"{TOPOLOGY.events}/2/41"

    # Bytes that are not a value of the topic: the serde's error is the cause.
    garbage = _read(TOPOLOGY.events, b"\x00\x00\x00\x00\x01\xff\xfe!")
    with pytest.raises(RecordDecodeError) as caught:
        codec.event(garbage)
    assert str(caught.value).startswith(f"cannot decode {where} as a TaskEvent: SerdeError: ")
    assert isinstance(caught.value.__cause__, SerdeError)
    assert (caught.value.topic, caught.value.partition, caught.value.offset) == (
        TOPOLOGY.events,
        2,
        41,
    )

    # A tombstone has no value to decode.
    with pytest.raises(RecordDecodeError, match=f"^cannot decode {where} as a TaskEvent: .*tomb"):
        codec.event(_read(TOPOLOGY.events, None))

    # A value of its topic that does not convert into the type asked (the converter's
    # KeyError, which alone would say only 'payload').
    command = as_record(serde, TOPOLOGY.control, "t1", ControlCommand("t1", "r", 1))
    with pytest.raises(RecordDecodeError) as caught:
        codec.event(_read(TOPOLOGY.control, command.value))
    assert str(caught.value) == (
        f"cannot decode {TOPOLOGY.control}/2/41 as a TaskEvent: KeyError: 'payload'"
    )
    assert isinstance(caught.value.__cause__, KeyError)

    # The snapshot topic's plain values fail the same way.
    with pytest.raises(RecordDecodeError, match=f"^cannot decode {TOPOLOGY.snapshots}/2/41 as"):
        codec.value(_read(TOPOLOGY.snapshots, b"\x00junk"))


class _Unavailable(Serde):
    def encode(self, topic: str, value: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def decode(self, topic: str, data: bytes, *, branch: str | None = None) -> dict[str, Any]:
        raise RegistryUnavailableError("registry down")


def test_an_unreachable_registry_is_not_a_bad_record() -> None:
    # Readers wait and try again on it (the record is fine): it must not become the error
    # that makes them skip or dead-letter the record.
    with pytest.raises(RegistryUnavailableError):
        RecordCodec(_Unavailable()).event(_read(TOPOLOGY.events, b"\x00\x00\x00\x00\x01"))
