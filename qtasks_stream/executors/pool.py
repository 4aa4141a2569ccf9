"""Executors: async functions in the loop and sync ones in threads, or sync ones in processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.executors.base import Call, Executor

__all__ = ["LocalExecutor", "ProcessExecutor"]

log = logging.getLogger("qtasks_stream.executor")

_DONE = object()


def _next_item(iterator: Iterator[Any]) -> Any:
    return next(iterator, _DONE)


class LocalExecutor(Executor):
    """Coroutines run in the event loop; sync functions and generators in a thread pool.

    A function in a thread cannot be stopped from outside: when its attempt ends first
    (``max_time``, or a cancel) the attempt's outcome is recorded at once, the thread runs
    on until the function returns, and whatever it returns is discarded. Such threads are
    counted in :attr:`abandoned` (and logged, naming the task); while they run the pool has
    fewer threads, and calls wait for a free one (their ``max_time`` starts when they do).
    Use :class:`ProcessExecutor` when a hard stop matters.
    """

    def __init__(self, *, threads: int = 8) -> None:
        if threads < 1:
            raise ConfigurationError(f"threads must be >= 1, not {threads}")
        self.threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._abandoned = 0
        self._abandoned_total = 0

    @property
    def abandoned(self) -> int:
        """Threads still running a function whose attempt has ended (timed out or cancelled)."""
        return self._abandoned

    @property
    def abandoned_total(self) -> int:
        """Functions left running in a thread after their attempt ended, since creation."""
        return self._abandoned_total

    async def start(self) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix="qtasks-task"
            )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def run(self, call: Call, on_item: Callable[[Any], None]) -> Any:
        if call.kind in ("async", "asyncgen"):
            if call.on_start is not None:
                call.on_start()
            if call.kind == "async":
                return await call.fn(*call.args, **call.kwargs)
            items = []
            async for item in call.fn(*call.args, **call.kwargs):
                on_item(item)
                items.append(item)
            return items
        await self.start()
        # The thread runs in a copy of the caller's context, so current() works there as in
        # a coroutine; a generator's steps share one copy, as they share one frame.
        context = contextvars.copy_context()
        if call.kind == "sync":
            fn = functools.partial(context.run, call.fn, *call.args, **call.kwargs)
            return await self._in_thread(call, fn, call.on_start)
        iterator = iter(call.fn(*call.args, **call.kwargs))
        items = []
        step = functools.partial(context.run, _next_item, iterator)
        on_start = call.on_start
        while (item := await self._in_thread(call, step, on_start)) is not _DONE:
            on_start = None
            on_item(item)
            items.append(item)
        return items

    async def _in_thread(
        self, call: Call, fn: Callable[[], Any], on_start: Callable[[], None] | None
    ) -> Any:
        loop = asyncio.get_running_loop()
        state = _ThreadCall()

        def work() -> Any:
            with self._lock:
                if state.gave_up:  # its attempt ended while it waited for a thread
                    return None
                state.started = True
            if on_start is not None:
                loop.call_soon_threadsafe(on_start)
            try:
                return fn()
            finally:
                with self._lock:
                    state.finished = True
                    if state.abandoned_at is not None:
                        self._abandoned -= 1
                if state.abandoned_at is not None:
                    log.warning(
                        "%s: its function returned %.1fs after the attempt had ended; "
                        "what it returned is discarded",
                        call.label or call.fn,
                        time.monotonic() - state.abandoned_at,
                    )

        future = loop.run_in_executor(self._pool, work)
        try:
            return await future
        except asyncio.CancelledError:
            with self._lock:
                state.gave_up = True
                if state.started and not state.finished:
                    state.abandoned_at = time.monotonic()
                    self._abandoned += 1
                    self._abandoned_total += 1
                held = self._abandoned if state.abandoned_at is not None else 0
            if held:
                log.warning(
                    "%s: the attempt ended (timeout or cancel) while its sync function ran; "
                    "a thread cannot be stopped, so it runs on until the function returns "
                    "(%d of %d threads held so). ProcessExecutor stops such calls hard",
                    call.label or call.fn,
                    held,
                    self.threads,
                )
            raise


class _ThreadCall:
    """Where one thread call stands; read and written under the executor's lock."""

    __slots__ = ("abandoned_at", "finished", "gave_up", "started")

    def __init__(self) -> None:
        self.started = False
        self.finished = False
        self.gave_up = False
        self.abandoned_at: float | None = None


class ProcessExecutor(Executor):
    """Sync functions in worker processes, for CPU-bound work and hard timeouts.

    Functions must be importable by name (module level) and their arguments and results
    picklable. On timeout or cancel the pool is torn down (killing the runaway process) and
    rebuilt; calls that were running beside it in that pool are run again on the new pool
    (they did nothing wrong; their own ``max_time`` keeps counting). A call whose own
    process dies fails with ``BrokenProcessPool``, handled as a failed attempt.
    """

    def __init__(self, *, processes: int = 2) -> None:
        if processes < 1:
            raise ConfigurationError(f"processes must be >= 1, not {processes}")
        self._processes = processes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        #: Pools this executor killed: a call that breaks with one of them is run again.
        self._killed: weakref.WeakSet[concurrent.futures.ProcessPoolExecutor] = weakref.WeakSet()
        self._free = asyncio.Semaphore(processes)

    async def start(self) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(self._processes)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        # A semaphore belongs to the loop it first waited in; a restarted app may run in another.
        self._free = asyncio.Semaphore(self._processes)

    async def run(self, call: Call, on_item: Callable[[Any], None]) -> Any:
        if call.kind != "sync":
            raise ConfigurationError(
                f"ProcessExecutor runs plain sync functions, not {call.kind} ones "
                f"({getattr(call.fn, '__qualname__', call.fn)})"
            )
        # No more calls in the pool than it has processes: a submitted call starts at once,
        # so on_start (and max_time) means running, not waiting in the pool's queue.
        async with self._free:
            if call.on_start is not None:
                call.on_start()
            while True:
                await self.start()
                pool = self._pool
                assert pool is not None
                future = pool.submit(call.fn, *call.args, **call.kwargs)
                try:
                    return await asyncio.wrap_future(future)
                except BrokenProcessPool:
                    if pool in self._killed:
                        continue
                    # Its own process died: later calls need a fresh pool, this one is broken.
                    if self._pool is pool:
                        self._pool = None
                    raise
                except asyncio.CancelledError:
                    me = asyncio.current_task()
                    if future.cancelled() and pool in self._killed and me and not me.cancelling():
                        continue  # still queued when another call's timeout killed the pool
                    if not future.done():
                        self._kill(pool)
                    raise

    def _kill(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        # The stdlib pool cannot stop one call; terminating its processes is the only hard stop.
        # Two calls of one pool may time out together: the first kills it, the second finds
        # it killed (its processes gone, ``_processes`` already None) and has nothing to do.
        if pool in self._killed:
            return
        self._killed.add(pool)
        if self._pool is pool:
            self._pool = None
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
