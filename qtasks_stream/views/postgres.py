"""A view store in PostgreSQL (asyncpg), for deployments: rows and positions in one transaction.

The tables live in one schema (``qtasks_view`` by default, created if missing), so several
apps or test runs can share a database. Several projector processes may share one schema:
each save upserts the positions first, only where they still hold what the fold started from
(``ON CONFLICT ... WHERE``); the row locks it takes serialise two owners of one partition, and
the loser rolls back and folds again.

Task ids sort with the ``C`` collation, as in the other stores, whatever the database's locale.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import asyncpg

from qtasks_stream.errors import ConfigurationError, ViewStoreError
from qtasks_stream.records import TopicPartition
from qtasks_stream.state import TaskState
from qtasks_stream.views.base import PositionsMoved, TaskQuery, ViewStore, queue_of

__all__ = ["DEFAULT_SCHEMA", "PostgresViewStore"]

DEFAULT_SCHEMA = "qtasks_view"

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Foreign errors a call can end with: the server's, the driver's, the network's.
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

_DDL = """
CREATE TABLE IF NOT EXISTS {s}.tasks (
    task_id TEXT COLLATE "C" PRIMARY KEY,
    task_name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_us BIGINT NOT NULL,
    updated_us BIGINT NOT NULL,
    state TEXT NOT NULL,
    queue TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX IF NOT EXISTS tasks_status ON {s}.tasks (status, created_us, task_id);
CREATE INDEX IF NOT EXISTS tasks_name ON {s}.tasks (task_name, created_us, task_id);
CREATE INDEX IF NOT EXISTS tasks_created ON {s}.tasks (created_us, task_id);
CREATE TABLE IF NOT EXISTS {s}.tags (
    task_id TEXT COLLATE "C" NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (tag, task_id)
);
CREATE TABLE IF NOT EXISTS {s}.positions (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""
# A schema made before the queue column: the column is added and filled from each row's state
# (a state without a queue is in the default one); then the index that needs it.
_ADD_QUEUE = """
ALTER TABLE {s}.tasks ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
UPDATE {s}.tasks SET queue = coalesce(state::jsonb ->> 'queue', 'default');
"""
_QUEUE_INDEX = "CREATE INDEX IF NOT EXISTS tasks_queue ON {s}.tasks (queue, created_us, task_id)"


class PostgresViewStore(ViewStore):
    """Args:
    dsn: a libpq-style URL, ``postgresql://user[:password]@host:port/database``.
    schema: the schema that holds the tables (lower-case letters, digits, ``_``).
    pool_size: connections kept open (queries run beside the projector's saves).
    """

    def __init__(self, dsn: str, *, schema: str = DEFAULT_SCHEMA, pool_size: int = 4) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigurationError(
                f"schema must be lower-case letters, digits and _ (max 63), not {schema!r}"
            )
        if pool_size < 1:
            raise ConfigurationError(f"pool_size must be >= 1, not {pool_size}")
        self._dsn = dsn
        self._schema = schema
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        s = schema  # validated above: safe to splice into statements
        self._sql_load = f"SELECT state FROM {s}.tasks WHERE task_id = ANY($1::text[])"
        self._sql_cas = (
            f"INSERT INTO {s}.positions AS p (topic, partition, next_offset) "
            "VALUES ($1, $2, $3) ON CONFLICT (topic, partition) DO UPDATE "
            "SET next_offset = EXCLUDED.next_offset WHERE p.next_offset = $4 RETURNING 1"
        )
        self._sql_upsert_position = (
            f"INSERT INTO {s}.positions (topic, partition, next_offset) VALUES ($1, $2, $3) "
            "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset"
        )
        self._sql_tasks = (
            f"INSERT INTO {s}.tasks (task_id, task_name, status, created_us, updated_us, state, "
            "queue) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], "
            "$5::bigint[], $6::text[], $7::text[]) "
            "ON CONFLICT (task_id) DO UPDATE SET task_name = EXCLUDED.task_name, "
            "status = EXCLUDED.status, created_us = EXCLUDED.created_us, "
            "updated_us = EXCLUDED.updated_us, state = EXCLUDED.state, queue = EXCLUDED.queue"
        )
        self._sql_tags = (
            f"INSERT INTO {s}.tags (task_id, tag) SELECT * FROM unnest($1::text[], $2::text[]) "
            "ON CONFLICT DO NOTHING"
        )

    @property
    def schema(self) -> str:
        return self._schema

    async def start(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self._pool_size, timeout=30
            )
        except (*_ERRORS, ValueError) as exc:
            raise ViewStoreError(f"cannot connect the PostgreSQL view: {exc}") from exc
        try:
            async with pool.acquire() as conn, conn.transaction():
                # Two processes creating the same tables at once would collide in the catalog.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._schema)
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema}")
                await conn.execute(_DDL.format(s=self._schema))
                has_queue = await conn.fetchval(
                    "SELECT 1 FROM information_schema.columns WHERE table_schema = $1 "
                    "AND table_name = 'tasks' AND column_name = 'queue'",
                    self._schema,
                )
                if has_queue is None:
                    await conn.execute(_ADD_QUEUE.format(s=self._schema))
                await conn.execute(_QUEUE_INDEX.format(s=self._schema))
        except _ERRORS as exc:
            await pool.close()
            raise ViewStoreError(
                f"cannot create the PostgreSQL view tables in schema {self._schema}: {exc}"
            ) from exc
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def drop(self) -> None:
        """Delete the schema and everything in it (a rebuild into the same name starts empty)."""
        try:
            await self._conn().execute(f"DROP SCHEMA IF EXISTS {self._schema} CASCADE")
        except _ERRORS as exc:
            raise ViewStoreError(f"cannot drop schema {self._schema}: {exc}") from exc

    def describe(self) -> str:
        parts = urlsplit(self._dsn)  # host, port and database: no user, no password
        where = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
        return f"postgresql://{where}?schema={self._schema}"

    async def clear(self) -> None:
        s = self._schema
        try:
            await self._conn().execute(f"TRUNCATE {s}.tasks, {s}.tags, {s}.positions")
        except _ERRORS as exc:
            raise ViewStoreError(f"cannot clear the view in schema {s}: {exc}") from exc

    def _conn(self) -> asyncpg.Pool:
        if self._pool is None:
            raise ViewStoreError("the PostgreSQL view store is not started")
        return self._pool

    async def positions(self) -> dict[TopicPartition, int]:
        rows = await self._fetch(
            f"SELECT topic, partition, next_offset FROM {self._schema}.positions"
        )
        return {TopicPartition(r[0], r[1]): r[2] for r in rows}

    async def counts(self) -> dict[str, int]:
        rows = await self._fetch(
            f"SELECT status, COUNT(*) FROM {self._schema}.tasks GROUP BY status"
        )
        return {r[0]: r[1] for r in rows}

    async def _load(self, task_ids: set[str]) -> dict[str, TaskState]:
        if not task_ids:
            return {}
        rows = await self._fetch(self._sql_load, list(task_ids))
        states = (TaskState.from_json(r[0]) for r in rows)
        return {s.task_id: s for s in states}

    async def _save(
        self,
        states: Sequence[TaskState],
        positions: Mapping[TopicPartition, int],
        expected: Mapping[TopicPartition, int],
    ) -> None:
        try:
            async with self._conn().acquire() as conn, conn.transaction():
                # Positions first: their row locks make a second owner of a partition wait
                # here, then see the moved position and give up before writing any row.
                # Sorted: two savers lock rows in one order, never into a deadlock.
                for tp, offset in sorted(positions.items()):
                    was = expected.get(tp)
                    if was is None:
                        await conn.execute(
                            self._sql_upsert_position, tp.topic, tp.partition, offset
                        )
                    elif (
                        await conn.fetchval(self._sql_cas, tp.topic, tp.partition, offset, was)
                        is None
                    ):
                        raise PositionsMoved(f"{tp} moved since the fold began")
                if states:
                    await conn.execute(
                        self._sql_tasks,
                        [s.task_id for s in states],
                        [s.task_name for s in states],
                        [s.status for s in states],
                        [s.created_us for s in states],
                        [s.updated_us for s in states],
                        [s.to_json() for s in states],
                        [queue_of(s) for s in states],
                    )
                    pairs = [(s.task_id, tag) for s in states for tag in s.tags]
                    if pairs:
                        await conn.execute(
                            self._sql_tags, [p[0] for p in pairs], [p[1] for p in pairs]
                        )
        except _ERRORS as exc:
            raise ViewStoreError(f"the PostgreSQL view could not save: {exc}") from exc

    async def _search(self, query: TaskQuery) -> list[TaskState]:
        where: list[str] = []
        params: list[str | int] = []

        def arg(value: str | int) -> str:
            params.append(value)
            return f"${len(params)}"

        if query.status is not None:
            where.append(f"status = {arg(query.status)}")
        if query.task_name is not None:
            where.append(f"task_name = {arg(query.task_name)}")
        if query.tag is not None:
            where.append(
                f"task_id IN (SELECT task_id FROM {self._schema}.tags WHERE tag = {arg(query.tag)})"
            )
        if query.queue is not None:
            where.append(f"queue = {arg(query.queue)}")
        if query.since_us is not None:
            where.append(f"created_us >= {arg(query.since_us)}")
        if query.until_us is not None:
            where.append(f"created_us < {arg(query.until_us)}")
        after = query.after_key
        if after is not None:
            where.append(f"(created_us, task_id) > ({arg(after[0])}, {arg(after[1])})")
        sql = (
            f"SELECT state FROM {self._schema}.tasks WHERE {' AND '.join(where) or 'TRUE'} "
            f"ORDER BY created_us, task_id LIMIT {arg(query.limit)} OFFSET {arg(query.offset)}"
        )
        rows = await self._fetch(sql, *params)
        return [TaskState.from_json(r[0]) for r in rows]

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        try:
            return await self._conn().fetch(sql, *args)
        except _ERRORS as exc:
            raise ViewStoreError(f"the PostgreSQL view could not answer: {exc}") from exc
