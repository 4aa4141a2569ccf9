"""Which view stores the contract suites run against, and how each is built.

PostgreSQL cases need the server the test command starts (``QTASKS_TEST_POSTGRES_DSN``);
each store gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from qtasks_stream.views.base import ViewStore
from qtasks_stream.views.memory import MemoryViewStore
from qtasks_stream.views.sqlite import SqliteViewStore

VIEW_KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres"),
]
#: The stores whose contents outlive the process (files, schemas).
DURABLE_VIEW_KINDS = [kind for kind in VIEW_KINDS if kind.values[0] != "memory"]


class ViewFactory:
    """Builds started stores of one kind and closes (and drops) them all at the end."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self._tmp_path = tmp_path
        self._dsn = request.getfixturevalue("postgres_dsn") if kind == "postgres" else ""
        self._opened: list[ViewStore] = []
        self._where: dict[int, str] = {}  # id(store) -> its file or schema

    async def fresh(self) -> ViewStore:
        """A new, empty store."""
        return await self._open(self.new_name())

    @staticmethod
    def new_name() -> str:
        """A name for :meth:`named` no store has yet."""
        return f"v{uuid.uuid4().hex[:12]}"

    def sqlite_path(self, name: str) -> Path:
        """The file of the SQLite store ``name``."""
        return self._tmp_path / f"{name}.sqlite"

    @property
    def dsn(self) -> str:
        return self._dsn

    async def named(self, name: str) -> ViewStore:
        """The store ``name`` (its SQLite file or PostgreSQL schema), opened, whatever it holds."""
        return await self._open(name)

    async def handle(self, store: ViewStore) -> ViewStore:
        """A second handle on ``store``'s data (as a second projector process would have);
        the in-memory store can only share itself."""
        if self.kind == "memory":
            return store
        return await self._open(self._where[id(store)])

    async def _open(self, name: str) -> ViewStore:
        store: ViewStore
        if self.kind == "memory":
            store = MemoryViewStore()
        elif self.kind == "sqlite":
            store = SqliteViewStore(self.sqlite_path(name))
        else:
            from qtasks_stream.views.postgres import PostgresViewStore

            store = PostgresViewStore(self._dsn, schema=name, pool_size=2)
        await store.start()
        self._opened.append(store)
        self._where[id(store)] = name
        return store

    async def close(self) -> None:
        for store in reversed(self._opened):
            await store.close()  # a second close is a no-op (an app may have closed it)
        if self.kind == "postgres":
            from qtasks_stream.views.postgres import PostgresViewStore

            for name in {self._where[id(store)] for store in self._opened}:
                dropper = PostgresViewStore(self._dsn, schema=name, pool_size=1)
                await dropper.start()
                try:
                    await dropper.drop()
                finally:
                    await dropper.close()
