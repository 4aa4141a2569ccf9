"""The compiled Avro codecs give fastavro's bytes and values for every schema of ours."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.errors import SerdeError
from qtasks_stream.events import Submitted, TaskEvent
from qtasks_stream.serde.avro import AvroSerde
from qtasks_stream.serde.compiled import compile_reader, compile_writer
from qtasks_stream.topology import Topology

SCHEMAS = sorted(Path(__file__).resolve().parents[2].joinpath("schemas", "avro").glob("*.avsc"))
_INTS = (0, 1, -1, 63, 64, -64, -65, 300, 2**31 - 1, -(2**31))
_LONGS = (*_INTS, 2**63 - 1, -(2**63), 1_700_000_000_000_000)
_TEXTS = ("", "a", "sëlf ☃ 𝄞", "x" * 200)


def _value(schema: Any, named: dict[str, Any], rng: random.Random) -> Any:
    """A random value of ``schema``, in the form our to_avro methods give (unions of
    records as (full name, fields))."""
    if isinstance(schema, str):
        if schema in named:
            return _value(named[schema], named, rng)
        return {
            "null": lambda: None,
            "boolean": lambda: rng.random() < 0.5,
            "int": lambda: rng.choice(_INTS),
            "long": lambda: rng.choice(_LONGS),
            "float": lambda: 0.5,
            "double": lambda: rng.choice((0.0, -1.5, 1e300, 0.1)),
            "string": lambda: rng.choice(_TEXTS),
            "bytes": lambda: rng.choice((b"", b"\x00\xff", bytes(range(200)))),
        }[schema]()
    if isinstance(schema, list):
        branch = rng.choice(schema)
        resolved = named.get(branch, branch) if isinstance(branch, str) else branch
        value = _value(branch, named, rng)
        records = [b for b in schema if isinstance(b, dict) or isinstance(named.get(b), dict)]
        if len(records) >= 2 and isinstance(resolved, dict):
            return (resolved["name"], value)
        return value
    kind = schema["type"]
    if kind == "record":
        return {f["name"]: _value(f["type"], named, rng) for f in schema["fields"]}
    if kind == "array":
        return [_value(schema["items"], named, rng) for _ in range(rng.choice((0, 1, 3)))]
    if kind == "map":
        return {f"k{i}": _value(schema["values"], named, rng) for i in range(rng.choice((0, 2)))}
    if kind == "enum":
        return rng.choice(schema["symbols"])
    return _value(kind, named, rng)


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.stem)
def test_same_bytes_and_values_as_fastavro(path: Path) -> None:
    parsed = fastavro.parse_schema(json.loads(path.read_text()))
    writer, reader = compile_writer(parsed), compile_reader(parsed)
    assert writer is not None and reader is not None
    rng = random.Random(path.stem)
    for _ in range(300):
        value = _value(parsed, parsed.get("__named_schemas", {}), rng)
        expected = io.BytesIO()
        fastavro.schemaless_writer(expected, parsed, value)
        out = bytearray(b"head")
        writer(value, out)
        assert bytes(out[4:]) == expected.getvalue(), value
        data = b"head" + expected.getvalue()
        read = fastavro.schemaless_reader(
            io.BytesIO(expected.getvalue()),
            parsed,
            None,
            return_record_name=True,
            return_record_name_override=True,
        )
        assert reader(data, 4) == (read, len(data))


def test_shapes_not_covered_compile_to_none() -> None:
    logical = fastavro.parse_schema(
        {
            "type": "record",
            "name": "L",
            "fields": [{"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}],
        }
    )
    recursive = fastavro.parse_schema(
        {
            "type": "record",
            "name": "Node",
            "fields": [{"name": "next", "type": ["null", "Node"]}],
        }
    )
    mixed = fastavro.parse_schema(
        {"type": "record", "name": "M", "fields": [{"name": "v", "type": ["string", "long"]}]}
    )
    for schema in (logical, recursive):
        assert compile_writer(schema) is None
        assert compile_reader(schema) is None
    assert compile_writer(mixed) is None  # a union fastavro picks the branch of by type
    reader = compile_reader(mixed)
    assert reader is not None and reader(b"\x02\x04", 0) == ({"v": 2}, 2)


@pytest.fixture
async def serde() -> AvroSerde:
    topology = Topology("compiled", partitions=1, lanes=1)
    registry = SchemaRegistryClient.new_client({"url": "mock://compiled-avro"})
    avro = AvroSerde(registry, topology.topic_schemas())
    await avro.start()
    return avro


async def test_a_value_that_does_not_fit_is_refused_naming_the_field(serde: AvroSerde) -> None:
    topic = Topology("compiled", partitions=1, lanes=1).events
    event = TaskEvent.new("t", "n", 1, "client", Submitted("[]", "{}", 0))
    value = event.to_avro()
    value["payload"][1]["args"] = 5  # a string field
    with pytest.raises(SerdeError, match=r"args"):
        serde.encode(topic, value)
    value["payload"][1]["args"] = "[]"
    value["attempt"] = "one"
    with pytest.raises(SerdeError, match=r"attempt"):
        serde.encode(topic, value)


async def test_corrupt_bytes_are_refused(serde: AvroSerde) -> None:
    topic = Topology("compiled", partitions=1, lanes=1).events
    event = TaskEvent.new("t", "n", 1, "client", Submitted("[]", "{}", 0))
    data = serde.encode(topic, event.to_avro())
    # The first field (event_id) given a negative length; then a union index past the end.
    negative = data[:5] + b"\x03" + data[6:]
    with pytest.raises(SerdeError, match="cannot be decoded"):
        serde.decode(topic, negative)
    head = serde.decode(topic, data)
    assert head["payload"][0].endswith("Submitted")
    fields = TaskEvent.from_avro(head)
    assert fields == event
    # The payload's branch index is the byte after traceparent's null (index 0).
    at = data.index(b"client") + len(b"client") + 1
    with pytest.raises(SerdeError, match="cannot be decoded"):
        serde.decode(topic, data[:at] + b"\x7e" + data[at + 1 :])
