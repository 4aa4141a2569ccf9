"""A persistent view that outlives its log: refused by default, rebuilt when asked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from qtasks_stream import QueueTasks
from qtasks_stream.errors import StaleViewError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.views.base import LogReset
from qtasks_stream.views.url import open_view
from tests.e2ehelpers import eventually

WAIT = 10.0


def register(app: QueueTasks) -> None:
    @app.task(name="double")
    async def double(x: int) -> int:
        return 2 * x


async def run_tasks(app: QueueTasks, count: int) -> list[str]:
    """Run ``count`` tasks to success and wait until the view has every one of them."""
    done = [await app.add_task("double", i, timeout=WAIT) for i in range(count)]
    ids = [t.uuid for t in done if t is not None and t.status == "success"]
    assert len(ids) == count

    async def missing() -> list[str]:
        return [i for i in ids if await app.get(i) is None]

    await eventually(missing, lambda left: not left, what="every task in the view", limit=WAIT)
    return ids


def second_app(make_app: Callable[..., QueueTasks], db: Path, on_log_reset: LogReset) -> QueueTasks:
    """The restart: the same view file, a new (empty) embedded log."""
    url = f"sqlite:///{db}"
    app = make_app(
        "vr", event_log=InMemoryEventLog(), view=open_view(url, on_log_reset=on_log_reset)
    )
    register(app)
    return app


@pytest.fixture
async def old_view(make_app: Callable[..., QueueTasks], tmp_path: Path) -> Path:
    db = tmp_path / "view.db"
    app = make_app("vr", event_log=InMemoryEventLog(), view=open_view(f"sqlite:///{db}"))
    register(app)
    async with app:
        await run_tasks(app, 20)
        assert sum((await app.counts()).values()) == 20
    return db


async def test_a_view_past_the_end_of_a_new_log_is_refused_naming_view_topic_and_offsets(
    make_app: Callable[..., QueueTasks], old_view: Path
) -> None:
    app = second_app(make_app, old_view, "refuse")
    with pytest.raises(StaleViewError) as caught:
        await app.start()
    message = str(caught.value)
    assert f"sqlite:///{old_view}" in message
    assert "qtasks.vr.events" in message
    assert "> 0" in message  # a stored position beside the new log's end offset
    assert "on_log_reset='rebuild'" in message
    assert "projector" not in app.runners


async def test_a_view_past_the_end_of_a_new_log_is_rebuilt_when_asked(
    make_app: Callable[..., QueueTasks], old_view: Path
) -> None:
    app = second_app(make_app, old_view, "rebuild")
    await app.start()
    ids = await run_tasks(app, 5)
    assert sum((await app.counts()).values()) == 5
    assert None not in [await app.get(i) for i in ids]
