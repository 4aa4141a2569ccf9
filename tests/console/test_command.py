"""``qtasks-stream console`` as a process: it serves on the address it announces, runs the
stages on the embedded default, needs the token, and stops cleanly on SIGINT."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.console_app:build"
TOKEN = "command-test-token-0123456789"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def start(
    launched: list[subprocess.Popen[str]], *argv: str, **env: str
) -> tuple[subprocess.Popen[str], list[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "qtasks_stream", "console", "-A", APP, "--port", "0", *argv],
        cwd=ROOT,
        env=_env(**env),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    launched.append(process)
    assert process.stderr is not None
    lines = []
    for line in process.stderr:  # bounded by the test's timeout
        lines.append(line)
        if "console of app" in line:
            break
    return process, lines


def _url(lines: list[str]) -> str:
    match = re.search(r"on (http://127\.0\.0\.1:\d+)/", lines[-1])
    assert match, lines
    return match.group(1)


def test_serves_runs_the_stages_and_stops_on_sigint(launched: list[subprocess.Popen[str]]) -> None:
    process, lines = start(launched, QTASKS_CONSOLE_TOKEN=TOKEN)
    url = _url(lines)
    assert "running projector" in lines[-1]
    bearer = {"authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/api/counts").status_code == 401
        task = client.post("/api/tasks/add", json={"args": [20, 22]}, headers=bearer).json()
        deadline = time.monotonic() + 10
        while True:
            got = client.get(f"/api/tasks/{task['id']}", headers=bearer)
            if got.status_code == 200 and got.json()["status"] == "success":
                break
            assert time.monotonic() < deadline, got.text
            time.sleep(0.05)
        assert got.json()["result"] == 42
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=15) == 0


def test_without_a_token_one_is_made_up_and_printed(launched: list[subprocess.Popen[str]]) -> None:
    process, lines = start(launched)
    made = next(
        re.search(r"QTASKS_CONSOLE_TOKEN to choose one\): (\S+)", x) for x in lines if "token" in x
    )
    assert made is not None
    with httpx.Client(base_url=_url(lines), timeout=10) as client:
        assert client.get("/api/counts").status_code == 401
        ok = client.get("/api/counts", headers={"authorization": f"Bearer {made.group(1)}"})
        assert ok.status_code == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0


def test_a_short_token_or_a_taken_port_is_an_error() -> None:
    short = subprocess.run(
        [sys.executable, "-m", "qtasks_stream", "console", "-A", APP],
        cwd=ROOT,
        env=_env(QTASKS_CONSOLE_TOKEN="short"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert short.returncode == 2 and "at least 16 characters" in short.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "qtasks_stream", "console", "-A", APP, "--port", str(port)],
            cwd=ROOT,
            env=_env(QTASKS_CONSOLE_TOKEN=TOKEN),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
