"""Worker pools on the broker (both Kafka event logs): members of one worker group that
subscribe to different queues' lanes each get the partitions of their own queue."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog
from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from tests.contract.test_lifecycle import KAFKA_LIMIT as LIMIT
from tests.eventlogs import kafka_test_config

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


@pytest.mark.parametrize(
    "kind", [ConfluentEventLog, AioKafkaEventLog], ids=["confluent", "aiokafka"]
)
async def test_each_worker_pool_runs_the_tasks_of_its_queue(
    kafka_bootstrap: str, schema_registry_url: str, kind: type[ConfluentEventLog | AioKafkaEventLog]
) -> None:
    prefix = f"qu{uuid.uuid4().hex[:8]}."
    apps: list[QueueTasks] = []
    logs: list[EventLog] = []

    def build(registry: SchemaRegistryClient) -> QueueTasks:
        log = kind(kafka_test_config(kafka_bootstrap))
        app = QueueTasks(
            "qu", event_log=log, schema_registry=registry, topic_prefix=prefix, poll_timeout=0.1
        )

        @app.task(name="render", queue="gpu")
        async def render(frame: int) -> str:
            return f"frame {frame}"

        @app.task(name="resize")
        async def resize(size: int) -> int:
            return size // 2

        apps.append(app)
        logs.append(log)
        return app

    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as registry:
        try:
            web = build(registry)
            await web.start(queues=["default"])
            gpu = build(registry)
            await gpu.start(["worker"], queues=["gpu"])
            rendered, resized = await asyncio.gather(
                web.add_task("render", 1, timeout=LIMIT), web.add_task("resize", 8, timeout=LIMIT)
            )
            assert rendered is not None and rendered.status == "success"
            assert rendered.worker_id == f"worker:{gpu.instance_id}" and rendered.queue == "gpu"
            assert resized is not None and resized.status == "success"
            assert resized.worker_id == f"worker:{web.instance_id}"
        finally:
            for app in apps:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(LIMIT):
                        await app.close()
            for log in logs:
                await log.close()
