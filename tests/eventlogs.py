"""Which event logs the contract suites run against, and how each is built."""

from __future__ import annotations

import pytest

from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.eventlog.memory import InMemoryEventLog

EVENT_LOG_KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("aiokafka", id="aiokafka", marks=pytest.mark.kafka),
    pytest.param("confluent", id="confluent", marks=pytest.mark.kafka),
]


def kafka_test_config(bootstrap: str) -> KafkaConfig:
    """A KafkaConfig tuned for a one-broker test cluster on a small machine."""
    return KafkaConfig(
        bootstrap_servers=bootstrap,
        client_id="qtasks-stream-tests",
        # 6 s is the broker's group.min.session.timeout.ms; heartbeats this often make
        # members notice a rebalance quickly.
        session_timeout_ms=6_000,
        heartbeat_interval_ms=300,
        max_poll_interval_ms=30_000,
        metadata_max_age_ms=5_000,
        request_timeout_ms=15_000,
        transaction_timeout_ms=30_000,
    )


def make_event_log(request: pytest.FixtureRequest) -> EventLog:
    kind = request.param
    if kind == "memory":
        return InMemoryEventLog()
    if kind in ("aiokafka", "confluent"):
        config = kafka_test_config(request.getfixturevalue("kafka_bootstrap"))
        if kind == "aiokafka":
            from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog

            return AioKafkaEventLog(config)
        from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog

        return ConfluentEventLog(config)
    raise AssertionError(f"unknown event log kind {kind}")
