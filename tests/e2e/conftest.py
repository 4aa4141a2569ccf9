"""Fixtures of the embedded-default tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from qtasks_stream import QueueTasks

#: Bound on closing one app; the tests' own waits have their own limits.
CLOSE_LIMIT = 5.0


@pytest.fixture
async def make_app() -> AsyncIterator[Callable[..., QueueTasks]]:
    """Builds apps (``make_app(name, **options)``) and closes them after the test."""
    apps: list[QueueTasks] = []

    def make(name: str = "e2e", **options: Any) -> QueueTasks:
        app = QueueTasks(name, **options)
        apps.append(app)
        return app

    yield make
    for app in apps:
        async with asyncio.timeout(CLOSE_LIMIT):
            await app.close()
