"""A deployment as a team runs it: a `qtasks-stream worker` process, a client process that
runs no stage and polls `get()` (no `wait`), and an operator's `qtasks-stream history` run from
another folder; then the same with a PostgreSQL view shared by the worker and the client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qtasks_stream import QueueTasks, Settings, Task
from qtasks_stream.errors import ConfigurationError
from tests.apps.deploy_app import build

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
APP = "tests.apps.deploy_app:app"
LIMIT = 90.0
TASKS = 5


def _env(bootstrap: str, registry: str, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env.update(
        PYTHONPATH=str(REPO),
        QTASKS_BOOTSTRAP_SERVERS=bootstrap,
        QTASKS_SCHEMA_REGISTRY_URL=registry,
        QTASKS_TOPIC_PREFIX=f"dep{uuid.uuid4().hex[:8]}.",
        **more,
    )
    return env


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Started workers, stopped by SIGTERM (and killed if they hang) at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _spawn_worker(env: dict[str, str], folder: Path) -> subprocess.Popen[bytes]:
    with open(folder / "worker.log", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qtasks_stream", "worker", "-A", APP],
            cwd=folder,  # not the repository: the app is found through PYTHONPATH
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _all_succeed(client: QueueTasks, ids: list[str], folder: Path) -> list[Task]:
    """Poll ``get`` (no wait) until every task succeeded; bounded."""
    deadline = time.monotonic() + LIMIT
    while True:
        tasks = [await client.get(task_id) for task_id in ids]
        if all(t is not None and t.status == "success" for t in tasks):
            return [t for t in tasks if t is not None]
        assert time.monotonic() < deadline, (
            f"not all succeeded within {LIMIT}s: {[t and t.status for t in tasks]}\n"
            + (folder / "worker.log").read_text()[-2000:]
        )
        await asyncio.sleep(0.2)


async def _submit(client: QueueTasks) -> list[str]:
    ids = []
    for n in range(TASKS):
        submitted = await client.add_task("square", n)
        assert submitted is not None
        ids.append(submitted.uuid)
    return ids


def _history(env: dict[str, str], task_id: str, folder: Path) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "qtasks_stream", "history", task_id, "-A", APP, "--json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    document: dict[str, object] = json.loads(result.stdout)
    return document


async def test_worker_client_and_operator_in_separate_processes(
    kafka_bootstrap: str,
    schema_registry_url: str,
    tmp_path: Path,
    worker: list[subprocess.Popen[bytes]],
) -> None:
    env = _env(kafka_bootstrap, schema_registry_url)
    worker.append(_spawn_worker(env, tmp_path))
    client = build(Settings.from_env(env))
    try:
        ids = await _submit(client)
        tasks = await _all_succeed(client, ids, tmp_path)
        assert [(t.args, t.returning) for t in tasks] == [([n], n * n) for n in range(TASKS)]
        assert client.runners == {}, "the client started stages"
        with pytest.raises(ConfigurationError, match="needs a shared view"):
            await client.query(status="success")
    finally:
        await client.close()
    operator_folder = tmp_path / "operator"
    operator_folder.mkdir()
    document = _history(env, ids[0], operator_folder)
    assert (document["task_id"], document["status"]) == (ids[0], "success")


async def test_a_postgres_view_shared_by_worker_and_client(
    kafka_bootstrap: str,
    schema_registry_url: str,
    postgres_dsn: str,
    tmp_path: Path,
    worker: list[subprocess.Popen[bytes]],
) -> None:
    from qtasks_stream.views.postgres import PostgresViewStore

    schema = f"dep{uuid.uuid4().hex[:10]}"
    env = _env(
        kafka_bootstrap, schema_registry_url, QTASKS_VIEW_URL=f"{postgres_dsn}?schema={schema}"
    )
    worker.append(_spawn_worker(env, tmp_path))
    client = QueueTasks.from_env("unused", env=env)  # from_env builds the view from the URL
    assert isinstance(client.view, PostgresViewStore) and client.view.schema == schema
    await client.close()
    client = build(Settings.from_env(env))
    try:
        ids = await _submit(client)
        await _all_succeed(client, ids, tmp_path)
        deadline = time.monotonic() + LIMIT
        while len(found := await client.query(status="success", task_name="square")) < TASKS:
            assert time.monotonic() < deadline, f"the view shows {len(found)} of {TASKS}"
            await asyncio.sleep(0.2)
        assert sorted(t.uuid for t in found) == sorted(ids)
        assert (await client.counts()).get("success") == TASKS
    finally:
        await client.close()
        dropper = PostgresViewStore(postgres_dsn, schema=schema, pool_size=1)
        await dropper.start()
        try:
            await dropper.drop()
        finally:
            await dropper.close()
    document = _history(env, ids[-1], tmp_path)
    assert document["status"] == "success"
