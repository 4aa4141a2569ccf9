"""``SyncClient``: blocking calls from many threads, on the embedded default and on Kafka."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks, Task
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.sync import SyncClient
from tests.eventlogs import kafka_test_config

LIMIT = 60.0
THREADS = 8
ROOT = Path(__file__).resolve().parents[2]


def declare(app: QueueTasks) -> None:
    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def later(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "late"


def submit_and_wait(client: SyncClient, n: int) -> list[tuple[int, str, int]]:
    """What one thread does: submit, then wait, a few times; half with add_task(timeout=)."""
    seen = []
    for i in range(3):
        value = 100 * n + i
        if i % 2:
            task = client.add_task("add", value, 1, timeout=LIMIT)
        else:
            submitted = client.add_task("add", value, 1)
            assert submitted is not None
            task = client.wait(submitted.uuid, timeout=LIMIT)
        assert task is not None
        seen.append((value, task.status, task.returning))
    return seen


def run_threads(client: SyncClient) -> None:
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda n: submit_and_wait(client, n), range(THREADS)))
    assert [r for thread in results for r in thread] == [
        (100 * n + i, "success", 100 * n + i + 1) for n in range(THREADS) for i in range(3)
    ]


@pytest.fixture
def client() -> Iterator[SyncClient]:
    app = QueueTasks("sync")
    declare(app)
    with SyncClient(app, run_stages=True) as client:
        yield client
    assert client.closed


def test_eight_threads_submit_and_wait_at_once_on_the_embedded_default(
    client: SyncClient,
) -> None:
    run_threads(client)


def test_get_and_cancel_from_a_thread(client: SyncClient) -> None:
    slow = client.add_task("later", 30.0)
    assert slow is not None
    client.cancel(slow.uuid, reason="not needed")
    ended = client.wait(slow.uuid, timeout=LIMIT)
    assert ended is not None and (ended.status, ended.cancel_reason) == ("cancel", "not needed")
    got = client.get(slow.uuid)
    assert isinstance(got, Task) and got.status == "cancel"


def test_a_closed_client_refuses_calls_and_closing_twice_is_harmless() -> None:
    app = QueueTasks("sync-closed")
    declare(app)
    client = SyncClient(app, run_stages=True)
    assert client.add_task("add", 1, 2, timeout=LIMIT) is not None
    client.close()
    client.close()
    with pytest.raises(ConfigurationError, match="closed"):
        client.add_task("add", 1, 2)


def test_a_client_without_stages_on_the_embedded_log_is_refused() -> None:
    app = QueueTasks("sync-nostages")
    declare(app)
    with pytest.raises(ConfigurationError, match="run_stages=True"):
        SyncClient(app)


def test_a_task_calling_the_client_of_its_own_loop_is_refused_not_deadlocked() -> None:
    app = QueueTasks("sync-self")
    clients: list[SyncClient] = []

    @app.task
    async def nested() -> None:
        clients[0].add_task("nested")

    with SyncClient(app, run_stages=True) as client:
        clients.append(client)
        task = client.add_task("nested", timeout=LIMIT)
    assert task is not None and task.status == "error"
    assert task.error_message is not None and "its own event loop" in task.error_message


EXIT_SCRIPT = """
import asyncio, sys, threading
from pathlib import Path
from qtasks_stream import QueueTasks
from qtasks_stream.sync import SyncClient

app = QueueTasks("sync-exit")
started = threading.Event()

@app.task
def add(a, b):
    return a + b

@app.task
async def slow_write(path):
    started.set()
    await asyncio.sleep(0.5)
    Path(path).write_text("finished")

client = SyncClient(app, run_stages=True)
task = client.add_task(add, 2, 3, timeout=30)
print(task.status, task.returning, flush=True)
client.add_task(slow_write, sys.argv[1])
assert started.wait(30)
# No client.close(): the interpreter must still exit, and close the app on its way out,
# letting the running attempt finish within the app's shutdown grace.
"""


def test_an_unclosed_client_is_closed_at_exit_and_does_not_hang_it(tmp_path: Path) -> None:
    script, marker = tmp_path / "unclosed.py", tmp_path / "marker"
    script.write_text(textwrap.dedent(EXIT_SCRIPT))
    done = subprocess.run(
        [sys.executable, "-X", "dev", str(script), str(marker)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=LIMIT,  # a hang fails here
    )
    assert (done.returncode, done.stdout) == (0, "success 5\n"), done.stderr
    assert "Traceback" not in done.stderr and "never retrieved" not in done.stderr, done.stderr
    assert marker.read_text() == "finished"


@pytest.mark.kafka
@pytest.mark.timeout(240)
def test_eight_threads_submit_and_wait_at_once_on_kafka(
    kafka_bootstrap: str, schema_registry_url: str
) -> None:
    from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog

    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as registry:
        app = QueueTasks(
            "sync",
            event_log=ConfluentEventLog(kafka_test_config(kafka_bootstrap)),
            schema_registry=registry,
            topic_prefix=f"sync{uuid.uuid4().hex[:8]}.",
            poll_timeout=0.1,
        )
        declare(app)
        with SyncClient(app, run_stages=True) as client:
            run_threads(client)
