"""The benches' no-op app, for a ``qtasks-stream worker`` process (``--worker-process``).

The event log, registry and topic prefix come from the ``QTASKS_*`` variables the bench
sets for the process, as for any worker; ``QTASKS_BENCH_CONCURRENCY`` sets its slots.
"""

from __future__ import annotations

import os

from qtasks_stream import QueueTasks

app = QueueTasks(
    "bench",
    concurrency=int(os.environ.get("QTASKS_BENCH_CONCURRENCY", "64")),
    shutdown_grace=5.0,
)


@app.task(name="noop")
async def noop(i: int) -> int:
    return i
