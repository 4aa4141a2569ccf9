"""The event log on Apache Kafka through aiokafka (pure asyncio, no threads).

Group membership, heartbeats and fetching run in aiokafka's background tasks: a member
keeps up with rebalances while the stage is busy between polls, and the rebalance listener
is called from those tasks. Transactions serialize on a per-producer lock, so a listener
committing from ``on_revoked`` waits for a transaction the stage has in flight instead of
interleaving with it.

aiokafka's TxnOffsetCommit (v0) carries no group generation, so the broker cannot fence a
zombie member's transactional offsets; :meth:`commit_transaction` refuses offsets of
partitions this member no longer holds, which catches zombies of a rebalance this process
has seen.

This module holds the event log (the clients' settings); the clients are in
:mod:`.kafka_aio_producer` and :mod:`.kafka_aio_consumer`, the conversions between aiokafka's
types and ours in :mod:`.kafka_aio_convert`, and what they share with the confluent-kafka log
in :mod:`.kafka_common`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.base import Consumer, Producer, RebalanceListener, StartFrom
from qtasks_stream.eventlog.kafka_aio_consumer import AioConsumer
from qtasks_stream.eventlog.kafka_aio_convert import parameters
from qtasks_stream.eventlog.kafka_aio_producer import AioProducer
from qtasks_stream.eventlog.kafka_common import KafkaEventLog
from qtasks_stream.eventlog.kafka_config import KafkaConfig

__all__ = ["AioKafkaEventLog"]


class AioKafkaEventLog(KafkaEventLog):
    """Kafka through aiokafka. Creating it does no I/O; clients connect in ``start()``."""

    def __init__(self, config: KafkaConfig) -> None:
        super().__init__(config)
        self._producer_params = parameters(AIOKafkaProducer)
        self._consumer_params = parameters(AIOKafkaConsumer)
        unknown = sorted(
            key
            for key, name in ((k, k.replace(".", "_")) for k in config.extra)
            if name not in self._producer_params | self._consumer_params
        )
        if unknown:
            raise ConfigurationError(
                f"KafkaConfig.extra keys {unknown} mean nothing to aiokafka's producer or consumer"
            )

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        settings: dict[str, Any] = {
            "enable_idempotence": True,
            "acks": "all",
            "linger_ms": 5,
        }
        if transactional_id is not None:
            settings["transactional_id"] = transactional_id
            settings["transaction_timeout_ms"] = self._config.transaction_timeout_ms
        kwargs = self._config.to_aiokafka_kwargs(settings, accepted=self._producer_params)
        return AioProducer(kwargs, transactional_id)

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str | None,
        listener: RebalanceListener | None = None,
        start: StartFrom = "earliest",
        pauses: bool = True,
    ) -> Consumer:
        config = self._config
        settings: dict[str, Any] = {
            "group_id": group_id,
            "enable_auto_commit": False,
            "isolation_level": "read_committed",
            "auto_offset_reset": start,
            "session_timeout_ms": config.session_timeout_ms,
            "heartbeat_interval_ms": config.heartbeat_interval_ms,
            "max_poll_interval_ms": config.max_poll_interval_ms,
            "fetch_max_wait_ms": config.fetch_wait_ms(pauses=pauses),
            # As Java does: a member gets max.poll.interval to finish on_revoked and rejoin.
            "rebalance_timeout_ms": config.max_poll_interval_ms,
        }
        kwargs = config.to_aiokafka_kwargs(settings, accepted=self._consumer_params)
        start_timeout = (config.max_poll_interval_ms + config.request_timeout_ms) / 1000
        consumer = AioConsumer(kwargs, tuple(topics), group_id, listener, start, start_timeout)
        consumer.offsets = self._offsets
        return consumer
