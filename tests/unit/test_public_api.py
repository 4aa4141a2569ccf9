"""The names ``qtasks_stream`` exports: what a user needs, pinned (a change here is a change of
the public API, to be made on purpose)."""

from __future__ import annotations

import qtasks_stream
from qtasks_stream import errors

PUBLIC = {
    # the application and its configuration
    "QueueTasks",
    "STAGES",
    "Settings",
    "open_view",
    # declaring tasks
    "Router",
    "TaskHandle",
    "RetryPolicy",
    "TaskContext",
    "current",
    "Interceptor",
    "EmitInput",
    "ExecuteInput",
    "StepInput",
    # reading tasks
    "Task",
    "TaskQuery",
    "TaskPage",
    "ResubmitFilter",
    # code that is not async
    "SyncClient",
    # errors
    "QTasksStreamError",
    "ConfigurationError",
    "UnknownTaskError",
    "TaskNotFoundError",
    "EventLogError",
    "AuthorizationError",
    "SerdeError",
    "RegistryRefusedError",
    "RegistryUnavailableError",
    "ViewStoreError",
    "StaleViewError",
    "TaskError",
    "TaskCancelled",
    "TaskTimeout",
}


def test_the_public_names_are_pinned() -> None:
    assert set(qtasks_stream.__all__) == PUBLIC
    assert len(qtasks_stream.__all__) == len(PUBLIC), "a name is listed twice"
    for name in PUBLIC:
        assert getattr(qtasks_stream, name) is not None, name


def test_every_error_a_caller_may_catch_is_exported_and_under_the_root() -> None:
    exported = {n for n in PUBLIC if isinstance(getattr(qtasks_stream, n), type)}
    for name in exported:
        cls = getattr(qtasks_stream, name)
        if issubclass(cls, Exception):
            assert issubclass(cls, errors.QTasksStreamError), name
