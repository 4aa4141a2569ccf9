"""The app the cross-process tracing test runs in ``qtasks-stream worker`` processes.

``flaky`` fails its first attempt; the retry waits long enough for the test to stop the
worker that ran attempt 1 and start another one, which runs attempt 2.
"""

from __future__ import annotations

import os

from qtasks_stream import QueueTasks, current


class Flaky(Exception):
    pass


def build() -> QueueTasks:
    app = QueueTasks("otel", partitions=2, concurrency=4, shutdown_grace=2.0)
    app.task(
        name="flaky",
        retry=1,
        retry_on_exc=[Flaky],
        retry_backoff=float(os.environ.get("OTEL_APP_BACKOFF", "8")),
        retry_backoff_max=60.0,
        retry_jitter=0.0,
    )(flaky)
    return app


async def flaky(n: int) -> int:
    if current().attempt == 1:
        raise Flaky(f"attempt 1 fails in {os.getpid()}")
    return n + 1


app = build()
