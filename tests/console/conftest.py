"""Fixtures of the console tests: an app on the embedded default with its console, reached
through httpx's ASGI transport (no socket), and what the log's ends are."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from qtasks_stream import QueueTasks
from qtasks_stream.console.server import SESSION_COOKIE, console_app
from qtasks_stream.console.settings import ConsoleSettings
from qtasks_stream.records import TopicPartition
from qtasks_stream.state import Task
from tests.apps import console_app as tasks
from tests.e2ehelpers import eventually

TOKEN = "console-test-token-0123456789"
BEARER = {"authorization": f"Bearer {TOKEN}"}
LIMIT = 10.0


async def log_ends(app: QueueTasks) -> dict[TopicPartition, int]:
    """The end offset of every partition of every topic of ``app``."""
    specs = app.topology.specs()
    consumer = app.event_log.consumer([s.name for s in specs], group_id=None)
    await consumer.start()
    try:
        return await consumer.end_offsets(
            [TopicPartition(s.name, p) for s in specs for p in range(s.partitions)]
        )
    finally:
        await consumer.close()


@dataclass
class Console:
    app: QueueTasks
    settings: ConsoleSettings
    transport: httpx.ASGITransport
    client: httpx.AsyncClient
    extra: list[httpx.AsyncClient] = field(default_factory=list)

    async def submit(self, name: str, *args: Any, **options: Any) -> str:
        task = await self.app.add_task(name, *args, **options)
        assert task is not None
        return task.uuid

    async def ended(self, task_id: str) -> Task:
        task = await eventually(
            lambda: self.app.get(task_id),
            lambda t: t is not None and t.final,
            what=f"task {task_id} ended",
            limit=LIMIT,
        )
        assert task is not None
        return task

    async def status(self, task_id: str, status: str) -> Task:
        task = await eventually(
            lambda: self.app.get(task_id),
            lambda t: t is not None and t.status == status,
            what=f"task {task_id} is {status}",
            limit=LIMIT,
        )
        assert task is not None
        return task

    async def settled(self) -> dict[TopicPartition, int]:
        """The log's ends once they stopped moving (every stage caught up)."""
        previous = await log_ends(self.app)
        while True:
            await asyncio.sleep(0.2)
            now = await log_ends(self.app)
            if now == previous:
                return now
            previous = now

    def signed_in(self) -> httpx.AsyncClient:
        """A second client holding the session cookie a browser gets from /login."""
        client = httpx.AsyncClient(
            transport=self.transport,
            base_url="http://console.test",
            cookies={SESSION_COOKIE: _session(self)},
        )
        self.extra.append(client)
        return client


def _session(console: Console) -> str:
    from qtasks_stream.console.server import Console as Routes

    return Routes(console.app, console.settings).session


@asynccontextmanager
async def serving(console: Console) -> AsyncIterator[str]:
    """The console served by uvicorn on a free port of 127.0.0.1, in this event loop (the
    embedded app lives in it); yields its base URL."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            console_app(console.app, console.settings),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(
            lambda: server.started or serving.done(), what="the server started", limit=LIMIT
        )
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(LIMIT):
            await serving


MakeConsole = Callable[..., Awaitable[Console]]


def attach(app: QueueTasks, **settings: Any) -> Console:
    """``app``'s console with the test token, reached through the ASGI transport."""
    config = ConsoleSettings(TOKEN, **settings)
    transport = httpx.ASGITransport(app=console_app(app, config))
    client = httpx.AsyncClient(transport=transport, base_url="http://console.test")
    return Console(app, config, transport, client)


@pytest.fixture
async def make_console() -> AsyncIterator[MakeConsole]:
    made: list[Console] = []

    async def make(
        *, unreadable_submits: bool = False, start: bool = True, **settings: Any
    ) -> Console:
        app = tasks.build()
        if unreadable_submits:
            tasks.with_unreadable_submits(app)
        if start:
            await app.start()
        made.append(attach(app, **settings))
        return made[-1]

    yield make
    tasks.BROKEN.clear()
    for console in made:
        for client in [console.client, *console.extra]:
            await client.aclose()
        async with asyncio.timeout(LIMIT):
            await console.app.close()


@pytest.fixture
async def console(make_console: MakeConsole) -> Console:
    return await make_console()
