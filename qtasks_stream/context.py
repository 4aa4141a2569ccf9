"""What a running task can see of itself: ``self.ctx`` with ``echo=True``, or :func:`current`."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

from qtasks_stream.errors import TaskCancelled

__all__ = ["TaskContext", "current"]

_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("qtasks_stream_task")


def current() -> TaskContext:
    """The context of the task running in this coroutine, or in the thread where
    :class:`~qtasks_stream.executors.pool.LocalExecutor` runs a sync function or generator.

    Raises:
        LookupError: called outside a task, or in a :class:`ProcessExecutor`'s process
            (the context does not cross processes).
    """
    return _current.get()


class TaskContext:
    """Task id, attempt, logger, cooperative cancellation and progress of one attempt."""

    def __init__(
        self,
        *,
        task_id: str,
        task_name: str,
        attempt: int,
        logger: logging.Logger,
        emit_progress: Callable[[Any], None],
        traceparent: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.task_uuid = task_id  # the QTasks name
        self.task_name = task_name
        self.attempt = attempt
        self.logger = logger
        self._emit_progress = emit_progress
        self.cancel_reason: str | None = None
        #: W3C trace context of this attempt: the task's, or the attempt's own span when a
        #: tracing interceptor runs. Events the attempt emits carry it; user code may
        #: continue the trace from it.
        self.traceparent = traceparent

    def get_logger(self) -> logging.Logger:
        return self.logger

    @property
    def cancelled(self) -> bool:
        """True once a cancel was requested: long loops should check it and stop."""
        return self.cancel_reason is not None

    def raise_if_cancelled(self) -> None:
        if self.cancel_reason is not None:
            raise TaskCancelled(self.cancel_reason)

    def cancel(self, reason: str = "") -> None:
        """End the task now with status ``cancel``."""
        raise TaskCancelled(reason)

    def progress(self, value: Any) -> None:
        """Publish a progress item (a Progress event) that clients can stream."""
        self._emit_progress(value)

    def _request_cancel(self, reason: str) -> None:
        self.cancel_reason = reason or "cancel requested"

    def _bind(self) -> contextvars.Token[TaskContext]:
        return _current.set(self)

    @staticmethod
    def _unbind(token: contextvars.Token[TaskContext]) -> None:
        _current.reset(token)
