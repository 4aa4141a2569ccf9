"""qtasks-stream: tasks as an event-sourced pipeline on Apache Kafka."""

from qtasks_stream.app import STAGES, QueueTasks
from qtasks_stream.context import TaskContext, current
from qtasks_stream.errors import (
    AuthorizationError,
    ConfigurationError,
    EventLogError,
    QTasksStreamError,
    RegistryRefusedError,
    RegistryUnavailableError,
    SerdeError,
    StaleViewError,
    TaskCancelled,
    TaskError,
    TaskNotFoundError,
    TaskTimeout,
    UnknownTaskError,
    ViewStoreError,
)
from qtasks_stream.interceptors import EmitInput, ExecuteInput, Interceptor, StepInput
from qtasks_stream.ops.rerun import ResubmitFilter
from qtasks_stream.settings import Settings
from qtasks_stream.state import Task
from qtasks_stream.sync import SyncClient
from qtasks_stream.tasks import RetryPolicy, Router, TaskHandle
from qtasks_stream.views.base import TaskPage, TaskQuery
from qtasks_stream.views.url import open_view

__all__ = [
    "STAGES",
    "AuthorizationError",
    "ConfigurationError",
    "EmitInput",
    "EventLogError",
    "ExecuteInput",
    "Interceptor",
    "QTasksStreamError",
    "QueueTasks",
    "RegistryRefusedError",
    "RegistryUnavailableError",
    "ResubmitFilter",
    "RetryPolicy",
    "Router",
    "SerdeError",
    "Settings",
    "StaleViewError",
    "StepInput",
    "SyncClient",
    "Task",
    "TaskCancelled",
    "TaskContext",
    "TaskError",
    "TaskHandle",
    "TaskNotFoundError",
    "TaskPage",
    "TaskQuery",
    "TaskTimeout",
    "UnknownTaskError",
    "ViewStoreError",
    "current",
    "open_view",
]
