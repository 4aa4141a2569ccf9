"""The Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body.

Shared by the topic serde and the task payload codec, so both validate, cache writer
schemas and report corrupt bytes the same way.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro.validation import ValidationError, validate

from qtasks_stream.errors import QTasksStreamError, SchemaError, SerdeError

__all__ = ["WriterSchemas", "header", "read", "write"]

_HEADER = struct.Struct(">bI")
_MAGIC = 0


def header(schema_id: int) -> bytes:
    """The five bytes that start every value written with schema ``schema_id``."""
    return _HEADER.pack(_MAGIC, schema_id)


class WriterSchemas:
    """Parsed schemas by id: ours added at registration, others fetched once when seen."""

    def __init__(self, registry: SchemaRegistryClient) -> None:
        self._registry = registry
        self._by_id: dict[int, Any] = {}

    def add(self, schema_id: int, parsed: Any) -> None:
        self._by_id[schema_id] = parsed

    def get(self, schema_id: int) -> Any:
        parsed = self._by_id.get(schema_id)
        if parsed is None:
            try:
                text = self._registry.get_schema(schema_id).schema_str
                parsed = fastavro.parse_schema(json.loads(text or ""))
            except SchemaRegistryError as exc:
                raise SchemaError(f"unknown schema id {schema_id}: {exc}") from exc
            except Exception as exc:
                raise SchemaError(f"schema id {schema_id} could not be fetched: {exc}") from exc
            self._by_id[schema_id] = parsed
        return parsed


def write(
    parsed: Any,
    prefix: bytes,
    value: Any,
    what: str,
    error: type[QTasksStreamError] = SerdeError,
) -> bytes:
    """``prefix`` (a :func:`header`) and ``value`` in Avro, checked against ``parsed`` first.

    Raises:
        error: ``value`` does not fit: ``what`` (the complaint, say "value does not fit the
            schema of topic 't'"), then every problem.
    """
    buf = io.BytesIO()
    buf.write(prefix)
    try:
        # fastavro's writer does not range-check: a Python int past 32 bits would be
        # written as an Avro "int" that Java and other readers misread or reject.
        validate(value, parsed, raise_errors=True)
        fastavro.schemaless_writer(buf, parsed, value)
    except ValidationError as exc:
        problems = "; ".join(str(e) for e in exc.errors)
        raise error(f"{what}: {problems}") from exc
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise error(f"{what}: {exc}") from exc
    return buf.getvalue()


def read(
    data: bytes,
    schemas: WriterSchemas,
    reader: Any,
    what: str,
    *,
    reader_id: int | None = None,
    **options: Any,
) -> Any:
    """The value in ``data``, resolved to ``reader`` unless that is the writer's own schema
    (``reader_id``) or ``None``; ``options`` go to fastavro's reader.

    Raises:
        SerdeError: not the wire format, corrupt, or trailing bytes.
        SchemaError: the writer's schema cannot be had.
    """
    if len(data) < _HEADER.size:
        raise SerdeError(f"{what} is {len(data)} bytes: too short for Avro")
    magic, schema_id = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise SerdeError(f"{what} has magic byte {magic}, not 0: not Avro")
    writer = schemas.get(schema_id)
    if schema_id == reader_id or reader is writer:
        reader = None
    buf = io.BytesIO(data)
    buf.seek(_HEADER.size)
    try:
        value = fastavro.schemaless_reader(buf, writer, reader, **options)
    except Exception as exc:  # fastavro raises many types for corrupt input
        raise SerdeError(f"{what} (schema id {schema_id}) cannot be decoded: {exc!r}") from exc
    if buf.tell() != len(data):
        raise SerdeError(f"{what} has {len(data) - buf.tell()} trailing bytes after its body")
    return value
