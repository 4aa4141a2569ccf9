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
from typing import Any

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.errors import SchemaError, SerdeError
from qtasks_stream.serde import wire
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.schemas import load_schema_text

__all__ = ["AvroSerde", "subject_for"]


def subject_for(topic: str) -> str:
    """The registry subject of a topic's values (topic name strategy)."""
    return f"{topic}-value"


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
        self._writer: dict[str, tuple[bytes, Any, wire.Guard | None]] = {}
        self._reader_id: dict[str, int] = {}
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
            self._writer[topic] = (wire.header(schema_id), parsed, wire.int_guard(parsed))
            self._reader_id[topic] = schema_id
            self._schemas.add(schema_id, parsed)

    def encode(self, topic: str, value: dict[str, Any]) -> bytes:
        try:
            prefix, parsed, guard = self._writer[topic]
        except KeyError:
            raise SerdeError(f"no schema registered for topic {topic!r}; start the serde") from None
        what = f"value does not fit the schema of topic {topic!r}"
        return wire.write(parsed, prefix, value, what, guard=guard)

    def decode(self, topic: str, data: bytes) -> dict[str, Any]:
        try:
            reader_id = self._reader_id[topic]
        except KeyError:
            raise SerdeError(f"no schema registered for topic {topic!r}; start the serde") from None
        value = wire.read(
            data,
            self._schemas,
            self._schemas.get(reader_id),
            f"record of {topic!r}",
            reader_id=reader_id,
            return_record_name=True,
            return_record_name_override=True,
        )
        if not isinstance(value, dict):
            raise SerdeError(f"record of {topic!r} is not an Avro record")
        return value
