"""The command line on the real broker: `worker -A` in another process, `history`, `demo`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from qtasks_stream.settings import Settings
from tests.apps.eos_app import build

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]


def _env(bootstrap: str, registry: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env.update(
        QTASKS_BOOTSTRAP_SERVERS=bootstrap,
        QTASKS_SCHEMA_REGISTRY_URL=registry,
        QTASKS_TOPIC_PREFIX=prefix,
        QTASKS_EVENT_LOG="confluent",
    )
    return env


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qtasks_stream", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _spawn_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qtasks_stream", "worker", "-A", "tests.apps.eos_app:app"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_worker_in_another_process_and_history_from_the_log(
    kafka_bootstrap: str, schema_registry_url: str, tmp_path: Path
) -> None:
    env = _env(kafka_bootstrap, schema_registry_url, f"cli{uuid.uuid4().hex[:8]}.")
    worker = _spawn_worker(env, tmp_path / "worker.log")
    client = build().configure(Settings.from_env(env))
    try:
        done = await client.add_task("work", 21, timeout=90)
    finally:
        await client.close()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
    assert done is not None and done.status == "success" and done.returning == 42
    assert code == 0, (tmp_path / "worker.log").read_text()[-2000:]

    result = _cli(env, "history", done.uuid, "-A", "tests.apps.eos_app:app", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["task_id"], document["status"]) == (done.uuid, "success")
    events = [e for attempt in document["attempts"] for e in attempt["events"]]
    assert [e["kind"] for e in events] == ["Submitted", "Scheduled", "Started", "Succeeded"]
    assert [a["outcome"] for a in document["attempts"]] == [None, "Succeeded"]
    # `work(n: int) -> int` is typed: its arguments and result are Avro, shown decoded.
    assert events[0]["payload"]["arguments_avro"] == {"n": 21}
    assert events[-1]["payload"]["result_avro"] == {"value": 42}

    unknown = _cli(env, "history", str(uuid.uuid4()), "-A", "tests.apps.eos_app:app")
    assert unknown.returncode == 1 and "no events for task" in unknown.stderr


def test_demo_runs_on_kafka_when_configured(kafka_bootstrap: str, schema_registry_url: str) -> None:
    env = _env(kafka_bootstrap, schema_registry_url, f"demo{uuid.uuid4().hex[:8]}.")
    result = _cli(env, "demo", "--tasks", "40", timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "event log ConfluentEventLog" in result.stdout
    assert "bulk tasks not successful: 0" in result.stdout
    assert "status=success  attempt=2" in result.stdout


def test_schemas_check_is_a_gate_naming_the_field(schema_registry_url: str) -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    from qtasks_stream.serde.schemas import load_schema_text

    prefix = f"sch{uuid.uuid4().hex[:8]}."
    env = _env("127.0.0.1:1", schema_registry_url, prefix)
    env.pop("QTASKS_BOOTSTRAP_SERVERS")  # the gate needs the registry only
    env.pop("QTASKS_EVENT_LOG")  # (a Kafka client without servers is refused)
    clean = _cli(env, "schemas", "check", "-A", "tests.apps.eos_app:app")
    assert clean.returncode == 0, clean.stderr
    assert "0 problems" in clean.stderr

    # Another writer registered data our schema cannot read: `attempt` as a string.
    old = json.loads(load_schema_text("TaskEvent"))
    for field in old["fields"]:
        if field["name"] == "attempt":
            field["type"] = "string"
    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as registry:
        registry.register_schema(f"{prefix}eos.events-value", Schema(json.dumps(old), "AVRO"))
        gate = _cli(env, "schemas", "check", "-A", "tests.apps.eos_app:app")
        assert gate.returncode == 1
        assert "attempt" in gate.stdout and "BACKWARD_TRANSITIVE" in gate.stdout
        before = registry.get_versions(f"{prefix}eos.events-value")
        refused = _cli(env, "schemas", "register", "-A", "tests.apps.eos_app:app")
        assert refused.returncode == 2 and "attempt" in refused.stderr
        assert registry.get_versions(f"{prefix}eos.events-value") == before
