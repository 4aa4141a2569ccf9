"""The console's API on the real broker and schema registry: submit, read, history, cancel,
and refusals that leave every topic's end where it was."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from tests.apps import console_app as tasks
from tests.console.conftest import BEARER, LIMIT, Console, attach, log_ends
from tests.e2ehelpers import eventually
from tests.eventlogs import kafka_test_config

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


@pytest.fixture
async def console(kafka_bootstrap: str, schema_registry_url: str) -> AsyncIterator[Console]:
    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as registry:
        log = ConfluentEventLog(kafka_test_config(kafka_bootstrap))
        app = tasks.build(
            "ck",
            event_log=log,
            schema_registry=registry,
            topic_prefix=f"ck{uuid.uuid4().hex[:8]}.",
            partitions=2,
            poll_timeout=0.1,
        )
        made = attach(app)
        try:
            await app.start()
            yield made
        finally:
            await made.client.aclose()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(LIMIT * 3):
                    await app.close()
            async with asyncio.timeout(LIMIT):
                await log.close()


async def test_the_api_on_kafka(console: Console) -> None:
    client = console.client
    response = await client.post(
        "/api/tasks/add",
        json={"args": [40, 2]},
        headers={**BEARER, "Idempotency-Key": "kafka-1"},
    )
    assert response.status_code == 202, response.text
    task_id = response.json()["id"]
    assert (await console.ended(task_id)).returning == 42
    got = (await client.get(f"/api/tasks/{task_id}", headers=BEARER)).json()
    assert got["status"] == "success" and got["result"] == 42
    history = (await client.get(f"/api/tasks/{task_id}/history", headers=BEARER)).json()
    kinds = [e["kind"] for a in history["attempts"] for e in a["events"]]
    assert kinds == ["Submitted", "Scheduled", "Started", "Succeeded"]
    # The list is the view's, which the projector fills beside the task's run: it may lag
    # the end a wait (read from the log) already saw.
    listed = await eventually(
        lambda: client.get("/api/tasks", params={"name": "add"}, headers=BEARER),
        lambda r: bool(r.json()["tasks"]),
        what="the view lists the task",
        limit=LIMIT,
    )
    assert [t["id"] for t in listed.json()["tasks"]] == [task_id]

    sleeper = (await client.post("/api/tasks/sleepy", json={"args": [60]}, headers=BEARER)).json()[
        "id"
    ]
    await console.status(sleeper, "process")
    cancel = await client.post(f"/api/tasks/{sleeper}/cancel", json={}, headers=BEARER)
    assert cancel.status_code == 202
    assert (await console.ended(sleeper)).status == "cancel"

    before = await console.settled()
    for path, content, status in [
        ("/api/tasks/nosuch", b"{}", 404),
        ("/api/tasks/add", b"{not json", 400),
        ("/api/tasks/add", b'{"args": ["' + b"x" * (2 << 20) + b'"]}', 413),
    ]:
        refused = await client.post(path, content=content, headers=BEARER)
        assert refused.status_code == status and refused.json()["error"], refused.text
    assert (await client.post("/api/tasks/add", json={"args": [1, 2]})).status_code == 401
    await asyncio.sleep(0.5)
    assert await log_ends(console.app) == before
    letters = (await client.get("/api/dead-letters", headers=BEARER)).json()
    assert letters["letters"] == []
