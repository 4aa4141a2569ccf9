"""A persistent view whose events topic was deleted and recreated is refused at start
(confluent-kafka log): the check of tests/e2e/test_view_reset.py on the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.errors import StaleViewError
from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from qtasks_stream.views.url import open_view
from tests.contract.test_lifecycle import KAFKA_LIMIT as LIMIT
from tests.contract.test_lifecycle import eventually
from tests.eventlogs import kafka_test_config

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


def delete_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=30)
    deadline = time.monotonic() + 30
    while topic in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, f"{topic} still listed 30 s after its deletion"
        time.sleep(0.2)


async def test_a_view_of_a_deleted_and_recreated_topic_is_refused(
    kafka_bootstrap: str, schema_registry_url: str, tmp_path: Path
) -> None:
    prefix = f"vr{uuid.uuid4().hex[:8]}."
    url = f"sqlite:///{tmp_path / 'view.db'}"

    def build(registry: SchemaRegistryClient) -> tuple[QueueTasks, ConfluentEventLog]:
        log = ConfluentEventLog(kafka_test_config(kafka_bootstrap))
        app = QueueTasks(
            "vr",
            event_log=log,
            schema_registry=registry,
            topic_prefix=prefix,
            view=open_view(url),
            poll_timeout=0.1,
        )

        @app.task(name="double")
        async def double(x: int) -> int:
            return 2 * x

        return app, log

    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as registry:
        first, log = build(registry)
        try:
            async with first:
                for i in range(10):
                    done = await first.add_task("double", i, timeout=LIMIT)
                    assert done is not None and done.status == "success"

                async def in_view() -> int:
                    return sum((await first.counts()).values())

                await eventually(in_view, lambda n: n == 10, what="10 tasks in the view")
        finally:
            await log.close()
        topic = first.topology.events
        await asyncio.to_thread(delete_topic, kafka_bootstrap, topic)

        second, log = build(registry)
        try:
            with pytest.raises(StaleViewError) as caught:
                async with asyncio.timeout(LIMIT):
                    await second.start()
            assert topic in str(caught.value) and url in str(caught.value)
        finally:
            with contextlib.suppress(Exception):
                await second.close()
            await log.close()
