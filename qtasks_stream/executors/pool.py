"""Executors: async functions in the loop and sync ones in threads, or sync ones in processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.executors.base import Call, Executor

__all__ = ["LocalExecutor", "ProcessExecutor"]

_DONE = object()


def _next_item(iterator: Iterator[Any]) -> Any:
    return next(iterator, _DONE)


class LocalExecutor(Executor):
    """Coroutines run in the event loop; sync functions and generators in a thread pool.

    A sync call cannot be stopped from outside: on timeout or cancel its result is dropped
    but the thread runs on. Use :class:`ProcessExecutor` when a hard stop matters.
    """

    def __init__(self, *, threads: int = 8) -> None:
        if threads < 1:
            raise ConfigurationError(f"threads must be >= 1, not {threads}")
        self._threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix="qtasks-task"
            )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def run(self, call: Call, on_item: Callable[[Any], None]) -> Any:
        if call.kind == "async":
            return await call.fn(*call.args, **call.kwargs)
        if call.kind == "asyncgen":
            items = []
            async for item in call.fn(*call.args, **call.kwargs):
                on_item(item)
                items.append(item)
            return items
        await self.start()
        loop = asyncio.get_running_loop()
        # The thread runs in a copy of the caller's context, so current() works there as in
        # a coroutine; a generator's steps share one copy, as they share one frame.
        context = contextvars.copy_context()
        if call.kind == "sync":
            fn = functools.partial(context.run, call.fn, *call.args, **call.kwargs)
            return await loop.run_in_executor(self._pool, fn)
        iterator = iter(call.fn(*call.args, **call.kwargs))
        items = []
        step = functools.partial(context.run, _next_item, iterator)
        while (item := await loop.run_in_executor(self._pool, step)) is not _DONE:
            on_item(item)
            items.append(item)
        return items


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

    async def start(self) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(self._processes)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def run(self, call: Call, on_item: Callable[[Any], None]) -> Any:
        if call.kind != "sync":
            raise ConfigurationError(
                f"ProcessExecutor runs plain sync functions, not {call.kind} ones "
                f"({getattr(call.fn, '__qualname__', call.fn)})"
            )
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
