"""A view store in one SQLite file: rows and applied positions in one transaction.

Several processes may share the file (one projector per set of partitions): each save is
one ``BEGIN IMMEDIATE`` transaction, which takes the write lock before it compares the
stored positions, and waits up to ``busy_timeout`` for another writer.

``synchronous=NORMAL`` in WAL mode: a process crash (or SIGKILL) loses no committed
transaction; a power loss may lose the last ones, but rows and positions always go
together, so the projector resumes where the file says and nothing is doubled or skipped.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path

from qtasks_stream.errors import ViewStoreError
from qtasks_stream.records import TopicPartition
from qtasks_stream.state import TaskState
from qtasks_stream.views.base import PositionsMoved, TaskQuery, ViewStore, queue_of

__all__ = ["SqliteViewStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    task_name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    updated_us INTEGER NOT NULL,
    state TEXT NOT NULL,
    queue TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, created_us, task_id);
CREATE INDEX IF NOT EXISTS tasks_name ON tasks (task_name, created_us, task_id);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_us, task_id);
CREATE TABLE IF NOT EXISTS tags (
    task_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (tag, task_id)
);
CREATE TABLE IF NOT EXISTS positions (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""
# A file made before the queue column: the column is added and filled from each row's state
# (a state without a queue is in the default one), then the index that needs it.
_ADD_QUEUE = """
ALTER TABLE tasks ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
UPDATE tasks SET queue = coalesce(json_extract(state, '$.queue'), 'default');
"""
_QUEUE_INDEX = "CREATE INDEX IF NOT EXISTS tasks_queue ON tasks (queue, created_us, task_id)"


class SqliteViewStore(ViewStore):
    """Args: path: the database file (created if missing), or ``":memory:"``."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._db: sqlite3.Connection | None = None
        # One connection, used from one thread at a time: calls are serialized by this lock.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if self._db is not None:
            return
        try:
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoint every ~40 MB of WAL rather than 4 MB: pages a fold rewrites batch
            # after batch (index tails) are copied back once, not every few batches.
            db.execute("PRAGMA wal_autocheckpoint=10000")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
            if "queue" not in columns:
                # One transaction: two processes opening an old file add the column once.
                db.execute("BEGIN IMMEDIATE")
                if "queue" not in {row[1] for row in db.execute("PRAGMA table_info(tasks)")}:
                    for statement in filter(str.strip, _ADD_QUEUE.split(";")):
                        db.execute(statement)
                db.execute("COMMIT")
            db.execute(_QUEUE_INDEX)
        except sqlite3.Error as exc:
            raise ViewStoreError(f"cannot open SQLite view {self._path!r}: {exc}") from exc
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ViewStoreError("the SQLite view store is not started")
        return self._db

    def describe(self) -> str:
        return f"sqlite:///{self._path}"

    async def clear(self) -> None:
        async with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                for table in ("tasks", "tags", "positions"):
                    db.execute(f"DELETE FROM {table}")
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise ViewStoreError(f"SQLite view {self._path!r} could not clear: {exc}") from exc

    async def positions(self) -> dict[TopicPartition, int]:
        async with self._lock:
            rows = self._conn().execute("SELECT topic, partition, next_offset FROM positions")
            return {TopicPartition(t, p): o for t, p, o in rows}

    async def counts(self) -> dict[str, int]:
        async with self._lock:
            rows = self._conn().execute("SELECT status, COUNT(*) FROM tasks GROUP BY status")
            return {status: n for status, n in rows}

    async def _load(self, task_ids: set[str]) -> dict[str, TaskState]:
        if not task_ids:
            return {}
        ids = list(task_ids)
        async with self._lock:
            return await asyncio.to_thread(self._load_sync, ids)

    def _load_sync(self, ids: list[str]) -> dict[str, TaskState]:
        out: dict[str, TaskState] = {}
        db = self._conn()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for (text,) in db.execute(f"SELECT state FROM tasks WHERE task_id IN ({marks})", chunk):
                state = TaskState.from_json(text)
                out[state.task_id] = state
        return out

    async def _save(
        self,
        states: Sequence[TaskState],
        positions: Mapping[TopicPartition, int],
        expected: Mapping[TopicPartition, int],
    ) -> None:
        async with self._lock:
            await asyncio.to_thread(self._save_sync, states, positions, expected)

    def _save_sync(
        self,
        states: Sequence[TaskState],
        positions: Mapping[TopicPartition, int],
        expected: Mapping[TopicPartition, int],
    ) -> None:
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            for tp, offset in expected.items():
                row = db.execute(
                    "SELECT next_offset FROM positions WHERE topic = ? AND partition = ?",
                    (tp.topic, tp.partition),
                ).fetchone()
                if (row[0] if row is not None else 0) != offset:
                    db.execute("ROLLBACK")
                    raise PositionsMoved(f"{tp} moved since the fold began")
            db.executemany(
                "INSERT INTO tasks (task_id, task_name, status, created_us, updated_us, state, "
                "queue) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET "
                "task_name = excluded.task_name, status = excluded.status, "
                "created_us = excluded.created_us, updated_us = excluded.updated_us, "
                "state = excluded.state, queue = excluded.queue",
                [
                    (
                        s.task_id,
                        s.task_name,
                        s.status,
                        s.created_us,
                        s.updated_us,
                        s.to_json(),
                        queue_of(s),
                    )
                    for s in states
                ],
            )
            db.executemany(
                "INSERT OR IGNORE INTO tags VALUES (?, ?)",
                [(s.task_id, tag) for s in states for tag in s.tags],
            )
            db.executemany(
                "INSERT OR REPLACE INTO positions VALUES (?, ?, ?)",
                [(tp.topic, tp.partition, offset) for tp, offset in positions.items()],
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise ViewStoreError(f"SQLite view {self._path!r} could not save: {exc}") from exc

    async def _search(self, query: TaskQuery) -> list[TaskState]:
        where: list[str] = ["1=1"]
        params: list[str | int] = []
        if query.status is not None:
            where.append("status = ?")
            params.append(query.status)
        if query.task_name is not None:
            where.append("task_name = ?")
            params.append(query.task_name)
        if query.tag is not None:
            where.append("task_id IN (SELECT task_id FROM tags WHERE tag = ?)")
            params.append(query.tag)
        if query.queue is not None:
            where.append("queue = ?")
            params.append(query.queue)
        if query.since_us is not None:
            where.append("created_us >= ?")
            params.append(query.since_us)
        if query.until_us is not None:
            where.append("created_us < ?")
            params.append(query.until_us)
        after = query.after_key
        if after is not None:
            where.append("(created_us, task_id) > (?, ?)")
            params.extend(after)
        sql = (
            f"SELECT state FROM tasks WHERE {' AND '.join(where)} "
            "ORDER BY created_us, task_id LIMIT ? OFFSET ?"
        )
        async with self._lock:
            rows = await asyncio.to_thread(
                lambda: self._conn().execute(sql, [*params, query.limit, query.offset]).fetchall()
            )
        return [TaskState.from_json(text) for (text,) in rows]
