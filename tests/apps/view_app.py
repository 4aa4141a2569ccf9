"""An app whose module chooses its view store (``VIEW_APP_URL``), for projector processes
run with ``qtasks-stream worker --stages projector``; small batches make a run long enough
to be killed in the middle of it."""

from __future__ import annotations

import os

from qtasks_stream import QueueTasks
from qtasks_stream.views import open_view


def build() -> QueueTasks:
    return QueueTasks(
        "projkill",
        partitions=4,
        batch_size=int(os.environ.get("VIEW_APP_BATCH", "100")),
        view=open_view(os.environ.get("VIEW_APP_URL", "memory://")),
    )


app = build()
