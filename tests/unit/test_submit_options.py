"""What ``add_task`` refuses before anything is written."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from qtasks_stream import QueueTasks, Router
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.memory import InMemoryEventLog

DAY_MS = 86_400_000


@pytest.fixture
async def app() -> AsyncIterator[QueueTasks]:
    app = QueueTasks("opts", event_log=InMemoryEventLog(), retention_ms=DAY_MS)

    @app.task(name="job")
    async def job() -> None:
        return None

    yield app
    await app.close()


@pytest.mark.parametrize(
    "when",
    [{"countdown": 2 * 86_400.0}, {"eta": datetime.now(UTC) + timedelta(days=1)}],
    ids=["countdown", "eta"],
)
async def test_a_start_beyond_the_events_retention_is_refused(
    app: QueueTasks, when: dict[str, Any]
) -> None:
    """The Submitted event holds the arguments: deleted before the start, the task could
    not run. Within a day less the margin (a tenth of a short retention) it is accepted."""
    with pytest.raises(ConfigurationError, match=r"events retention of 1\.00 days"):
        await app.add_task("job", **when)
    assert isinstance(app.event_log, InMemoryEventLog)
    assert app.event_log.records(app.topology.events) == []

    task = await app.add_task("job", countdown=0.85 * 86_400)
    assert task is not None and task.status == "new"
    assert len(app.event_log.records(app.topology.events)) == 1


async def test_events_kept_forever_allow_any_start() -> None:
    app = QueueTasks("opts", event_log=InMemoryEventLog(), retention_ms=-1)

    @app.task(name="job")
    async def job() -> None:
        return None

    try:
        task = await app.add_task("job", countdown=365 * 86_400.0)
        assert task is not None and task.status == "new"
    finally:
        await app.close()


@pytest.mark.parametrize("retention_ms", [0, -2])
def test_a_retention_that_is_neither_positive_nor_forever_is_refused(retention_ms: int) -> None:
    with pytest.raises(ConfigurationError, match="retention_ms must be > 0, or -1"):
        QueueTasks("opts", retention_ms=retention_ms)


@pytest.mark.parametrize("priority", [3, -1])
async def test_a_priority_outside_the_lanes_is_refused(app: QueueTasks, priority: int) -> None:
    """Mapped onto the last lane it would run in arbitrary order with that lane's work."""
    with pytest.raises(ConfigurationError, match=r"outside the lanes of app 'opts': 0\.\.2"):
        await app.add_task("job", priority=priority)
    assert isinstance(app.event_log, InMemoryEventLog)
    assert app.event_log.records(app.topology.events) == []
    task = await app.add_task("job", priority=2)
    assert task is not None and task.priority == 2


def test_a_task_declared_with_a_priority_outside_the_lanes_is_refused() -> None:
    app = QueueTasks("opts", lanes=2)
    with pytest.raises(ConfigurationError, match=r"priority 2 of task 'late'.*0\.\.1"):

        @app.task(name="late", priority=2)
        async def late() -> None:
            return None

    router = Router()

    @router.task(name="routed", priority=5)
    async def routed() -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"priority 5 of task 'routed'"):
        app.include_router(router)
    assert "routed" not in app.definitions and "late" not in app.definitions
