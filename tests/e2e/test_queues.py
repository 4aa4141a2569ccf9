"""Named queues and worker pools on the embedded default, and a rolling deploy in which a
worker that lacks a task leaves it to one that has it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import WorkItem
from tests.e2e.test_lifecycle import LIMIT, eventually

NAME = "q"


def shared() -> dict[str, Any]:
    """One log and one registry: the processes of one deployment."""
    return {
        "event_log": InMemoryEventLog(),
        "schema_registry": SchemaRegistryClient.new_client(
            {"url": f"mock://queues-{uuid.uuid4().hex}"}
        ),
    }


def register(app: QueueTasks) -> None:
    @app.task(name="render", queue="gpu")
    async def render(frame: int) -> str:
        return f"frame {frame}"

    @app.task(name="resize")
    async def resize(size: int) -> int:
        return size // 2


def lane_items(app: QueueTasks, topic: str) -> list[WorkItem]:
    log = app.event_log
    assert isinstance(log, InMemoryEventLog)
    return [WorkItem.from_avro(app.serde.decode(topic, r.value or b"")) for r in log.records(topic)]


async def test_tasks_run_in_the_lanes_of_their_queue(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app(NAME)
    register(app)
    topology = app.topology
    assert topology.queues == ("default", "gpu")
    # The default queue's lanes keep their names: existing deployments are unchanged.
    assert topology.queue_lanes("default")[0] == "qtasks.q.lane.0"
    assert topology.queue_lanes("gpu")[0] == "qtasks.q.queue.gpu.lane.0"
    async with app:
        rendered = await app.add_task("render", 1, timeout=LIMIT)
        resized = await app.add_task("resize", 8, timeout=LIMIT)
        moved = await app.add_task("resize", 4, queue="gpu", timeout=LIMIT)
    assert rendered is not None and rendered.status == "success" and rendered.queue == "gpu"
    assert resized is not None and resized.status == "success" and resized.queue == "default"
    assert moved is not None and moved.status == "success" and moved.queue == "gpu"
    gpu = {w.task_id for w in lane_items(app, topology.lane(0, "gpu"))}
    default = {w.task_id for w in lane_items(app, topology.lane(0))}
    assert gpu == {rendered.uuid, moved.uuid} and default == {resized.uuid}


async def test_a_worker_takes_only_the_queues_it_serves(
    make_app: Callable[..., QueueTasks],
) -> None:
    parts = shared()
    web = make_app(NAME, **parts)  # every stage, but its worker serves "default" only
    register(web)
    await web.start(queues=["default"])
    resized = await web.add_task("resize", 8, timeout=LIMIT)
    assert resized is not None and resized.worker_id == f"worker:{web.instance_id}"
    waiting = await web.add_task("render", 2)
    assert waiting is not None
    await eventually(
        lambda: lane_items(web, web.topology.lane(0, "gpu")), what="the render work item"
    )
    assert (await web.wait(waiting.uuid, timeout=0.3)) is None  # no worker serves "gpu"

    gpu = make_app(NAME, **parts)  # a GPU box: a worker of the queue "gpu" only
    register(gpu)
    await gpu.start(["worker"], queues=["gpu"])
    done = await web.wait(waiting.uuid, timeout=LIMIT)
    assert done is not None and done.status == "success"
    assert done.worker_id == f"worker:{gpu.instance_id}"


async def test_unknown_queues_are_refused(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app(NAME)
    register(app)
    with pytest.raises(ConfigurationError, match=r"unknown queue 'cpu'.*default, gpu"):
        await app.add_task("resize", 1, queue="cpu")
    with pytest.raises(ConfigurationError, match=r"unknown queue 'cpu'"):
        await app.start(queues=["cpu"])
    with pytest.raises(ConfigurationError, match="a queue name is a non-empty string"):

        @app.task(name="bad", queue="a queue")
        async def bad() -> None:
            return None

    await app.start()

    with pytest.raises(ConfigurationError, match="names the new queue 'late'"):

        @app.task(name="late", queue="late")
        async def late() -> None:
            return None


async def test_a_worker_lacking_a_task_leaves_it_to_one_that_has_it(
    make_app: Callable[..., QueueTasks],
) -> None:
    """A rolling deploy on one log: the old version of the app runs every stage; the new
    one adds a task and submits it. The old worker puts the item back in its lane (it would
    dead-letter it at once before); once the new worker has the partitions, it runs it."""
    parts = shared()
    old = make_app(NAME, **parts)
    register(old)
    await old.start()

    new = make_app(NAME, **parts)
    register(new)

    @new.task(name="thumbnail")
    async def thumbnail(size: int) -> str:
        return f"{size}px"

    submitted = await new.add_task("thumbnail", 64)
    assert submitted is not None
    lane = new.topology.lane(0)
    put_back = await eventually(
        lambda: [w for w in lane_items(new, lane) if w.task_id == submitted.uuid],
        lambda items: len(items) >= 2,
        what="the old worker put the item back",
    )
    assert put_back[-1].unknown_since_us is not None

    await new.start(["worker"])
    await old.close()  # the old version goes: its partitions move to the new worker
    done = await new.wait(submitted.uuid, timeout=LIMIT)
    assert done is not None and done.status == "success", done
    assert done.returning == "64px" and done.worker_id == f"worker:{new.instance_id}"
