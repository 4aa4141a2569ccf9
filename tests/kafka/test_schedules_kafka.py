"""A schedule on the real broker: two ``qtasks-stream worker`` processes, the one owning the
schedules stage SIGKILLed between ticks; every tick runs once, none lost, none twice.

The schedule is added and listed through the CLI (``qtasks-stream schedules``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from qtasks_stream.events import TERMINAL_KINDS, Submitted, Succeeded, TaskEvent
from qtasks_stream.settings import Settings
from tests.apps.schedule_app import build
from tests.kafka.test_exactly_once import REPO, _env, _read_all

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

SECOND = 1_000_000
APP = "tests.apps.schedule_app:app"
_RESTORED = re.compile(r"^(\S+ \S+) .*schedules restored")


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "qtasks_stream", *args, "-A", APP],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _spawn(env: dict[str, str], logs: Path, n: int) -> subprocess.Popen[bytes]:
    with open(logs / f"worker-{n}.log", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "qtasks_stream", "-v", "worker", "-A", APP],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _owner(logs: Path, workers: list[subprocess.Popen[bytes]]) -> int | None:
    """The worker that most recently restored the schedules (the stage's owner)."""
    latest: tuple[str, int] | None = None
    for n, worker in enumerate(workers):
        if worker.poll() is not None:
            continue
        for line in (logs / f"worker-{n}.log").read_text(errors="replace").splitlines():
            found = _RESTORED.match(line)
            if found and (latest is None or found.group(1) >= latest[0]):
                latest = (found.group(1), n)
    return latest[1] if latest is not None else None


def _runs(side_effects: Path) -> list[str]:
    if not side_effects.exists():
        return []
    return [line.split()[0] for line in side_effects.read_text().splitlines() if line.strip()]


def _tick(event: TaskEvent) -> int:
    assert isinstance(event.payload, Submitted)
    tag = next(t for t in event.payload.tags if t.startswith("tick:"))
    return int(datetime.fromisoformat(tag[5:].replace("Z", "+00:00")).timestamp()) * SECOND


@pytest.mark.parametrize("kind", ["confluent", "aiokafka"])
async def test_a_killed_owner_loses_no_tick_and_fires_none_twice(
    kind: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = f"sch{uuid.uuid4().hex[:8]}."
    side_effects = tmp_path / "runs.txt"
    env = _env(kind, kafka_bootstrap, prefix, side_effects)
    env["SCHEDULE_SIDE_EFFECTS"] = str(side_effects)
    added = _cli(
        env,
        "schedules",
        "add",
        "beat",
        "--task",
        "beat",
        "--every",
        "1",
        "--catch-up",
        "all",
        "--catch-up-limit",
        "120",
        "--overlap",
        "allow",
    )
    assert added.startswith("beat\tbeat\tevery 1s\tactive")

    workers = [_spawn(env, tmp_path, n) for n in range(2)]
    try:

        async def until(what: str, check: object, limit: float) -> None:
            deadline = time.monotonic() + limit
            while not check():  # type: ignore[operator]
                assert time.monotonic() < deadline, f"not within {limit}s: {what}"
                assert workers[0].poll() is None or workers[1].poll() is None
                await asyncio.sleep(0.1)

        # Both have joined (each runs the projector) and ticks run.
        await until("3 runs", lambda: len(_runs(side_effects)) >= 3, 90)
        await until("an owner", lambda: _owner(tmp_path, workers) is not None, 30)
        # Just after a run, so between ticks: SIGKILL the owner of the schedules stage.
        count = len(_runs(side_effects))
        await until("one more run", lambda: len(_runs(side_effects)) > count, 30)
        victim = _owner(tmp_path, workers)
        assert victim is not None
        workers[victim].send_signal(signal.SIGKILL)
        workers[victim].wait(timeout=10)
        killed_at = time.time()
        survivor = workers[1 - victim]
        # The survivor takes the stage over (after the session timeout) and catches up.
        await until(
            "the survivor restored the schedules",
            lambda: _owner(tmp_path, workers) == 1 - victim,
            60,
        )
        after_kill = len(_runs(side_effects))
        await until(
            "5 runs after the take-over", lambda: len(_runs(side_effects)) >= after_kill + 5, 60
        )

        # The take-over submits the ticks missed meanwhile at once: let them run before the
        # survivor stops (the checks below allow only the newest few to be unfinished).
        def runs_left() -> int:
            runs = _cli(env, "schedules", "runs", "beat", "--json").splitlines()
            return sum(json.loads(r)["status"] not in ("success", "error") for r in runs)

        await until("the missed ticks ran", lambda: runs_left() <= 2, 60)
        listed = json.loads(_cli(env, "schedules", "list", "--json").splitlines()[0])
        assert (listed["name"], listed["last_outcome"], listed["paused"]) == (
            "beat",
            "fired",
            False,
        )
        survivor.send_signal(signal.SIGTERM)
        survivor.wait(timeout=30)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=10)

    client = build().configure(Settings.from_env(env))
    await client.connect()
    try:
        events = await _read_all(
            client.event_log, client.topology.events, client.topology.partitions, client.serde
        )
    finally:
        await client.close()
    submitted = [
        e for e in events if isinstance(e.payload, Submitted) and "schedule:beat" in e.payload.tags
    ]
    per_id = collections.Counter(e.task_id for e in submitted)
    assert max(per_id.values()) == 1, f"a tick submitted twice: {per_id.most_common(3)}"
    ticks = sorted(_tick(e) for e in submitted)
    # Consecutive seconds from the first tick to the last: none lost across the kill.
    assert ticks == list(range(ticks[0], ticks[-1] + SECOND, SECOND))
    assert ticks[0] < killed_at * SECOND < ticks[-1]
    ends = collections.Counter(
        (e.task_id, e.kind) for e in events if e.kind in TERMINAL_KINDS and e.task_id in per_id
    )
    # Every run that ended ended once, in success (the newest may not have run yet).
    assert all(n == 1 for n in ends.values())
    assert {kind for _, kind in ends} == {Succeeded.__name__}
    assert len(ends) >= len(per_id) - 3
    # The CLI lists the runs of the schedule from the log: the same tasks, by tick.
    listed = [
        json.loads(line) for line in _cli(env, "schedules", "runs", "beat", "--json").splitlines()
    ]
    assert [r["task_id"] for r in listed] == [e.task_id for e in sorted(submitted, key=_tick)]
    assert {r["status"] for r in listed[:-3]} == {"success"}
