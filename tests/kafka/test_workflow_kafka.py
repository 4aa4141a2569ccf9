"""A chord on the dev broker with a worker SIGKILLed mid-group: the group completes on the
other workers and the callback is submitted once and runs once."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from qtasks_stream.events import TERMINAL_KINDS, Submitted
from qtasks_stream.settings import Settings
from qtasks_stream.workflows import chord
from tests.apps.workflow_app import app as declared
from tests.apps.workflow_app import collect, member
from tests.kafka.test_exactly_once import REPO, _env, _read_all, _working_pids
from tests.processes import stop_processes

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

MEMBERS = 40


def _spawn(env: dict[str, str], logs: Path, n: int) -> subprocess.Popen[bytes]:
    with open(logs / f"worker-{n}.log", "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qtasks_stream",
                "-v",
                "worker",
                "-A",
                "tests.apps.workflow_app:app",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_chord_with_a_worker_killed_mid_group_runs_its_callback_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = f"wfk{uuid.uuid4().hex[:8]}."
    side_effects = tmp_path / "side-effects.txt"
    env = _env("confluent", kafka_bootstrap, prefix, side_effects)
    client = declared.configure(Settings.from_env(env))
    workers = [_spawn(env, tmp_path, n) for n in range(2)]
    killed: list[int] = []
    try:
        handle = await client.run_workflow(
            chord([member.s(i) for i in range(MEMBERS)], collect.s())
        )
        waiting = asyncio.create_task(handle.result(240))
        deadline = time.monotonic() + 120
        # Kill a worker that has run members, while members are still to run.
        while True:
            assert time.monotonic() < deadline, "no worker ran a member"
            working = _working_pids(side_effects)
            victim = next((p for p in workers if str(p.pid) in working), None)
            if victim is not None:
                break
            await asyncio.sleep(0.05)
        lines = side_effects.read_text().splitlines()
        assert len(lines) < MEMBERS, "the group ended before the kill"
        victim.send_signal(signal.SIGKILL)
        killed.append(victim.pid)
        workers.append(_spawn(env, tmp_path, 2))
        result = await waiting
        assert result is not None and result.status == "success"
        assert result.value == sum(2 * i for i in range(MEMBERS))
        events = await _read_all(client.event_log, client.topology.events, 4, client.serde)
    finally:
        stop_processes(workers)
        await client.close()

    body = handle.step_id("body")
    submitted = collections.Counter(e.task_id for e in events if isinstance(e.payload, Submitted))
    terminal = collections.Counter(e.task_id for e in events if e.kind in TERMINAL_KINDS)
    steps = [handle.step_id(str(i)) for i in range(MEMBERS)] + [body]
    assert {s: submitted[s] for s in steps} == dict.fromkeys(steps, 1)
    assert {s: terminal[s] for s in steps} == dict.fromkeys(steps, 1)
    runs = [line.split() for line in side_effects.read_text().splitlines()]
    assert [r[0] for r in runs if r[3] == "callback"] == [body]
    assert killed
