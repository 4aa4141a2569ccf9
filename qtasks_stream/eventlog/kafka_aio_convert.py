"""Between aiokafka's types and ours: errors (fencing kept apart), partitions, headers,
and the parameters a client class accepts."""

from __future__ import annotations

import inspect
from typing import Any

from aiokafka import TopicPartition as AioTopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    InvalidProducerEpoch,
    ProducerFenced,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

from qtasks_stream.errors import EventLogError, FencedError
from qtasks_stream.eventlog.kafka_admin import refusal
from qtasks_stream.eventlog.kafka_config import principal_of
from qtasks_stream.records import Headers, TopicPartition

__all__ = ["aio_tp", "headers_of", "map_error", "our_tp", "parameters"]


#: aiokafka errors that mean "someone newer owns this work".
_FENCING = (
    ProducerFenced,
    InvalidProducerEpoch,
    CommitFailedError,
    IllegalGenerationError,
    UnknownMemberIdError,
    RebalanceInProgressError,
)


def parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls).parameters) - {"loop"}


def map_error(
    exc: BaseException,
    what: str,
    *,
    conf: dict[str, Any] | None = None,
    operation: str = "",
    names: dict[str, str] | None = None,
) -> EventLogError:
    """Our error for an aiokafka one; the caller raises it ``from exc``. A refusal by the
    cluster (aiokafka's errno is Kafka's error code) becomes an ``AuthorizationError`` naming
    the principal of ``conf`` (the client's keyword arguments) and the ``operation`` on the
    resources ``names`` names (see ``refusal``)."""
    if isinstance(exc, EventLogError):
        return exc
    if isinstance(exc, _FENCING):
        return FencedError(f"{what}: superseded by a newer producer or group generation ({exc!r})")
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        principal = principal_of(conf) if conf is not None else "this client"
        refused = refusal(
            code, f"{what}: {exc!r}", principal=principal, operation=operation, names=names
        )
        if refused is not None:
            return refused
    return EventLogError(f"{what}: {exc!r}")


def aio_tp(tp: TopicPartition) -> AioTopicPartition:
    return AioTopicPartition(tp.topic, tp.partition)


def our_tp(tp: Any) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def headers_of(raw: Any) -> Headers:
    """aiokafka's headers (a tuple of (str, bytes | None) pairs) as ours: its own tuple when
    every value is bytes, as ours always are, without a copy per record."""
    if not raw:
        return ()
    for _, value in raw:
        if type(value) is not bytes:
            return tuple((k, bytes(v)) for k, v in raw)
    return raw if type(raw) is tuple else tuple(raw)
