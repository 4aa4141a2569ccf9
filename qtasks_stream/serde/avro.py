"""Avro values in the Confluent wire format: magic byte 0, 4-byte schema id, Avro body.

Schemas are registered through confluent-kafka's ``SchemaRegistryClient`` under the topic
name strategy (``<topic>-value``); on the embedded default that client is its in-process
``mock://`` registry. The hot path uses fastavro's schemaless codecs on parsed schemas cached
by id, and resolves a writer schema against the local reader schema only when they differ.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.errors import SchemaError, SerdeError
from qtasks_stream.serde import compiled, wire
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.schemas import load_schema_text

__all__ = ["AvroSerde", "subject_for"]


def subject_for(topic: str) -> str:
    """The registry subject of a topic's values (topic name strategy)."""
    return f"{topic}-value"


@dataclass(frozen=True, slots=True)
class _Reader:
    """How to decode one topic's values: built at registration, one lookup per record."""

    schema_id: int
    parsed: Any
    what: str
    #: Whether the schema has a union of records: only then does reading with record names
    #: (``(name, fields)`` for such a union's value) change what is read.
    named: bool
    #: The top-level field that is the schema's one union of records (``payload``), if any.
    union_field: str | None = None
    #: Branch name (short and full) → (full name, field names), for the branches whose set
    #: of field names no other branch has: a value read without record names still tells
    #: which of them it is. ``Cancelled`` and ``CancelRequested`` (both just ``reason``) are
    #: left out, so read with names.
    branches: Mapping[str, tuple[str, frozenset[str]]] | None = None
    #: Reads values written with ``schema_id`` (with record names), if the shape allows.
    compiled: compiled.Reader | None = None
    #: The wire header of values written with ``schema_id``.
    prefix: bytes = b""


def _record_unions(schema: Any, named: Mapping[str, Any], path: str, seen: set[str]) -> list[str]:
    """Where ``schema`` has unions of two or more records (the only ones that reading with
    record names changes); ``"<recursive>"`` for a recursive schema."""
    if isinstance(schema, str):
        target = named.get(schema)
        if not isinstance(target, dict) or target.get("type") != "record":
            return []
        if schema in seen:
            return ["<recursive>"]
        return _record_unions(target, named, path, seen | {schema})
    if isinstance(schema, list):
        records = [
            b
            for b in schema
            if (isinstance(b, dict) and b.get("type") == "record")
            or (
                isinstance(b, str)
                and isinstance(named.get(b), dict)
                and named[b].get("type") == "record"
            )
        ]
        found = [path] if len(records) >= 2 else []
        for branch in schema:
            found += _record_unions(branch, named, path, seen)
        return found
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    if kind == "record":
        name = schema.get("name", "")
        inner = seen | {name}
        found = []
        for f in schema["fields"]:
            found += _record_unions(f["type"], named, f"{path}.{f['name']}", inner)
        return found
    if kind == "array":
        return _record_unions(schema["items"], named, f"{path}[]", seen)
    if kind == "map":
        return _record_unions(schema["values"], named, f"{path}{{}}", seen)
    return []


def _reader(schema_id: int, parsed: Any, topic: str) -> _Reader:
    what = f"record of {topic!r}"
    named = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
    unions = _record_unions(parsed, named, "", set())
    fast = compiled.compile_reader(parsed)
    prefix = wire.header(schema_id)
    # Only a schema whose one union of records is a top-level field: then a value read
    # without names differs from one read with names in that field alone.
    top = {"." + f["name"]: f for f in parsed.get("fields", ())} if named else {}
    if len(unions) != 1 or unions[0] not in top:
        return _Reader(schema_id, parsed, what, named=bool(unions), compiled=fast, prefix=prefix)
    field = top[unions[0]]["name"]
    union = top[unions[0]]["type"]
    records = [named[b] if isinstance(b, str) else b for b in union]
    records = [r for r in records if isinstance(r, dict) and r.get("type") == "record"]
    field_sets = [frozenset(f["name"] for f in r["fields"]) for r in records]
    branches: dict[str, tuple[str, frozenset[str]]] = {}
    for record, names in zip(records, field_sets, strict=True):
        if field_sets.count(names) == 1:
            full = record["name"]
            branches[full] = branches[full.rpartition(".")[2]] = (full, names)
    return _Reader(schema_id, parsed, what, True, field, branches, fast, prefix)


class AvroSerde(Serde):
    """Encodes each topic's values with the schema named for it.

    Args:
        registry: a Confluent-compatible registry client (``mock://`` for the embedded default).
        close_registry: close the client with the serde (when the caller hands it over).
        topic_schemas: topic name → schema name in ``schemas/avro`` (``TaskEvent``...).
    """

    def __init__(
        self,
        registry: SchemaRegistryClient,
        topic_schemas: Mapping[str, str],
        *,
        close_registry: bool = False,
    ) -> None:
        self._registry = registry
        self._close_registry = close_registry
        self._topic_schemas = dict(topic_schemas)
        self._parsed_by_name: dict[str, Any] = {}
        self._writer: dict[str, tuple[bytes, Any, wire.Guard | None, compiled.Writer | None]] = {}
        self._readers: dict[str, _Reader] = {}
        self._schemas = wire.WriterSchemas(registry)

    def _parsed(self, name: str) -> Any:
        parsed = self._parsed_by_name.get(name)
        if parsed is None:
            try:
                parsed = fastavro.parse_schema(json.loads(load_schema_text(name)))
            except (OSError, ValueError, fastavro.schema.SchemaParseException) as exc:
                raise SchemaError(f"schema {name!r} cannot be loaded: {exc}") from exc
            self._parsed_by_name[name] = parsed
        return parsed

    async def start(self) -> None:
        await asyncio.to_thread(self._register_all)

    def add_topics(self, topic_schemas: Mapping[str, str]) -> None:
        self._topic_schemas.update(topic_schemas)

    async def close(self) -> None:
        if self._close_registry:
            # The client keeps an HTTP session; it is only ours to close when we were told so.
            self._registry.__exit__()  # type: ignore[no-untyped-call]

    def _register_all(self) -> None:
        # Imported here: compat imports subject_for from this module.
        from qtasks_stream.serde.compat import register_schemas

        pending = {t: n for t, n in self._topic_schemas.items() if t not in self._writer}
        if not pending:
            return
        # Checked against every registered version and pinned per subject before anything is
        # registered: an incompatible local schema stops the app before it produces a record.
        ids = register_schemas(
            self._registry,
            {subject_for(topic): load_schema_text(name) for topic, name in pending.items()},
        )
        for topic, name in pending.items():
            schema_id = ids[subject_for(topic)]
            parsed = self._parsed(name)
            self._writer[topic] = (
                wire.header(schema_id),
                parsed,
                wire.int_guard(parsed),
                compiled.compile_writer(parsed),
            )
            self._readers[topic] = _reader(schema_id, parsed, topic)
            self._schemas.add(schema_id, parsed)

    def encode(self, topic: str, value: dict[str, Any]) -> bytes:
        try:
            prefix, parsed, guard, writer = self._writer[topic]
        except KeyError:
            raise SerdeError(f"no schema registered for topic {topic!r}; start the serde") from None
        what = f"value does not fit the schema of topic {topic!r}"
        return wire.write(parsed, prefix, value, what, guard=guard, compiled=writer)

    def decode(self, topic: str, data: bytes, *, branch: str | None = None) -> dict[str, Any]:
        try:
            reader = self._readers[topic]
        except KeyError:
            raise SerdeError(f"no schema registered for topic {topic!r}; start the serde") from None
        if reader.compiled is not None and data.startswith(reader.prefix):
            # Written with our own schema: the compiled reader, record names included (the
            # header's branch is not needed). Another writer schema is resolved by fastavro.
            value = wire.read(
                data,
                self._schemas,
                reader.parsed,
                reader.what,
                reader_id=reader.schema_id,
                compiled=reader.compiled,
            )
        elif not reader.named:
            # No union of records: reading with record names would change nothing.
            value = wire.read(
                data, self._schemas, reader.parsed, reader.what, reader_id=reader.schema_id
            )
        elif (
            branch is not None
            and reader.branches is not None
            and (known := reader.branches.get(branch)) is not None
        ):
            # The header names the branch: read without record names, which costs fastavro a
            # check per union (a fifth of the read), and name the branch ourselves once the
            # fields read show that it is the one the header says.
            value = wire.read(
                data, self._schemas, reader.parsed, reader.what, reader_id=reader.schema_id
            )
            body = value.get(reader.union_field) if isinstance(value, dict) else None
            full, names = known
            if type(body) is dict and body.keys() == names:
                value[reader.union_field] = (full, body)
            else:
                # Another branch than the header says: the bytes decide, as without it.
                value = self._read_named(reader, data)
        else:
            value = self._read_named(reader, data)
        if not isinstance(value, dict):
            raise SerdeError(f"record of {topic!r} is not an Avro record")
        return value

    def _read_named(self, reader: _Reader, data: bytes) -> Any:
        return wire.read(
            data,
            self._schemas,
            reader.parsed,
            reader.what,
            reader_id=reader.schema_id,
            return_record_name=True,
            return_record_name_override=True,
        )
