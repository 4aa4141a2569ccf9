"""The QTasks 1.7.3 worker of ``bench.bench_peers``: a no-op async task, Redis broker.

    python -m bench.peer_qtasks --redis redis://127.0.0.1:56379/0 --name bench-x

QTasks keeps every task record in Redis and its Kafka broker does not work in 1.7.3 (see
``bench_peers``), so this worker uses QTasks' default broker and storage: Redis. It stops
on SIGINT (QTasks' starter handles KeyboardInterrupt).
"""

from __future__ import annotations

import argparse
import logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True, help="redis://127.0.0.1:PORT/0")
    parser.add_argument("--name", required=True, help="QTasks app name (key prefix)")
    parser.add_argument("--workers", type=int, default=4, help="QTasks num_workers")
    parser.add_argument("--max-tasks", type=int, default=64, help="max_tasks_process")
    args = parser.parse_args()

    from qtasks.asyncio import QueueTasks
    from qtasks.configs import QueueConfig

    config = QueueConfig(
        max_tasks_process=args.max_tasks,
        # INFO logs a line per task; the other systems in the bench log warnings only.
        logs_default_level_server=logging.WARNING,
        logs_default_level_client=logging.WARNING,
    )
    app = QueueTasks(name=args.name, broker_url=args.redis, config=config)

    @app.task(name="noop")
    async def noop(i: int) -> int:
        return i

    app.run_forever(num_workers=args.workers)


if __name__ == "__main__":
    main()
