"""AvroSerde: the Confluent wire format over the schemas in schemas/avro."""

from __future__ import annotations

import dataclasses
import struct
import typing
import uuid

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.errors import RegistryUnavailableError, SchemaError, SerdeError
from qtasks_stream.events import (
    Cancelled,
    CancelRequested,
    ControlCommand,
    DeadLettered,
    Failed,
    Payload,
    Progress,
    Released,
    Resubmitted,
    RetryScheduled,
    Scheduled,
    Started,
    Submitted,
    Succeeded,
    TaskEvent,
    TimedOut,
    WorkItem,
    event_kind,
)
from qtasks_stream.serde import wire
from qtasks_stream.serde.avro import AvroSerde, subject_for
from qtasks_stream.topology import Topology

TOPOLOGY = Topology("serde", partitions=1, lanes=2)

#: One payload of every kind, with optional fields set away from their defaults.
PAYLOADS: list[Payload] = [
    Submitted('[1, "a"]', '{"k": [1, 2]}', 3),
    Submitted(
        "[]",
        "{}",
        -2,
        content_type="application/x-custom",
        eta_us=1_700_000_000_123_456,
        idempotency_key="order-17",
        max_time=2.5,
        tags=("a", "b"),
    ),
    Scheduled(lane=1, priority=1),
    Scheduled(lane=2, priority=9, due_us=1_700_000_000_000_001),
    Released(lane=0),
    Started(worker_id="worker:host-1-2"),
    Progress(seq=4, value='{"done": 0.5}'),
    Succeeded(result="[1, 2, 3]", duration_ms=12.25),
    Succeeded(result="x", duration_ms=0.0, content_type="text/plain"),
    Failed(
        error_type="builtins.ValueError", message="bad", traceback="Traceback...", duration_ms=3.5
    ),
    RetryScheduled(
        next_attempt=3,
        due_us=123,
        error_type="OSError",
        message="m",
        traceback="t",
        duration_ms=1.0,
    ),
    CancelRequested(reason="user asked"),
    Cancelled(reason=""),
    TimedOut(max_time=0.25),
    DeadLettered(
        reason="cannot decode",
        stage="scheduler",
        source_topic="qtasks.serde.events",
        source_partition=0,
        source_offset=2**40,
    ),
    Resubmitted("fixed", "error", "resubmit", "[1]", '{"a": 2}', "application/json", 2, 1.5),
    Resubmitted("fixed", "dead_letter", "dlq_replay", dlq_source="qtasks.serde.lane.0/1/7"),
]


@pytest.fixture
async def serde() -> AvroSerde:
    registry = SchemaRegistryClient.new_client({"url": f"mock://serde-{uuid.uuid4().hex}"})
    avro = AvroSerde(registry, TOPOLOGY.topic_schemas())
    await avro.start()
    return avro


def test_every_payload_kind_is_covered() -> None:
    assert {type(p) for p in PAYLOADS} == set(typing.get_args(Payload))


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize(
    "traceparent", [None, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
)
async def test_task_event_round_trip(
    serde: AvroSerde, payload: Payload, traceparent: str | None
) -> None:
    event = TaskEvent.new("3f0c-task", "send_mail", 2, "client", payload, traceparent=traceparent)
    data = serde.encode(TOPOLOGY.events, event.to_avro())
    back = TaskEvent.from_avro(serde.decode(TOPOLOGY.events, data))
    assert back == event
    assert back.kind == type(payload).__name__
    # With the kind header our producers write, the same event.
    kind = event_kind(event.record_headers())
    assert kind == type(payload).__name__
    hinted = serde.decode(TOPOLOGY.events, data, branch=kind)
    assert hinted == serde.decode(TOPOLOGY.events, data)
    assert TaskEvent.from_avro(hinted) == event


def _fastavro_reads(serde: AvroSerde, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values of the events topic read by fastavro, as those another writer schema than
    ours wrote are (the compiled reader reads ours, and needs no hint)."""
    readers = serde._readers
    monkeypatch.setitem(
        readers, TOPOLOGY.events, dataclasses.replace(readers[TOPOLOGY.events], compiled=None)
    )


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for every Avro read from now on, whether it asked for record names."""
    reads: list[bool] = []
    real = wire.read

    def counting(*args: typing.Any, **options: typing.Any) -> typing.Any:
        reads.append(bool(options.get("return_record_name")))
        return real(*args, **options)

    monkeypatch.setattr(wire, "read", counting)
    return reads


async def test_a_kind_header_saves_reading_branch_names(
    serde: AvroSerde, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = TaskEvent.new("t", "n", 1, "scheduler", Scheduled(lane=1, priority=2))
    data = serde.encode(TOPOLOGY.events, event.to_avro())
    _fastavro_reads(serde, monkeypatch)
    reads = _count_reads(monkeypatch)
    # The full name of the branch works as well as the short one a header carries.
    for branch in ("Scheduled", "qtasks.stream.v1.Scheduled"):
        assert TaskEvent.from_avro(serde.decode(TOPOLOGY.events, data, branch=branch)) == event
    assert reads == [False, False]
    # Without a header (a foreign producer): one read, with names, as before.
    assert TaskEvent.from_avro(serde.decode(TOPOLOGY.events, data)) == event
    assert reads == [False, False, True]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
async def test_a_lying_kind_header_decodes_what_the_bytes_say(
    serde: AvroSerde, payload: Payload, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = TaskEvent.new("t", "n", 1, "client", payload)
    data = serde.encode(TOPOLOGY.events, event.to_avro())
    truth = serde.decode(TOPOLOGY.events, data)
    _fastavro_reads(serde, monkeypatch)
    reads = _count_reads(monkeypatch)
    others = [k.__name__ for k in typing.get_args(Payload) if k is not type(payload)]
    for branch in [*others, "NoSuchKind", ""]:
        decoded = serde.decode(TOPOLOGY.events, data, branch=branch)
        assert decoded == truth, branch
        assert TaskEvent.from_avro(decoded) == event
    # Every lie ends in a read with names: never a value named after the header.
    assert reads.count(True) == len(others) + 2


async def test_branches_with_the_same_fields_are_always_read_with_names(
    serde: AvroSerde, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancelled and CancelRequested both hold just a reason: the fields read cannot tell a
    # lying header, so their header is not trusted at all.
    _fastavro_reads(serde, monkeypatch)
    reads = _count_reads(monkeypatch)
    for payload, lie in ((Cancelled("r"), "CancelRequested"), (CancelRequested("r"), "Cancelled")):
        event = TaskEvent.new("t", "n", 1, "client", payload)
        data = serde.encode(TOPOLOGY.events, event.to_avro())
        for branch in (lie, type(payload).__name__):
            back = TaskEvent.from_avro(serde.decode(TOPOLOGY.events, data, branch=branch))
            assert back == event
            assert type(back.payload) is type(payload)
    assert reads == [True] * 4


async def test_schemas_without_a_union_of_records_ignore_the_hint(serde: AvroSerde) -> None:
    item = WorkItem("t", "n", 1, "[]", "{}", 0, 5)
    lane = TOPOLOGY.lane(0)
    data = serde.encode(lane, item.to_avro())
    assert WorkItem.from_avro(serde.decode(lane, data, branch="Scheduled")) == item


async def test_work_item_and_control_command_round_trip(serde: AvroSerde) -> None:
    items = [
        WorkItem("t", "n", 1, "[1]", "{}", 0, 1_700_000_000_000_000),
        WorkItem("t", "n", 7, "[]", '{"a": 1}', -1, 5, "text/plain", 0.5, "00-ab-cd-01"),
    ]
    for lane in TOPOLOGY.lane_topics:
        for item in items:
            assert (
                WorkItem.from_avro(serde.decode(lane, serde.encode(lane, item.to_avro()))) == item
            )
    command = ControlCommand("t", "stop it", 99)
    data = serde.encode(TOPOLOGY.control, command.to_avro())
    assert ControlCommand.from_avro(serde.decode(TOPOLOGY.control, data)) == command


async def test_wire_format_header_names_the_registered_schema(serde: AvroSerde) -> None:
    event = TaskEvent.new("t", "n", 0, "client", Released(0))
    data = serde.encode(TOPOLOGY.events, event.to_avro())
    magic, schema_id = struct.unpack(">bI", data[:5])
    assert magic == 0
    registered = serde._registry.get_latest_version(subject_for(TOPOLOGY.events))
    assert registered.schema_id == schema_id


# -- errors ------------------------------------------------------------------------------------


def _valid(serde: AvroSerde) -> bytes:
    event = TaskEvent.new("t", "n", 1, "client", Progress(0, '"x"'))
    return serde.encode(TOPOLOGY.events, event.to_avro())


async def test_wrong_magic_byte_raises(serde: AvroSerde) -> None:
    data = _valid(serde)
    with pytest.raises(SerdeError, match=r"magic byte 1, not 0: not Avro"):
        serde.decode(TOPOLOGY.events, b"\x01" + data[1:])
    with pytest.raises(SerdeError, match="magic byte"):
        serde.decode(TOPOLOGY.events, b'{"json": "is not avro"}')


@pytest.mark.parametrize("size", [0, 1, 4])
async def test_too_short_raises(serde: AvroSerde, size: int) -> None:
    data = _valid(serde)[:size]
    with pytest.raises(SerdeError, match=rf"is {size} bytes: too short for Avro"):
        serde.decode(TOPOLOGY.events, data)


async def test_truncated_body_raises(serde: AvroSerde) -> None:
    data = _valid(serde)
    for cut in (5, 8, len(data) // 2, len(data) - 1):
        with pytest.raises(SerdeError, match=r"cannot be decoded"):
            serde.decode(TOPOLOGY.events, data[:cut])


async def test_trailing_bytes_raise(serde: AvroSerde) -> None:
    with pytest.raises(SerdeError, match="2 trailing bytes"):
        serde.decode(TOPOLOGY.events, _valid(serde) + b"\x00\x00")


async def test_unknown_topic_raises(serde: AvroSerde) -> None:
    with pytest.raises(SerdeError, match="no schema registered for topic 'elsewhere'"):
        serde.encode("elsewhere", {})
    with pytest.raises(SerdeError, match="no schema registered for topic 'elsewhere'"):
        serde.decode("elsewhere", _valid(serde))


async def test_an_unknown_schema_id_is_a_bad_record_and_an_unreachable_registry_is_not(
    serde: AvroSerde,
) -> None:
    unknown = struct.pack(">bI", 0, 4242) + _valid(serde)[5:]
    with pytest.raises(SchemaError, match="unknown schema id 4242"):
        serde.decode(TOPOLOGY.events, unknown)  # the registry answered 404: dead-letter it

    def unreachable(schema_id: int, *args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    serde._registry.get_schema = unreachable  # type: ignore[method-assign]
    with pytest.raises(RegistryUnavailableError, match="4242 could not be fetched") as caught:
        serde.decode(TOPOLOGY.events, unknown)  # not a SerdeError: stages must not dead-letter
    assert not isinstance(caught.value, SerdeError)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def _submitted_avro(**changes: object) -> dict[str, object]:
    event = TaskEvent.new("t", "n", 0, "client", Submitted("[]", "{}", 0))
    value = event.to_avro()
    name, body = value["payload"]
    payload_changes = {k: v for k, v in changes.items() if k in body}
    top_changes = {k: v for k, v in changes.items() if k not in body}
    return {**value, **top_changes, "payload": (name, {**body, **payload_changes})}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"attempt": "one"}, "attempt"),
        ({"task_id": None}, "task_id"),
        ({"task_id": 17}, "task_id"),
        ({"priority": "high"}, "priority"),
        ({"tags": [1, 2]}, "tags"),
    ],
    ids=["str-for-int", "null-for-string", "int-for-string", "str-for-int-in-payload", "int-tags"],
)
async def test_value_not_fitting_the_schema_raises(
    serde: AvroSerde, changes: dict[str, object], field: str
) -> None:
    with pytest.raises(SerdeError, match=rf"does not fit the schema of topic .*{field}"):
        serde.encode(TOPOLOGY.events, _submitted_avro(**changes))


async def test_missing_field_and_unknown_payload_raise(serde: AvroSerde) -> None:
    value = _submitted_avro()
    del value["source"]
    with pytest.raises(SerdeError, match=r"does not fit the schema.*source"):
        serde.encode(TOPOLOGY.events, value)
    unknown = {**_submitted_avro(), "payload": ("qtasks.stream.v1.Exploded", {})}
    with pytest.raises(SerdeError, match="does not fit the schema"):
        serde.encode(TOPOLOGY.events, unknown)
    with pytest.raises(SerdeError, match="does not fit the schema"):
        serde.encode(TOPOLOGY.lane(0), {"task_id": "only this"})


async def test_int_outside_the_avro_int_range_raises(serde: AvroSerde) -> None:
    # Avro "int" is 32-bit signed. fastavro writes a bigger Python int anyway (and reads it
    # back), but Java and other Avro readers misread (2**31 wraps) or reject ("Invalid int
    # encoding") such a record, so it must not leave the process.
    for priority in (2**31, -(2**31) - 1, 2**40):
        with pytest.raises(SerdeError, match="does not fit the schema"):
            serde.encode(TOPOLOGY.events, _submitted_avro(priority=priority))


async def test_the_range_guard_checks_nested_ints_and_leaves_types_to_the_writer(
    serde: AvroSerde,
) -> None:
    # The encoder range-checks ints instead of running fastavro's full validate (which builds
    # an error per union branch it tries); it must still catch what validate caught.
    nested = {
        **_submitted_avro(),
        "payload": ("qtasks.stream.v1.Scheduled", {"lane": 2**33, "priority": 0, "due_us": None}),
    }
    with pytest.raises(SerdeError, match=r"payload\.Scheduled\.lane is 8589934592"):
        serde.encode(TOPOLOGY.events, nested)
    too_long = {
        **_submitted_avro(),
        "payload": ("qtasks.stream.v1.Scheduled", {"lane": 0, "priority": 0, "due_us": 2**64}),
    }
    with pytest.raises(SerdeError, match="due_us"):
        serde.encode(TOPOLOGY.events, too_long)
    # A wrong type is the writer's failure; the message still names the field.
    with pytest.raises(SerdeError, match="attempt"):
        serde.encode(TOPOLOGY.events, _submitted_avro(attempt="one"))
    # At the edges of the range, values pass and come back unchanged.
    for priority in (2**31 - 1, -(2**31)):
        data = serde.encode(TOPOLOGY.events, _submitted_avro(priority=priority))
        decoded = serde.decode(TOPOLOGY.events, data)
        assert decoded["payload"][1]["priority"] == priority
