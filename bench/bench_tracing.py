"""What telemetry costs: no-op task throughput on the embedded default, telemetry off vs on.

Same run, same app shape, alternating rounds so drift hits both: ``off`` installs no
interceptor (the zero-cost path), ``tracing`` installs TracingInterceptor with a
BatchSpanProcessor into an exporter that drops spans (all span work is done, no I/O), and
``tracing+metrics`` adds MetricsInterceptor with an in-memory reader. Prints tasks/s per
round (and the garbage collector's share of its CPU), the median per mode and its ratio to
``off``; then what one span costs the SDK and what one of the interceptor's light spans
costs, recorded and with a sampler.

All modes run in one process, so each run starts from a collected heap with what survives
frozen (``gc.freeze``), and each round starts at another mode: otherwise a run pays for the
full collections of the heap the runs before it left behind, which moved a mode's CPU per
task by 100 us and more (most of what the 1-in-10 sampler seemed to cost), depending on its
place in the order.

    python -m bench.bench_tracing --tasks 3000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind

from qtasks_stream import QueueTasks
from qtasks_stream.telemetry import MetricsInterceptor, TracingInterceptor
from qtasks_stream.telemetry.spans import LightSpan, LightTracer

MODES = ("off", "tracing", "tracing 1-in-10", "tracing+metrics")
#: Targets (issue 16): CPU per task with tracing on, as a share of tracing off.
TARGETS = {"tracing": 0.85, "tracing 1-in-10": 0.97}


class _Counting(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


class _GcClock:
    """CPU time the garbage collector takes, from its callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.seconds += time.process_time() - self._started


async def run(mode: str, tasks: int, window: int) -> tuple[float, float, int, float]:
    """tasks/s, CPU microseconds per task (this process, every thread), spans exported and
    the garbage collector's CPU microseconds per task."""
    app = QueueTasks("bench", concurrency=64)
    exporter = _Counting()
    sampled = mode == "tracing 1-in-10"
    tracer_provider = (
        TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1))) if sampled else TracerProvider()
    )
    # A queue large enough that the bench measures span work, not dropped spans.
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=1 << 18))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    if mode != "off":
        app.add_interceptor(TracingInterceptor(tracer_provider, messaging_system="qtasks.memory"))
    if mode == "tracing+metrics":
        app.add_interceptor(MetricsInterceptor(meter_provider))

    @app.task(name="noop")
    async def noop(i: int) -> int:
        return i

    slots = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with slots:
            done = await app.add_task("noop", i, timeout=120)
            assert done is not None and done.status == "success", done

    async with app:
        await app.add_task("noop", -1, timeout=30)  # warm up every stage
        gc.collect()
        gc.freeze()
        clock = _GcClock()
        gc.callbacks.append(clock)
        try:
            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(one(i) for i in range(tasks)))
            elapsed = time.perf_counter() - started
            # Spans still queued are exported by the processor's thread: count that work too.
            tracer_provider.force_flush()
            cpu = time.process_time() - cpu
        finally:
            gc.callbacks.remove(clock)
            gc.unfreeze()
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return tasks / elapsed, cpu / tasks * 1e6, exporter.spans, clock.seconds / tasks * 1e6


def span_cost(sampler: Sampler | None, light: bool = False, spans: int = 20_000) -> float:
    """Microseconds to start and end one producer span with the 11 attributes an event's
    span carries, into a batch processor (the recorded case) or ``sampler``: by the SDK, or
    as the interceptor's light spans (qtasks_stream.telemetry.spans) with ``light``."""
    provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Counting(), max_queue_size=1 << 18))
    tracer = provider.get_tracer("bench")
    fast = LightTracer.of(provider, tracer, 32)
    assert fast is not None and fast.active()
    attributes = {f"qtasks.bench.attribute{i}": "value" for i in range(11)}
    started = time.process_time()
    if light:
        for _ in range(spans):
            span = fast.start("Scheduled noop", None, SpanKind.PRODUCER)
            if isinstance(span, LightSpan):
                span.adopt(dict(attributes))
            span.end()
    else:
        for _ in range(spans):
            tracer.start_span("Scheduled noop", kind=SpanKind.PRODUCER, attributes=attributes).end()
    # The batch processor's thread exports what is queued: its CPU counts too.
    provider.force_flush()
    elapsed = time.process_time() - started
    provider.shutdown()
    return elapsed / spans * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=256, help="tasks in flight per client")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpus: dict[str, list[float]] = {mode: [] for mode in MODES}
    print(f"embedded default, {args.tasks} no-op tasks, {args.window} in flight")
    for round_ in range(args.rounds):
        # Each round starts at another mode, so none always runs first.
        for mode in MODES[round_ % len(MODES) :] + MODES[: round_ % len(MODES)]:
            rate, cpu_us, spans, gc_us = asyncio.run(run(mode, args.tasks, args.window))
            rates[mode].append(rate)
            cpus[mode].append(cpu_us)
            print(
                f"  round {round_ + 1}  {mode:<16} {rate:8.0f} tasks/s  {cpu_us:6.0f} us CPU/task"
                f" ({gc_us:4.0f} in gc)  {spans:7d} spans"
            )
    # The ratios the targets name are of CPU per task (off / mode: a throughput ratio on a
    # CPU-bound pipeline), which other load on a shared box moves far less than wall time.
    base, base_cpu = statistics.median(rates["off"]), statistics.median(cpus["off"])
    for mode in MODES:
        median, cpu_us = statistics.median(rates[mode]), statistics.median(cpus[mode])
        ratio = base_cpu / cpu_us
        target = TARGETS.get(mode)
        verdict = (
            ""
            if target is None
            else f"  target >= {target}: " + ("met" if ratio >= target else "NOT met")
        )
        print(
            f"{mode:<16} median {median:8.0f} tasks/s (wall ratio {median / base:4.2f})  "
            f"{cpu_us:6.0f} us CPU/task, CPU ratio to off {ratio:4.2f}{verdict}"
        )
    ratio = ParentBased(TraceIdRatioBased(0.1))
    for light in (False, True):
        print(
            f"one {'light span' if light else 'span in the SDK'}: "
            f"{span_cost(None, light):.1f} us CPU recorded, "
            f"{span_cost(ratio, light):.1f} us at a 1-in-10 sampler, "
            f"{span_cost(ALWAYS_OFF, light):.1f} us sampled out"
        )


if __name__ == "__main__":
    main()
