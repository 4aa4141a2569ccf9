"""The demo job: pushes tasks through every stage and reports what happened.

``qtasks-stream demo`` runs it on the embedded default (or on Kafka when configured): most
tasks succeed, one retries and then succeeds, one fails for good, one is cancelled while it
runs, one starts after a delay, a schedule fires every second meanwhile, a chord weighs parcels in
parallel and sums the weights in its callback, and each record the demo writes to a foreign
topic (as another team's service would) starts one triggered task. It prints a summary with
throughput and submit-to-result latency, and the full event history of the task that retried.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from datetime import timedelta
from typing import Any, TextIO

from qtasks_stream.app import QueueTasks
from qtasks_stream.context import TaskContext
from qtasks_stream.ops import audit
from qtasks_stream.records import OutRecord, TopicSpec
from qtasks_stream.state import Task
from qtasks_stream.triggers import Topic
from qtasks_stream.workflows import chord
from qtasks_stream.workflows.canvas import Signature

__all__ = ["ORDERS_TOPIC", "build_demo_app", "run_demo"]

#: The foreign topic of the trigger: written by "another team", so no app prefix.
ORDERS_TOPIC = "demo.shop-orders"
#: Records the demo writes to it, each starting one ``ship`` task.
ORDERS = 3
#: Parcels the chord weighs in parallel before its callback sums them.
PARCELS = 4


class PaymentGatewayDown(ConnectionError):
    """A transient error: charge retries on OSError, and this is one."""


def build_demo_app(app: QueueTasks) -> QueueTasks:
    """Register the demo's tasks on ``app``."""
    attempts: dict[int, int] = {}

    @app.task(name="charge", priority=1, retry=3, retry_on_exc=[OSError], retry_backoff=0.05)
    async def charge(order_id: int) -> dict[str, Any]:
        if order_id == 0:
            # The retry path: the first attempt hits a transient error.
            attempts[order_id] = attempts.get(order_id, 0) + 1
            if attempts[order_id] == 1:
                raise PaymentGatewayDown("gateway timed out, will retry")
        return {"order": order_id, "charged": True}

    @app.task(name="refund", priority=0)
    def refund(order_id: int) -> str:
        raise ValueError(f"order {order_id} was never charged")

    @app.task(name="report", priority=2, echo=True)
    async def report(self: Any, pages: int) -> int:
        ctx: TaskContext = self.ctx
        for page in range(pages):
            ctx.progress({"page": page})
            await asyncio.sleep(0.05)
        return pages

    @app.task(name="reminder", priority=2)
    async def reminder(user: str) -> str:
        return f"reminded {user}"

    @app.task(name="weigh")
    def weigh(parcel: int) -> int:
        return parcel * 2

    @app.task(name="total_weight")
    def total_weight(weights: list[int]) -> int:
        return sum(weights)

    @app.task(name="ship", trigger=Topic(ORDERS_TOPIC, value="json"))
    async def ship(order: dict[str, Any]) -> str:
        return f"shipped order {order['order']}"

    return app


async def _write_orders(app: QueueTasks) -> None:
    """Another team's service writing orders: plain JSON records on a topic of its own."""
    await app.event_log.create_topics([TopicSpec(ORDERS_TOPIC, 1)])
    producer = app.event_log.producer()
    await producer.start()
    try:
        await producer.send(
            [
                OutRecord(ORDERS_TOPIC, f"o{n}".encode(), json.dumps({"order": n}).encode())
                for n in range(1, ORDERS + 1)
            ]
        )
    finally:
        await producer.close()


async def _shipped(app: QueueTasks, limit: float) -> list[Task]:
    """The triggered ``ship`` tasks the view has, waiting up to ``limit`` s for all to end."""
    deadline = time.monotonic() + limit
    found = await app.query(task_name="ship")
    while (
        len(found) < ORDERS or any(t.status != "success" for t in found)
    ) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # the view has no change feed to wait on
        found = await app.query(task_name="ship")
    return found


async def _scheduled_runs(app: QueueTasks, name: str, limit: float) -> list[Task]:
    """The runs of schedule ``name`` the view has, waiting up to ``limit`` s for the first."""
    deadline = time.monotonic() + limit
    found = await app.query(tag=f"schedule:{name}")
    while not found and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # the view has no change feed to wait on
        found = await app.query(tag=f"schedule:{name}")
    return found


def _line(out: TextIO, text: str = "") -> None:
    out.write(text + "\n")


async def run_demo(app: QueueTasks, tasks: int, out: TextIO) -> dict[str, int]:
    """Run the demo on ``app`` (already built with :func:`build_demo_app`); returns counts."""
    if tasks < 5:
        raise ValueError("the demo needs at least 5 tasks to show every path")
    await _write_orders(app)
    async with app:
        # Periodic runs: tick ids derive from the tick, so each second is one task.
        await app.schedule(
            "heartbeat", task="reminder", every=timedelta(seconds=1), args=["on-call"]
        )
        started = time.perf_counter()
        retried = await app.add_task("charge", 0)
        failing = await app.add_task("refund", 7)
        delayed = await app.add_task("reminder", "ada", countdown=0.5)
        long_report = await app.add_task("report", 200)
        assert retried and failing and delayed and long_report
        parcels = await app.run_workflow(
            chord(
                [Signature("weigh", (p,)) for p in range(1, PARCELS + 1)],
                Signature("total_weight"),
            )
        )
        await asyncio.sleep(0.2)
        await app.cancel(long_report.uuid, reason="nobody reads it")

        latencies: list[float] = []

        async def one(order_id: int) -> Task | None:
            t0 = time.perf_counter()
            done = await app.add_task("charge", order_id, timeout=60)
            latencies.append(time.perf_counter() - t0)
            return done

        bulk_started = time.perf_counter()
        bulk = tasks - 4
        # Bounded in flight: a client submitting everything at once measures its own queue.
        window = asyncio.Semaphore(256)

        async def bounded(order_id: int) -> Task | None:
            async with window:
                return await one(order_id)

        results = await asyncio.gather(*(bounded(i) for i in range(1, bulk + 1)))
        bulk_seconds = time.perf_counter() - bulk_started
        finals = [
            await app.wait(t.uuid, timeout=30) for t in (retried, failing, delayed, long_report)
        ]
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.3)  # let the projector catch up before counting the view
        counts = await app.view.counts()

        _line(
            out,
            f"qtasks-stream demo: app {app.name!r}, {tasks} tasks, "
            f"event log {type(app.event_log).__name__}",
        )
        _line(
            out,
            f"  bulk: {bulk} no-op charges in {bulk_seconds:.2f}s = "
            f"{bulk / bulk_seconds:,.0f} tasks/s end to end",
        )
        if latencies:
            ordered = sorted(latencies)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            _line(
                out,
                f"  submit-to-result latency: p50 {statistics.median(ordered) * 1000:.1f} ms,"
                f" p99 {p99 * 1000:.1f} ms",
            )
        _line(
            out,
            f"  all done in {elapsed:.2f}s; view by status: "
            + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
        )
        labels = ("retried then succeeded", "failed", "delayed 0.5s", "cancelled while running")
        for label, final in zip(labels, finals, strict=True):
            status = final.status if final else "still running"
            _line(
                out,
                f"  {label:<24} {final.uuid if final else '?'}  status={status}  "
                f"attempt={final.attempt if final else '?'}",
            )
        unfinished = sum(1 for r in results if r is None or r.status != "success")
        _line(out, f"  bulk tasks not successful: {unfinished}")
        beats = await _scheduled_runs(app, "heartbeat", limit=5.0)
        example = f", e.g. {beats[0].uuid} {' '.join(beats[0].tags)}" if beats else ""
        _line(out, f"  schedule 'heartbeat' (every 1s): {len(beats)} runs so far{example}")
        await app.schedules.delete("heartbeat")
        weighed = await parcels.result(timeout=30)
        outcome = f"status={weighed.status} total={weighed.value}" if weighed else "still running"
        _line(out, f"  chord: {PARCELS} parcels weighed in parallel, then summed: {outcome}")
        shipped = await _shipped(app, limit=5.0)
        _line(
            out,
            f"  trigger {ORDERS_TOPIC!r}: {ORDERS} records written, "
            f"{sum(1 for t in shipped if t.status == 'success')} ship tasks succeeded"
            + "".join(f"; {r}" for r in sorted(str(t.returning) for t in shipped)),
        )
        history = await app.history(retried.uuid)
        _line(out)
        _line(out, f"history of {retried.uuid} (read from the log, as `history` prints it):")
        document = audit.history_document(
            retried.uuid, app.topology.events, history, decode=app.payloads.decode_plain
        )
        for line in audit.format_history(document):
            _line(out, line)
        return counts
