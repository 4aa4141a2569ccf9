"""The Celery side of ``bench.bench_peers``: a no-op task on kombu's Kafka transport.

The worker runs as ``celery -A bench.peer_celery -b confluentkafka://HOST:PORT worker ...``
(``bench_peers`` starts it). Every successful task appends ``"<result> <monotonic time>"``
to the file named by ``$BENCH_PEERS_CELERY_DONE`` from Celery's ``task_success`` signal, so
the bench sees completions without a result backend (which would need another server).
CLOCK_MONOTONIC is system-wide on Linux, so the bench compares those times with its own.

Celery finds its app by module attribute, hence the module-level ``app`` (a bench-only
module: the project's own code passes everything in).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.signals import task_success

DONE_ENV = "BENCH_PEERS_CELERY_DONE"
TASK_NAME = "bench_peers.noop"

app = Celery("bench_peers")
app.conf.update(
    # At-least-once as far as the transport allows: ack (= consumer commit) after the run,
    # one unacked message at a time (kombu's Kafka ack commits the consumer's position).
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    # kombu's Kafka transport has no fanout exchange, which remote control and events need.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    # Idle poll wait: only affects how fast an idle worker notices shutdown.
    broker_transport_options={"wait_time_seconds": 1},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name=TASK_NAME)
def noop(i: int) -> int:
    return i


@task_success.connect
def record_done(sender: Any = None, result: Any = None, **_kwargs: Any) -> None:
    path = os.environ.get(DONE_ENV)
    if not path:
        return
    # One small O_APPEND write per task: atomic, so lines never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{result} {time.monotonic():.6f}\n".encode())
    finally:
        os.close(fd)
