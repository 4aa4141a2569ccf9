"""The event log on Apache Kafka through confluent-kafka (librdkafka).

librdkafka calls block, so each client gets a thread of its own:

* a producer runs every blocking call (produce + flush, the transaction calls) on a
  single-thread executor, so transactions of one producer never overlap. Plain sends that
  arrive while one is being written wait and go together in the next batch, flushed once:
  a flush per call would serialize concurrent callers on that thread;
* a consumer runs one thread that loops ``consume()`` and buffers what it gets; each round
  waits at most a short slice for the first message and takes what else is ready. As with
  aiokafka, membership and fetching thus go on while the stage is busy between polls: a
  member started second does not wait for the first one to poll before the group settles.
  ``poll()`` only drains the buffer.

confluent-kafka serializes the calls on a consumer: any call from another thread waits for
the running ``consume()`` and starves behind a loop of them. So *every* consumer call
(commit, committed, seek, pause) runs on the consumer thread between two ``consume()``
calls, as a command or from state it reads. The group metadata a transaction needs is
cached by that thread, renewed with every assignment change and every round, so a
transaction does not wait for a round to end.

Rebalance callbacks fire inside ``consume()`` on that thread. They hand the listener's
coroutine to the event loop and, while waiting for it, keep running commands: a listener that
commits (directly, or through a transaction) is served from inside the callback, which
librdkafka allows, instead of deadlocking.

This module holds the event log (the clients' settings); the clients are in
:mod:`.kafka_confluent_producer`, :mod:`.kafka_confluent_consumer` (the event loop's side)
and :mod:`.kafka_confluent_thread` (the consumer thread), the conversions between
confluent-kafka's types and ours in :mod:`.kafka_confluent_convert`, and what they share
with the aiokafka log in :mod:`.kafka_common`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from qtasks_stream.eventlog.base import Consumer, Producer, RebalanceListener, StartFrom
from qtasks_stream.eventlog.kafka_admin import with_rdkafka_logger
from qtasks_stream.eventlog.kafka_common import KafkaEventLog
from qtasks_stream.eventlog.kafka_config import UNMANAGED_GROUP_PREFIX, ConfValue
from qtasks_stream.eventlog.kafka_confluent_consumer import ConfluentConsumer
from qtasks_stream.eventlog.kafka_confluent_producer import ConfluentProducer

__all__ = ["ConfluentEventLog"]


class ConfluentEventLog(KafkaEventLog):
    """Kafka through confluent-kafka. Creating it does no I/O; clients connect in ``start()``."""

    def producer(self, *, transactional_id: str | None = None) -> Producer:
        config = self._config
        settings: dict[str, ConfValue] = {
            "enable.idempotence": True,
            "acks": "all",
            # Java's (and aiokafka's and the in-memory log's) key hashing, so a key lands on
            # the same partition whichever client wrote it.
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            # A missing topic is an error to report, not one to create with defaults.
            "allow.auto.create.topics": False,
            "message.timeout.ms": config.request_timeout_ms * 2,
            "request.timeout.ms": config.request_timeout_ms,
            "topic.metadata.refresh.interval.ms": config.metadata_max_age_ms,
        }
        if transactional_id is not None:
            settings["transactional.id"] = transactional_id
            settings["transaction.timeout.ms"] = config.transaction_timeout_ms
            # A transaction begun right after the last commit finds the coordinator still
            # writing that one's markers (CONCURRENT_TRANSACTIONS), and waits this long
            # before asking again: 100 ms by default, behind one hop in four when idle
            # (p90 of an idle task 89-119 -> 43-46 ms). The Java client waits 20 ms there.
            settings["retry.backoff.ms"] = 10
            # librdkafka refuses a transactional producer whose messages may outlive it.
            settings["message.timeout.ms"] = min(
                config.request_timeout_ms * 2, config.transaction_timeout_ms
            )
        return ConfluentProducer(
            with_rdkafka_logger(config.to_librdkafka(settings)),
            transactional_id,
            config.request_timeout_ms / 1000,
        )

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
        settings: dict[str, ConfValue] = {
            # librdkafka insists on a group id; a consumer without a group only assign()s
            # and never commits, so a private one is never joined.
            "group.id": group_id or f"{UNMANAGED_GROUP_PREFIX}{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": start,
            "allow.auto.create.topics": False,
            "session.timeout.ms": config.session_timeout_ms,
            "heartbeat.interval.ms": config.heartbeat_interval_ms,
            "max.poll.interval.ms": config.max_poll_interval_ms,
            # A group member's pause holds records back in its buffer and leaves librdkafka
            # fetching (ConsumerThread._held_back): only a reader without a group resumes a
            # partition behind the fetch in flight.
            "fetch.wait.max.ms": config.fetch_wait_ms(pauses=pauses and group_id is None),
            "topic.metadata.refresh.interval.ms": config.metadata_max_age_ms,
            # librdkafka prefetches up to 64 MiB per client by default; the buffer here
            # already holds a few thousand records per partition.
            "queued.max.messages.kbytes": 16_384,
        }
        consumer = ConfluentConsumer(
            with_rdkafka_logger(config.to_librdkafka(settings)),
            tuple(topics),
            group_id,
            listener,
            start,
            timeout=config.request_timeout_ms / 1000,
            start_timeout=(config.max_poll_interval_ms + config.request_timeout_ms) / 1000,
        )
        consumer.offsets = self._offsets
        return consumer
