"""Task parameters that ``add_task`` options would shadow are refused when the task is declared."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from qtasks_stream import QueueTasks
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.tasks import SUBMIT_OPTIONS, Router


def test_submit_options_are_the_names_add_task_takes() -> None:
    signature = inspect.signature(QueueTasks.add_task).parameters.values()
    taken = {p.name for p in signature if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    assert taken - {"self"} == SUBMIT_OPTIONS


@pytest.mark.parametrize("owner", ["app", "router"])
def test_a_parameter_named_like_an_add_task_option_is_refused(owner: str) -> None:
    registrar = QueueTasks("shadow", event_log=InMemoryEventLog()) if owner == "app" else Router()

    async def fetch(url: str, timeout: float = 30, *, tags: Any = None) -> str:
        return url

    with pytest.raises(ConfigurationError) as caught:
        registrar.task(fetch)
    message = str(caught.value)
    assert "'fetch'" in message and "tags, timeout" in message
    assert "Rename them" in message and "positional-only" in message


def test_every_submit_option_is_refused_as_a_parameter_name() -> None:
    router = Router()
    for option in sorted(SUBMIT_OPTIONS):
        namespace: dict[str, Any] = {}
        exec(f"def job(x, {option}=None):\n    return x", namespace)
        with pytest.raises(ConfigurationError, match=option):
            router.task(name=f"job_{option}")(namespace["job"])


async def test_positional_only_parameters_may_share_the_names_and_arrive_by_position() -> None:
    app = QueueTasks("shadow-ok", event_log=InMemoryEventLog())

    @app.task
    async def fetch(url: str, timeout: float = 30, /) -> float:
        return timeout

    async with app:
        done = await fetch.add_task("http://x", 5, timeout=10)
    assert done is not None and done.status == "success" and done.returning == 5
