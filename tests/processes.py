"""Worker processes the Kafka tests start, stopped the same way everywhere."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterable


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], grace: float = 30.0) -> None:
    """SIGTERM every process still running (all at once, so their shutdowns overlap), then
    wait for each; one that outlives ``grace`` is killed."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
