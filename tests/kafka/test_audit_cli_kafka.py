"""The audit commands on the real broker, each in its own process beside a `worker` process:
`history --json`, `resubmit`, `snapshot`, `replay --verify` against the worker's live SQLite
view, `dlq list` and `dlq replay` (twice)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from qtasks_stream.settings import Settings
from tests.apps.audit_app import build
from tests.contract.test_lifecycle import eventually
from tests.kafka.test_cli_kafka import REPO, _cli, _env

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]
APP = "tests.apps.audit_app:app"


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qtasks_stream", "worker", "-A", APP],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_audit_commands_on_kafka(
    kafka_bootstrap: str, schema_registry_url: str, tmp_path: Path
) -> None:
    prefix = f"aud{uuid.uuid4().hex[:8]}."
    env = _env(kafka_bootstrap, schema_registry_url, prefix)
    env.update(AUDIT_VIEW=str(tmp_path / "live.sqlite"), AUDIT_FIXED=str(tmp_path / "fixed"))
    worker = _spawn(env, tmp_path / "worker.log")
    client_env = {k: v for k, v in env.items() if k != "AUDIT_VIEW"}
    client = build().configure(Settings.from_env(client_env))
    started = time.monotonic()

    def step(what: str) -> None:
        # Shown with the test's output when it fails or times out: which step it was in.
        print(f"{time.monotonic() - started:6.1f}s {what}", flush=True)

    try:
        step("warm-up through the worker process")
        warm = await client.add_task("ok", -1, timeout=90)
        if warm is None or warm.status != "success":
            log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"the worker (exit {worker.poll()}) ran no task: {warm}\n{log}")
        step("submitting")
        done = [await client.add_task("ok", n, timeout=90) for n in range(5)]
        failed = await client.add_task("fails", 7, timeout=90)
        assert all(t is not None and t.status == "success" for t in done)
        assert failed is not None and failed.status == "error"

        step("history")
        history = _cli(env, "history", failed.uuid, "-A", APP, "--json")
        assert history.returncode == 0, history.stderr
        document = json.loads(history.stdout)
        assert [a["outcome"] for a in document["attempts"]] == [None, "Failed"]
        assert document["attempts"][1]["error"]["type"] == "RuntimeError"

        step("snapshot")
        snapshot = _cli(env, "snapshot", "-A", APP)
        assert snapshot.returncode == 0, snapshot.stderr
        assert " 7 tasks, covers " in snapshot.stdout  # the warm-up, 5 ok, 1 failing

        step("resubmit")
        (tmp_path / "fixed").touch()
        resubmit = _cli(env, "resubmit", "-A", APP, "--task", "fails", "--reason", "fixed")
        assert resubmit.returncode == 0, resubmit.stderr
        assert f"{failed.uuid}\tfails\terror\tattempt 2 resubmitted" in resubmit.stdout
        await eventually(
            lambda: client.wait(failed.uuid, timeout=5),
            lambda t: t is not None and t.status == "success" and t.attempt == 2,
            what="the resubmitted attempt succeeded",
            limit=60,
        )

        step("dead letters")
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
        producer.produce(f"{prefix}audit.events", key=b"broken", value=b"\x00\x01garbage")
        producer.flush(10)

        def dead_letters() -> list[dict[str, object]]:
            listed = _cli(env, "dlq", "list", "-A", APP, "--json")
            assert listed.returncode == 0, listed.stderr
            records: list[dict[str, object]] = json.loads(listed.stdout)["records"]
            return records

        letters = await eventually(
            dead_letters, lambda r: len(r) == 2, what="scheduler and projector gave up", limit=60
        )
        assert {r["stage"] for r in letters} == {"scheduler", "projector"}
        first = _cli(env, "dlq", "replay", "-A", APP, "--key", "broken")
        assert first.stdout.count("\treplayed") == 1, first.stdout
        assert first.stdout.count("\talready replayed") == 1, first.stdout
        positions = [f"{r['partition']}:{r['offset']}" for r in letters]
        second = _cli(
            env, "dlq", "replay", "-A", APP, "--offset", positions[0], "--offset", positions[1]
        )
        assert second.stdout.count("\talready replayed") == 2, second.stdout

        # Everything ended (the garbage dead-lettered again): the live view is at rest.
        await eventually(dead_letters, lambda r: len(r) == 4, what="the copy failed again")
        step("replay --verify")
        verify = _cli(env, "replay", "-A", APP, "--into", "memory://", "--verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "verify: 0 differences" in verify.stdout and "events/s" in verify.stdout
        from_snapshot = _cli(
            env, "replay", "-A", APP, "--into", "memory://", "--from-snapshot", "--verify"
        )
        assert from_snapshot.returncode == 0, from_snapshot.stdout + from_snapshot.stderr
        assert "from snapshot " in from_snapshot.stdout
    finally:
        step("closing")
        await client.close()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
    assert code == 0, (tmp_path / "worker.log").read_text()[-2000:]
