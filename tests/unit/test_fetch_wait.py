"""Which consumers may let the broker hold an empty fetch long: those that never pause,
and confluent-kafka's group members, which pause in their own buffer.

A partition resumed after a pause in the client is fetched only when the fetch in flight
returns, so aiokafka's worker lanes and readers without a group keep the short wait; every
other consumer takes the long one (it returns as soon as data arrives) and an idle process
wakes less.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from qtasks_stream import QueueTasks
from qtasks_stream.eventlog.base import Consumer, RebalanceListener, StartFrom
from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from qtasks_stream.eventlog.memory import InMemoryEventLog


class _RecordingLog(InMemoryEventLog):
    def __init__(self) -> None:
        super().__init__()
        #: (topics, group id, pauses) of every consumer asked for.
        self.asked: list[tuple[tuple[str, ...], str | None, bool]] = []

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str | None,
        listener: RebalanceListener | None = None,
        start: StartFrom = "earliest",
        pauses: bool = True,
    ) -> Consumer:
        self.asked.append((tuple(topics), group_id, pauses))
        return super().consumer(
            topics, group_id=group_id, listener=listener, start=start, pauses=pauses
        )


async def test_only_the_worker_lanes_consumer_may_pause() -> None:
    log = _RecordingLog()
    app = QueueTasks("fw", event_log=log)

    @app.task(name="job")
    async def job() -> int:
        return 1

    try:
        await app.start()
        done = await app.add_task("job", timeout=10)
        assert done is not None and done.status == "success"
    finally:
        await app.close()
    topology = app.topology
    groups = {group: pauses for _, group, pauses in log.asked if group is not None}
    assert groups.pop(topology.group("worker")) is True
    # Every other stage: projector, scheduler, workflow, schedules, trigger, dead letters.
    assert len(groups) >= 5 and set(groups.values()) == {False}, groups
    # The worker's control listener and the client's result listener (of the events).
    assert ((topology.control,), None, False) in log.asked
    assert ((topology.events,), None, False) in log.asked


@pytest.mark.parametrize("pauses", [True, False])
def test_the_kafka_logs_give_a_consumer_that_never_pauses_the_long_fetch_wait(
    pauses: bool,
) -> None:
    config = KafkaConfig("127.0.0.1:9", fetch_max_wait_ms=40, long_fetch_max_wait_ms=700)
    wanted = 40 if pauses else 700
    reader = ConfluentEventLog(config).consumer(["t"], group_id=None, pauses=pauses)
    assert reader._conf["fetch.wait.max.ms"] == wanted  # type: ignore[attr-defined]
    aio = AioKafkaEventLog(config).consumer(["t"], group_id="g", pauses=pauses)
    assert aio._kwargs["fetch_max_wait_ms"] == wanted  # type: ignore[attr-defined]


@pytest.mark.parametrize("pauses", [True, False])
def test_a_confluent_group_member_always_gets_the_long_fetch_wait(pauses: bool) -> None:
    """Its pause holds records back in its buffer while librdkafka keeps fetching them, so
    a lane resumed does not wait for the fetch in flight (an idle worker's lane consumer
    woke 20 times a second on the short wait)."""
    config = KafkaConfig("127.0.0.1:9", fetch_max_wait_ms=40, long_fetch_max_wait_ms=700)
    member = ConfluentEventLog(config).consumer(["t"], group_id="g", pauses=pauses)
    assert member._conf["fetch.wait.max.ms"] == 700  # type: ignore[attr-defined]


def test_a_consumer_pauses_unless_it_says_otherwise() -> None:
    """The short wait is the default: a caller that pauses and forgot to say so stays fast."""
    config = KafkaConfig("127.0.0.1:9")
    consumer = ConfluentEventLog(config).consumer(["t"], group_id=None)
    assert consumer._conf["fetch.wait.max.ms"] == config.fetch_max_wait_ms  # type: ignore[attr-defined]
