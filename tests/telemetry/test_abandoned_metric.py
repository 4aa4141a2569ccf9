"""The metric of threads left running after their attempt ended (``qtasks.worker.abandoned``)."""

from __future__ import annotations

import threading

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from qtasks_stream import QueueTasks
from qtasks_stream.executors.pool import LocalExecutor
from qtasks_stream.telemetry import MetricsInterceptor
from tests.e2ehelpers import eventually

LIMIT = 10.0


def abandoned(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        str((point.attributes or {}).get("qtasks.worker.id")): int(point.value)  # type: ignore[union-attr]
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "qtasks.worker.abandoned"
        for point in metric.data.data_points
    }


async def test_a_timed_out_sync_task_shows_as_an_abandoned_thread_until_it_returns() -> None:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    release = threading.Event()
    app = QueueTasks("abandoned", executor=LocalExecutor(threads=2))
    app.add_interceptor(MetricsInterceptor(meter_provider))

    @app.task(max_time=0.2)
    def hog() -> None:
        release.wait(LIMIT)

    try:
        async with app:
            ended = await app.add_task("hog", timeout=LIMIT)
            assert ended is not None and ended.status == "timeout"
            worker = ended.worker_id
            assert abandoned(reader) == {worker: 1}
            release.set()
            await eventually(
                lambda: abandoned(reader), lambda v: v == {worker: 0}, what="0", limit=LIMIT
            )
    finally:
        release.set()
        meter_provider.shutdown()
