"""librdkafka's log lines reach Python logging once per window, not once per reconnect."""

from __future__ import annotations

import logging
import socket
import time

import confluent_kafka as ck
import pytest

from qtasks_stream.eventlog.kafka_admin import RdkafkaLog, with_rdkafka_logger


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_repeats_of_one_line_are_held_back_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    log = RdkafkaLog()
    with caplog.at_level(logging.DEBUG, logger="qtasks_stream.rdkafka"):
        for ms in range(50):
            log.log(
                logging.WARNING, "%s [%s] %s", "FAIL", "client-1", f"Connect failed (after {ms}ms)"
            )
        log.log(logging.WARNING, "%s [%s] %s", "GETPID", "client-1", "Failed to get PID")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "FAIL [client-1] Connect failed (after 0ms)",
        "GETPID [client-1] Failed to get PID",
    ]

    log._seen = {
        shape: (when - RdkafkaLog.REPEAT_WINDOW_S, held)
        for shape, (when, held) in log._seen.items()
    }
    with caplog.at_level(logging.DEBUG, logger="qtasks_stream.rdkafka"):
        log.log(logging.WARNING, "%s [%s] %s", "FAIL", "client-1", "Connect failed (after 7ms)")
    assert (
        caplog.records[-1]
        .getMessage()
        .startswith("FAIL [client-1] Connect failed (after 7ms) (49 similar lines in the last")
    )


def test_a_client_without_a_broker_does_not_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    # The transactional client's short retry backoff made librdkafka reconnect, and log a
    # FAIL line, every few milliseconds: about 300 lines in 8 s.
    conf = with_rdkafka_logger(
        {
            "bootstrap.servers": f"127.0.0.1:{_closed_port()}",
            "reconnect.backoff.ms": 20,
            "reconnect.backoff.max.ms": 20,
        }
    )
    producer = ck.Producer(conf)
    with caplog.at_level(logging.DEBUG, logger="qtasks_stream.rdkafka"):
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            producer.poll(0.05)
    fails = [r for r in caplog.records if r.getMessage().startswith("FAIL")]
    assert 1 <= len(fails) <= 2, [r.getMessage() for r in fails]
