"""A consumer of a qtasks-stream events topic written the way another team would write it.

It uses only ``confluent_kafka`` (``Consumer``, ``AvroDeserializer``, a fresh
``SchemaRegistryClient``) and the standard library: the contract test checks that this
module imports nothing of ``qtasks_stream``, so what it reads is what the published contract
(``docs/events.md``) lets anyone read.

How the payload union comes out of ``AvroDeserializer``: by default a union of records is
decoded to a plain dict of the chosen branch's fields, which does not say which branch it
was (``Cancelled`` and ``CancelRequested`` both decode to ``{"reason": ...}``). With
``return_record_name=True`` (a constructor argument, not a ``conf`` key) every union that
holds records decodes to a ``(full record name, fields)`` tuple, e.g.
``("qtasks.stream.v1.Succeeded", {"result": "42", ...})``; its short name is the event kind.

Typed task payloads (content type ``application/vnd.qtasks.avro``) are Avro records in the
Confluent wire format inside the ``arguments_avro`` / ``result_avro`` bytes fields: the same
deserializer decodes them, fetching their schema by the id in their first bytes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

KIND_HEADER = "qtasks.kind"


@dataclass(frozen=True)
class ForeignEvent:
    """One record of an events topic, as a consumer outside the project sees it."""

    task_id: str  # the record key, UTF-8
    kind: str  # the payload's union branch (short record name)
    header_kind: str | None  # the qtasks.kind header, readable without decoding
    partition: int
    offset: int
    envelope: dict[str, Any]  # the whole value; envelope["payload"] is (record name, fields)
    payload: dict[str, Any]  # the fields of the payload branch
    typed: dict[str, Any] = field(default_factory=dict)  # decoded *_avro fields, by name


def plain_consumer(bootstrap: str, group_id: str, **extra: Any) -> Consumer:
    """A consumer in its own group that reads committed records only."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            **extra,
        }
    )


def header(msg: Message, name: str) -> str | None:
    headers = msg.headers() or []
    pairs = headers.items() if isinstance(headers, dict) else headers
    for key, raw in pairs:
        if key == name:
            return raw.decode() if isinstance(raw, bytes) else raw
    return None


def _key(msg: Message) -> str:
    key = msg.key()
    if not isinstance(key, bytes):
        raise TypeError(f"record {msg.topic()}/{msg.partition()}/{msg.offset()} has no key")
    return key.decode("utf-8")


def _value_context(msg: Message) -> SerializationContext:
    return SerializationContext(msg.topic() or "", MessageField.VALUE)


def decode_event(
    deserializer: AvroDeserializer, msg: Message, nested: AvroDeserializer | None = None
) -> ForeignEvent:
    envelope = deserializer(msg.value(), _value_context(msg))
    if not isinstance(envelope, dict):
        raise TypeError(f"expected an Avro record, got {envelope!r}")
    record_name, payload = envelope["payload"]
    typed = {}
    if nested is not None:
        for name in ("arguments_avro", "result_avro"):
            if payload.get(name) is not None:
                typed[name] = nested(payload[name], _value_context(msg))
    return ForeignEvent(
        task_id=_key(msg),
        kind=record_name.rpartition(".")[2],
        header_kind=header(msg, KIND_HEADER),
        partition=msg.partition() or 0,
        offset=msg.offset() or 0,
        envelope=envelope,
        payload=payload,
        typed=typed,
    )


def read_to_end(
    bootstrap: str, topic: str, on_message: Callable[[Message], None], *, timeout: float = 30.0
) -> None:
    """Hand every committed record of ``topic`` to ``on_message``, up to the end of each
    partition as of the call. Partitions are assigned: no group offsets are read or
    committed."""
    consumer = plain_consumer(
        bootstrap, f"foreign-reader-{uuid.uuid4().hex}", **{"enable.partition.eof": True}
    )
    try:
        described = consumer.list_topics(topic, timeout=10).topics[topic]
        if described.error is not None:
            raise KafkaException(described.error)
        pending = set(described.partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in sorted(pending)])
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"partitions {sorted(pending)} of {topic} not read to the end")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.partition())
                    continue
                raise KafkaException(error)
            on_message(msg)
    finally:
        consumer.close()


def read_events(
    bootstrap: str, registry_url: str, topic: str, *, timeout: float = 30.0
) -> list[ForeignEvent]:
    """Every committed event of an events topic, decoded with the writer's schema."""
    events: list[ForeignEvent] = []
    with SchemaRegistryClient({"url": registry_url, "timeout": 10}) as registry:
        deserializer = AvroDeserializer(registry, return_record_name=True)
        nested = AvroDeserializer(registry)
        read_to_end(
            bootstrap,
            topic,
            lambda msg: events.append(decode_event(deserializer, msg, nested)),
            timeout=timeout,
        )
    return events


def read_values(
    bootstrap: str, registry_url: str, topic: str, *, timeout: float = 30.0
) -> list[tuple[str, Any]]:
    """(key, decoded value) of every committed record of any Avro topic."""
    values: list[tuple[str, Any]] = []
    with SchemaRegistryClient({"url": registry_url, "timeout": 10}) as registry:
        deserializer = AvroDeserializer(registry)

        def keep(msg: Message) -> None:
            values.append((_key(msg), deserializer(msg.value(), _value_context(msg))))

        read_to_end(bootstrap, topic, keep, timeout=timeout)
    return values


def consume_in_group(
    bootstrap: str,
    registry_url: str,
    topic: str,
    group_id: str,
    handle: Callable[[ForeignEvent], None],
    *,
    kinds: Collection[str],
    until: Callable[[], bool],
    timeout: float = 30.0,
    client: Mapping[str, Any] | None = None,
    registry_auth: str | None = None,
) -> int:
    """Consume ``topic`` in group ``group_id``, committing each record once handled, until
    ``until()``. Records whose ``qtasks.kind`` header is not in ``kinds`` are skipped without
    being decoded. Returns how many records were decoded. ``client`` adds consumer properties
    (a secured cluster's SASL and TLS ones); ``registry_auth`` is the registry's user:password.
    """
    decoded = 0
    registry_conf: dict[str, Any] = {"url": registry_url, "timeout": 10}
    if registry_auth:
        registry_conf["basic.auth.user.info"] = registry_auth
    with SchemaRegistryClient(registry_conf) as registry:
        deserializer = AvroDeserializer(registry, return_record_name=True)
        consumer = plain_consumer(bootstrap, group_id, **(client or {}))
        try:
            consumer.subscribe([topic])
            deadline = time.monotonic() + timeout
            while not until():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"group {group_id} did not finish reading {topic}")
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error() is not None:
                    raise KafkaException(msg.error())
                if header(msg, KIND_HEADER) in kinds:
                    handle(decode_event(deserializer, msg))
                    decoded += 1
                consumer.commit(message=msg, asynchronous=False)
        finally:
            consumer.close()
    return decoded


def lifecycles(events: Iterable[ForeignEvent]) -> dict[str, list[str]]:
    """Task id → its event kinds in log order (all events of a task share a partition)."""
    by_task: dict[str, list[str]] = {}
    for event in sorted(events, key=lambda e: (e.partition, e.offset)):
        by_task.setdefault(event.task_id, []).append(event.kind)
    return by_task
