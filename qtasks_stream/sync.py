"""``SyncClient``: the client calls of a :class:`QueueTasks` for code that is not async.

A WSGI view, a script or a notebook cell cannot ``await``. The client runs one event loop in
a background thread and hands every call to the app's own async method there
(``asyncio.run_coroutine_threadsafe``): it adds no behaviour of its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Coroutine, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

from qtasks_stream.app import STAGES, QueueTasks
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.state import Task
from qtasks_stream.tasks import TaskHandle

__all__ = ["SyncClient"]

log = logging.getLogger("qtasks_stream.sync")

T = TypeVar("T")


class SyncClient:
    """Blocking ``add_task``, ``get``, ``wait`` and ``cancel`` on a :class:`QueueTasks`.

    Any number of threads may call it at once. The app then belongs to the client's loop:
    use it through the client only, not also with ``await`` in another loop.

    Args:
        app: the application.
        run_stages: ``False`` (the default) for a client of workers that run elsewhere
            (refused on the embedded in-memory log, which no worker elsewhere can read);
            ``True`` runs all the app's stages in the client's loop, or give stage names.
        close_timeout: how long :meth:`close` waits for the app to close (its running
            attempts get the app's ``shutdown_grace`` within it).

    Close it with :meth:`close` or a ``with`` block. A client left open is closed when it
    is garbage collected or when the interpreter exits (before the interpreter waits for
    threads), so a script that forgets to close it still exits.
    """

    def __init__(
        self,
        app: QueueTasks,
        *,
        run_stages: bool | Iterable[str] = False,
        close_timeout: float | None = None,
    ) -> None:
        stages = list(STAGES) if run_stages is True else list(run_stages) if run_stages else []
        if not stages and isinstance(app.event_log, InMemoryEventLog):
            raise ConfigurationError(
                f"app {app.name!r} runs on the embedded in-memory event log, which no other "
                "process can reach: its tasks would never run. Pass run_stages=True, or "
                "give the app a Kafka event log its workers share"
            )
        self.app = app
        timeout = close_timeout if close_timeout is not None else app.shutdown_grace + 5.0
        self._loop = _LoopThread(app, timeout)
        # The finalizer holds the loop thread, never the client: an unreferenced client is
        # collected and its loop closed. Registered with threading too, since the
        # interpreter joins the executors' threads before it runs atexit hooks.
        self._finalizer = weakref.finalize(self, self._loop.close)
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(self._finalizer)
        if stages:
            try:
                self._loop.call(app.start(stages))
            except BaseException:
                self.close()
                raise

    def add_task(self, task: str | TaskHandle, *args: Any, **options: Any) -> Task | None:
        """:meth:`QueueTasks.add_task`; ``task`` is a name or what ``@app.task`` returned."""
        name = task.name if isinstance(task, TaskHandle) else task
        return self._loop.call(self.app.add_task(name, *args, **options))

    def get(self, uuid: str, as_of: datetime | float | str | None = None) -> Task | None:
        """:meth:`QueueTasks.get`."""
        return self._loop.call(self.app.get(uuid, as_of=as_of))

    def wait(self, uuid: str, timeout: float | None = None) -> Task | None:
        """:meth:`QueueTasks.wait`: blocks this thread only."""
        return self._loop.call(self.app.wait(uuid, timeout=timeout))

    def cancel(self, uuid: str, reason: str = "") -> None:
        """:meth:`QueueTasks.cancel`."""
        self._loop.call(self.app.cancel(uuid, reason))

    def close(self) -> None:
        """Close the app (its stages too) and stop the loop thread; later calls fail."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _LoopThread:
    """One event loop in a daemon thread, and the way to close it with the app inside."""

    def __init__(self, app: QueueTasks, close_timeout: float) -> None:
        self._app = app
        self._close_timeout = close_timeout
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._lock = threading.Lock()
        # A daemon: should closing hang past its bound, the interpreter can still exit.
        self._thread = threading.Thread(
            target=self._run, name=f"qtasks-sync-{app.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            # What is left (say, a waiter's timer) is cancelled, as asyncio.run does.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise ConfigurationError(
                "a SyncClient was called from its own event loop (a task function?): "
                "it would wait for itself; await the app's methods there instead"
            )
        with self._lock:
            if self._closed:
                coro.close()
                raise ConfigurationError("this SyncClient is closed")
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # KeyboardInterrupt in the caller: do not leave the call running
            raise

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if threading.current_thread() is self._thread:
            self._loop.stop()  # collected inside its own loop: nothing can be awaited here
            return
        closing = asyncio.run_coroutine_threadsafe(self._app.close(), self._loop)
        try:
            closing.result(self._close_timeout)
        except Exception as exc:
            closing.cancel()
            log.warning("SyncClient of app %s: closing the app failed: %r", self._app.name, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._close_timeout)
