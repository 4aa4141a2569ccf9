"""Between confluent-kafka's types and ours: errors (fencing kept apart), partitions, headers."""

from __future__ import annotations

from typing import Any

import confluent_kafka as ck
from confluent_kafka import KafkaError

from qtasks_stream.errors import EventLogError, FencedError
from qtasks_stream.eventlog.kafka_admin import describe_kafka_error, kafka_error_of, refusal
from qtasks_stream.eventlog.kafka_config import principal_of
from qtasks_stream.records import Headers, TopicPartition

__all__ = ["ck_tp", "headers_of", "map_error", "our_tp"]


#: librdkafka codes meaning "a newer producer or group generation owns this work".
_FENCING_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.STALE_MEMBER_EPOCH,
        KafkaError.FENCED_MEMBER_EPOCH,
    }
)


def map_error(
    exc: BaseException,
    what: str,
    *,
    conf: dict[str, Any] | None = None,
    operation: str = "",
    names: dict[str, str] | None = None,
) -> EventLogError:
    """Our error for a librdkafka one, keeping its code; raise it ``from exc``. A refusal
    by the cluster becomes an ``AuthorizationError`` naming the principal of ``conf`` and
    the ``operation`` on the resources ``names`` names (see ``refusal``)."""
    if isinstance(exc, EventLogError):
        return exc
    err = kafka_error_of(exc)
    text = f"{what}: {describe_kafka_error(exc)}"
    if err is not None and err.code() in _FENCING_CODES:
        return FencedError(text)
    if err is not None:
        principal = principal_of(conf) if conf is not None else "this client"
        refused = refusal(err.code(), text, principal=principal, operation=operation, names=names)
        if refused is not None:
            return refused
    return EventLogError(text)


def ck_tp(tp: TopicPartition, offset: int | None = None) -> ck.TopicPartition:
    if offset is None:
        return ck.TopicPartition(tp.topic, tp.partition)
    return ck.TopicPartition(tp.topic, tp.partition, offset)


def our_tp(tp: ck.TopicPartition) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _header_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else bytes(value)


def headers_of(msg: Any) -> Headers:
    raw = msg.headers()
    if not raw:
        return ()
    items = raw.items() if isinstance(raw, dict) else raw
    for _, value in items:
        if type(value) is not bytes:
            return tuple((key, _header_bytes(value)) for key, value in items)
    # Every value is bytes (ours always are): the client's (str, bytes) pairs as they are.
    return tuple(items)
