"""Avro values in the Confluent wire format: magic byte 0, 4-byte schema id, Avro body.

Schemas are registered through confluent-kafka's ``SchemaRegistryClient`` under the topic
name strategy (``<topic>-value``); on the embedded default that client is its in-process
``mock://`` registry. The hot path uses fastavro's schemaless codecs on parsed schemas cached
by id, and resolves a writer schema against the local reader schema only when they differ.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
from collections.abc import Mapping
from typing import Any

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro.validation import ValidationError, validate

from qtasks_stream.errors import SchemaError, SerdeError
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.schemas import load_schema_text

__all__ = ["AvroSerde", "subject_for"]

_HEADER = struct.Struct(">bI")
_MAGIC = 0


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
        self._writer: dict[str, tuple[bytes, Any]] = {}
        self._reader_id: dict[str, int] = {}
        self._by_id: dict[int, Any] = {}

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
            self._writer[topic] = (_HEADER.pack(_MAGIC, schema_id), parsed)
            self._reader_id[topic] = schema_id
            self._by_id[schema_id] = parsed

    def encode(self, topic: str, value: dict[str, Any]) -> bytes:
        try:
            header, parsed = self._writer[topic]
        except KeyError:
            raise SerdeError(f"no schema registered for topic {topic!r}; start the serde") from None
        buf = io.BytesIO()
        buf.write(header)
        try:
            # fastavro's writer does not range-check: a Python int past 32 bits would be
            # written as an Avro "int" that Java and other readers misread or reject.
            validate(value, parsed, raise_errors=True)
            fastavro.schemaless_writer(buf, parsed, value)
        except ValidationError as exc:
            problems = "; ".join(str(e) for e in exc.errors)
            raise SerdeError(
                f"value does not fit the schema of topic {topic!r}: {problems}"
            ) from exc
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SerdeError(f"value does not fit the schema of topic {topic!r}: {exc}") from exc
        return buf.getvalue()

    def _writer_schema(self, schema_id: int) -> Any:
        parsed = self._by_id.get(schema_id)
        if parsed is None:
            # A schema another writer registered (a newer version, say): fetched once, cached.
            try:
                text = self._registry.get_schema(schema_id).schema_str
                parsed = fastavro.parse_schema(json.loads(text or ""))
            except SchemaRegistryError as exc:
                raise SchemaError(f"unknown schema id {schema_id}: {exc}") from exc
            except Exception as exc:
                raise SchemaError(f"schema id {schema_id} could not be fetched: {exc}") from exc
            self._by_id[schema_id] = parsed
        return parsed

    def decode(self, topic: str, data: bytes) -> dict[str, Any]:
        if len(data) < _HEADER.size:
            raise SerdeError(f"record of {topic!r} is {len(data)} bytes: too short for Avro")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise SerdeError(f"record of {topic!r} has magic byte {magic}, not 0: not Avro")
        try:
            reader_id = self._reader_id[topic]
        except KeyError:
            raise SerdeError(f"no schema registered for topic {topic!r}; start the serde") from None
        writer = self._writer_schema(schema_id)
        reader = None if schema_id == reader_id else self._by_id[reader_id]
        buf = io.BytesIO(data)
        buf.seek(_HEADER.size)
        try:
            value: Any = fastavro.schemaless_reader(
                buf, writer, reader, return_record_name=True, return_record_name_override=True
            )
        except Exception as exc:  # fastavro raises many types for corrupt input
            raise SerdeError(
                f"record of {topic!r} (schema id {schema_id}) cannot be decoded: {exc!r}"
            ) from exc
        if buf.tell() != len(data):
            raise SerdeError(
                f"record of {topic!r} has {len(data) - buf.tell()} trailing bytes after its body"
            )
        if not isinstance(value, dict):
            raise SerdeError(f"record of {topic!r} is not an Avro record")
        return value
