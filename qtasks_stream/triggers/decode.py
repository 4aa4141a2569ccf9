"""Reading a foreign record's key and value in the format its :class:`Topic` names.

Avro values are read with their writer's schema alone (fetched from the registry by the id
in the wire header, once per id): the trigger has no reader schema of another team's topic,
and the task gets plain values (records as dicts).
"""

from __future__ import annotations

import json
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.errors import SerdeError
from qtasks_stream.records import Record
from qtasks_stream.serde import wire
from qtasks_stream.triggers.base import Topic, TriggerRecord

__all__ = ["RecordDecoder"]


class RecordDecoder:
    """Decodes trigger records; one per stage, sharing the writer schemas it fetched."""

    def __init__(self, registry: SchemaRegistryClient) -> None:
        self._schemas = wire.WriterSchemas(registry)

    def _read(self, data: bytes, form: str, what: str) -> Any:
        if form == "avro":
            return wire.read(data, self._schemas, None, what)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SerdeError(f"{what} is not UTF-8 text: {exc}") from exc
        if form == "string":
            return text
        try:
            return json.loads(text)
        except ValueError as exc:
            raise SerdeError(f"{what} is not JSON: {exc}") from exc

    def value(self, topic: Topic, record: Record) -> Any:
        """The record's value.

        Raises:
            SerdeError: the value is missing (a tombstone) or not in the topic's format.
            RegistryUnavailableError: the registry holding the writer schema did not answer.
        """
        if record.value is None:
            raise SerdeError("record has no value (a tombstone)")
        return self._read(record.value, topic.value, f"value ({topic.value})")

    def record(self, topic: Topic, record: Record) -> TriggerRecord:
        """Where ``record`` came from, its key as text (see :class:`TriggerRecord`).

        Raises:
            SerdeError: the key is not in the topic's key format.
        """
        key: str | None = None
        if record.key is not None:
            decoded = self._read(record.key, topic.key, f"key ({topic.key})")
            key = decoded if topic.key == "string" else json.dumps(decoded, default=str)
        return TriggerRecord(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
            key=key,
            headers={k: v.decode("utf-8", "backslashreplace") for k, v in record.headers},
        )
