"""The app the audit CLI test runs in a `qtasks-stream worker` process.

``AUDIT_VIEW`` names a SQLite file for the view (shared with the CLI process, so that
``replay --verify`` compares with the worker's live view); ``fails`` raises until the file
named by ``AUDIT_FIXED`` exists, which is how the test "fixes the cause" before resubmitting.
"""

from __future__ import annotations

import os
from pathlib import Path

from qtasks_stream import QueueTasks
from qtasks_stream.views.sqlite import SqliteViewStore


def build() -> QueueTasks:
    view = os.environ.get("AUDIT_VIEW")
    app = QueueTasks(
        "audit",
        partitions=4,
        concurrency=8,
        shutdown_grace=2.0,
        view=SqliteViewStore(view) if view else None,
    )
    app.task(name="ok")(ok)
    app.task(name="fails")(fails)
    return app


async def ok(n: int) -> int:
    return n * 2


def fails(n: int) -> int:
    marker = os.environ.get("AUDIT_FIXED", "")
    if not marker or not Path(marker).exists():
        raise RuntimeError(f"{n}: the cause is not fixed")
    return n


app = build()
