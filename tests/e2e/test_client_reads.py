"""What a client reads, on the embedded log: ``get`` in a process that runs no stage, read-your-
writes, idempotent repeats, ``wait`` after ``resubmit`` and ``stream`` of an ended task."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.errors import ConfigurationError, TaskNotFoundError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import Submitted
from qtasks_stream.ops.rerun import ResubmitFilter
from qtasks_stream.views.base import Applied
from qtasks_stream.views.memory import MemoryViewStore
from tests import e2ehelpers

LIMIT = 5.0
pytestmark = pytest.mark.timeout(60)


async def eventually(probe: Any, ok: Any = bool, *, what: str) -> Any:
    return await e2ehelpers.eventually(probe, ok, what=what, limit=LIMIT)


def _double(app: QueueTasks) -> None:
    @app.task(name="double")
    async def double(n: int) -> int:
        return n * 2


@pytest.fixture
def pair(
    make_app: Callable[..., QueueTasks],
) -> Callable[[], tuple[QueueTasks, QueueTasks]]:
    """A server (every stage) and a client (no stage) on one log and registry."""

    def build() -> tuple[QueueTasks, QueueTasks]:
        log = InMemoryEventLog()
        registry = SchemaRegistryClient.new_client({"url": f"mock://rw-{uuid.uuid4().hex}"})
        server = make_app("rw", event_log=log, schema_registry=registry, poll_timeout=0.05)
        client = make_app("rw", event_log=log, schema_registry=registry)
        _double(server)
        _double(client)
        return server, client

    return build


async def test_a_client_that_runs_no_stage_gets_tasks_from_the_log(
    pair: Callable[[], tuple[QueueTasks, QueueTasks]],
) -> None:
    server, client = pair()
    await server.start()
    submitted = await client.add_task("double", 21)
    assert submitted is not None
    # Polled, no wait(): the client's view is fed by no projector, so get() reads the log.
    task = await eventually(
        lambda: client.get(submitted.uuid),
        lambda t: t is not None and t.status == "success",
        what="the client sees the success",
    )
    assert (task.returning, task.args) == (42, [21])
    assert client.runners == {}
    assert await client.get(str(uuid.uuid4())) is None  # unknown: the log has no event of it


async def test_query_and_counts_without_a_shared_view_say_what_they_need(
    pair: Callable[[], tuple[QueueTasks, QueueTasks]],
) -> None:
    server, client = pair()
    await server.start()
    done = await client.add_task("double", 1, timeout=LIMIT)
    assert done is not None and done.status == "success"
    for call in (client.query(status="success"), client.page(), client.counts()):
        with pytest.raises(ConfigurationError, match=r"needs a shared view.*QTASKS_VIEW_URL"):
            await call
    # The server's in-memory view is fed by its projector: shared, in this process.
    await eventually(lambda: server.query(status="success"), what="the server's view")


class LaggingView(MemoryViewStore):
    """A view whose projector got only as far as the submissions."""

    async def apply(self, batch: Sequence[Applied]) -> int:
        return await super().apply([a for a in batch if isinstance(a.event.payload, Submitted)])


async def test_get_after_a_wait_returns_at_least_what_the_wait_returned(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app("ryw", view=LaggingView(), poll_timeout=0.05)
    _double(app)
    await app.start()
    done = await app.add_task("double", 4, timeout=LIMIT)
    assert done is not None and done.status == "success"
    await eventually(lambda: app.view.get(done.uuid), what="the view has the submission")
    task = await app.get(done.uuid)
    assert task is not None and (task.status, task.returning) == ("success", 8)

    waited = await app.add_task("double", 5)
    assert waited is not None
    outcome = await app.wait(waited.uuid, timeout=LIMIT)
    assert outcome is not None and outcome.status == "success"
    task = await app.get(waited.uuid)
    assert task is not None and task.status == "success"


async def test_an_idempotent_repeat_with_a_wait_returns_the_first_task(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app("idem", poll_timeout=0.05)
    _double(app)
    await app.start()
    first = await app.add_task("double", 10, idempotency_key="k1", timeout=LIMIT)
    assert first is not None and (first.status, first.returning) == ("success", 20)
    # The same key with other arguments: the first task, not a new one, and no wait in vain.
    again = await app.add_task("double", 1, idempotency_key="k1", timeout=LIMIT)
    assert again is not None
    assert (again.uuid, again.status, again.args, again.returning) == (
        first.uuid,
        "success",
        [10],
        20,
    )


async def test_an_idempotent_repeat_in_a_client_returns_the_first_arguments(
    pair: Callable[[], tuple[QueueTasks, QueueTasks]],
) -> None:
    server, client = pair()
    await server.start()
    first = await client.add_task("double", 10, idempotency_key="k2", timeout=LIMIT)
    assert first is not None and first.status == "success"
    again = await client.add_task("double", 3, idempotency_key="k2")
    assert again is not None
    assert (again.uuid, again.status, again.args) == (first.uuid, "success", [10])


def _flaky_app(make_app: Callable[..., QueueTasks], name: str) -> tuple[QueueTasks, list[bool]]:
    """An app whose task ``flaky`` fails while ``broken[0]`` is true, then returns "up"."""
    app = make_app(name, poll_timeout=0.05)
    broken = [True]

    @app.task
    async def flaky() -> str:
        if broken[0]:
            raise RuntimeError("down")
        return "up"

    return app, broken


async def test_wait_right_after_resubmit_waits_for_the_new_attempt(
    make_app: Callable[..., QueueTasks],
) -> None:
    app, broken = _flaky_app(make_app, "resub")
    await app.start()
    failed = await app.add_task("flaky", timeout=LIMIT)
    assert failed is not None and failed.status == "error"
    # The view shows the error: a wait that trusted it would return that at once.
    await eventually(
        lambda: app.view.get(failed.uuid),
        lambda t: t is not None and t.status == "error",
        what="the view shows the error",
    )
    broken[0] = False
    [resubmitted] = await app.resubmit(ResubmitFilter(task_ids=frozenset({failed.uuid})))
    assert resubmitted.event is not None
    outcome = await app.wait(failed.uuid, timeout=LIMIT)
    assert outcome is not None and (outcome.status, outcome.returning) == ("success", "up")
    assert outcome.attempt == 2


async def test_a_wait_on_a_task_submitted_while_listening_reads_no_log(
    pair: Callable[[], tuple[QueueTasks, QueueTasks]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, client = pair()
    await server.start()
    first = await client.add_task("double", 1)
    assert first is not None
    assert (await client.wait(first.uuid, timeout=LIMIT)) is not None  # the client listens now
    reads: list[list[str]] = []
    histories = client._histories  # every read of task histories from the log goes here

    async def histories_read(uuids: Sequence[str], **options: Any) -> Any:
        reads.append(list(uuids))
        return await histories(uuids, **options)

    monkeypatch.setattr(client, "_histories", histories_read)
    submitted = [await client.add_task("double", n) for n in range(10)]
    ended = [await client.wait(t.uuid, timeout=LIMIT) for t in submitted if t is not None]
    assert [(t.status, t.args, t.returning) for t in ended if t is not None] == [
        ("success", [n], 2 * n) for n in range(10)
    ]
    assert reads == []  # the listener followed them from their submit
    # A task submitted elsewhere is read from the log, as before.
    other = await server.add_task("double", 5)
    assert other is not None
    done = await client.wait(other.uuid, timeout=LIMIT)
    assert done is not None and (done.args, done.returning) == ([5], 10)
    assert reads == [[other.uuid]]


async def test_wait_after_resubmit_of_a_task_submitted_while_listening_waits_for_it(
    make_app: Callable[..., QueueTasks],
) -> None:
    app, broken = _flaky_app(make_app, "resub-own")
    await app.start()
    assert await app.add_task("flaky", timeout=LIMIT) is not None  # the client listens now
    submitted = await app.add_task("flaky")
    assert submitted is not None
    failed = await app.wait(submitted.uuid, timeout=LIMIT)
    assert failed is not None and failed.status == "error"
    broken[0] = False
    [resubmitted] = await app.resubmit(ResubmitFilter(task_ids=frozenset({submitted.uuid})))
    assert resubmitted.event is not None
    outcome = await app.wait(submitted.uuid, timeout=LIMIT)
    assert outcome is not None and (outcome.status, outcome.attempt) == ("success", 2)


async def test_stream_of_an_ended_task_yields_its_items_then_ends(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app("streams", poll_timeout=0.05)
    gate = asyncio.Event()

    @app.task
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @app.task
    async def stuck() -> AsyncIterator[int]:
        yield 7
        await gate.wait()

    await app.start()
    done = await app.add_task("count", 3, timeout=LIMIT)
    assert done is not None and done.status == "success"
    async with asyncio.timeout(LIMIT):
        assert [item async for item in app.stream(done.uuid, timeout=LIMIT)] == [0, 1, 2]
        with pytest.raises(TaskNotFoundError, match="no events for task"):
            async for _ in app.stream(str(uuid.uuid4())):
                pass
        running = await app.add_task("stuck")
        assert running is not None
        items: list[int] = []
        with pytest.raises(TimeoutError, match=r"did not end within 0\.5s"):
            async for item in app.stream(running.uuid, timeout=0.5):
                items.append(item)
        assert items == [7]
        gate.set()
        assert [i async for i in app.stream(running.uuid, timeout=LIMIT)] == [7]


CLIENT_ONLY = """
import asyncio, sys
from qtasks_stream import QueueTasks

app = QueueTasks("solo")

@app.task
async def f() -> None:
    pass

async def main() -> None:
    submitted = await app.add_task("f")
    got = await app.get(submitted.uuid)
    # Due now: its client wrote it into its lane (Scheduled) with the Submitted.
    assert got is not None and got.status == "scheduled", got
    await app.close()

asyncio.run(main())
stages = ("qtasks_stream.stages", "qtasks_stream.runtime")
print(sorted(m for m in sys.modules if m.startswith(stages)))
"""


def test_a_client_only_process_builds_no_stage_machinery() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
