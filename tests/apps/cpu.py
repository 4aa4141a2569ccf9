"""Module-level functions for the process executor tests (they must be importable)."""

from __future__ import annotations

import os
import time


def square(n: int) -> tuple[int, int]:
    return n * n, os.getpid()


def spin(seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return "finished"


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def die() -> None:
    os._exit(3)
