"""Every error qtasks-stream raises derives from :class:`QTasksStreamError`.

The tree::

    QTasksStreamError
    ├── ConfigurationError        bad options at a call site, unknown task, unserializable args
    │   └── UnknownTaskError
    ├── EventLogError             the event log (in-memory or Kafka) failed
    │   ├── TopicConfigError      an existing topic contradicts what the app needs
    │   ├── FencedError           this producer or consumer generation was superseded
    │   └── AuthorizationError    the cluster refused: a missing ACL, or failed authentication
    ├── SerdeError                encoding or decoding a record
    │   ├── SchemaError           a schema is invalid, unknown or incompatible
    │   └── RecordDecodeError     a record read from the log is not the value its topic holds
    ├── RegistryUnavailableError  the schema registry did not answer (retry later; the
    │   │                         record is fine, so it is not dead-lettered)
    │   └── RegistryRefusedError  it answered 401/403: no or wrong credentials, or a role
    │                             that may not do this
    ├── ViewStoreError            the materialized view failed
    ├── DevEnvError               the local development services (`qtasks-stream dev`)
    └── TaskError                 raised inside user code to steer the task
        ├── TaskCancelled         cooperative cancellation (``ctx.cancel`` or a cancel request)
        └── TaskTimeout           the attempt exceeded ``max_time``

Errors from third-party clients are mapped at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "AuthorizationError",
    "ConfigurationError",
    "DevEnvError",
    "EventLogError",
    "FencedError",
    "QTasksStreamError",
    "RecordDecodeError",
    "RegistryRefusedError",
    "RegistryUnavailableError",
    "SchemaError",
    "SerdeError",
    "StaleViewError",
    "TaskCancelled",
    "TaskError",
    "TaskTimeout",
    "TopicConfigError",
    "UnknownTaskError",
    "ViewStoreError",
]


class QTasksStreamError(Exception):
    """Root of every qtasks-stream error."""


class ConfigurationError(QTasksStreamError, ValueError):
    """An option, argument or task definition is not acceptable."""


class UnknownTaskError(ConfigurationError, LookupError):
    """No task is registered under the given name."""


class TaskNotFoundError(QTasksStreamError, LookupError):
    """The event log has no event of the given task id."""


class EventLogError(QTasksStreamError):
    """The event log could not do what was asked."""


class TopicConfigError(EventLogError):
    """An existing topic's settings contradict what the application needs."""


class FencedError(EventLogError):
    """A newer member owns this work now; the caller must stop and let it go."""


class AuthorizationError(EventLogError, PermissionError):
    """The cluster refused this principal: it lacks ``operation`` on ``resource`` (an ACL is
    missing), or it could not authenticate at all (``operation`` is then ``AUTHENTICATE``).

    Not retried: waiting does not grant an ACL. :meth:`lacks` writes a message naming all
    three, e.g. ``User:app lacks WRITE on topic qtasks.shop.events``.
    """

    def __init__(
        self, message: str, *, principal: str = "", operation: str = "", resource: str = ""
    ) -> None:
        super().__init__(message)
        self.principal = principal
        self.operation = operation
        self.resource = resource

    @classmethod
    def lacks(
        cls, principal: str, operation: str, resource: str, detail: str = ""
    ) -> AuthorizationError:
        message = f"{principal} lacks {operation} on {resource}"
        return cls(
            f"{message} ({detail})" if detail else message,
            principal=principal,
            operation=operation,
            resource=resource,
        )


class SerdeError(QTasksStreamError):
    """A value could not be encoded or decoded."""


class SchemaError(SerdeError):
    """A schema is invalid, unknown to the registry, or incompatible."""


class RecordDecodeError(SerdeError):
    """A record read from the log could not be decoded and converted into what its topic
    holds; the message names the record (``topic/partition/offset``) and the cause, which is
    also chained as ``__cause__``."""

    def __init__(self, message: str, *, topic: str, partition: int, offset: int) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class RegistryUnavailableError(QTasksStreamError):
    """The schema registry could not be reached or failed (not a refusal of the schema).

    Not a :class:`SerdeError` on purpose: stages dead-letter records they cannot decode,
    and a record whose writer schema cannot be fetched *now* is not a bad record. A stage
    that meets it fails its session and redoes the batch after a backoff.
    """


class RegistryRefusedError(RegistryUnavailableError, PermissionError):
    """The schema registry refused this client: 401 (no or wrong credentials) or 403 (the
    user's role may not do this). The message names the registry, the user and what to set,
    never the password.

    A :class:`RegistryUnavailableError` because the record is fine: a stage that meets it
    backs off and tries again (a fixed credential or role lets it go on), never
    dead-letters. Registering schemas at start raises it.
    """

    def __init__(self, message: str, *, url: str = "", user: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.url = url
        self.user = user
        self.status = status


class ViewStoreError(QTasksStreamError):
    """The view store could not apply or answer."""


class StaleViewError(ViewStoreError):
    """A view has applied positions past the end of the log it follows: the log was reset,
    or its topic deleted and recreated, so the view describes another log."""


class DevEnvError(QTasksStreamError):
    """A local development service could not be prepared, started or stopped."""


class TaskError(QTasksStreamError):
    """Raised from inside a task to steer its outcome."""


class TaskCancelled(TaskError):
    """The task was cancelled; it ends with status ``cancel``."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "cancelled")
        self.reason = reason


class TaskTimeout(TaskError, TimeoutError):
    """The attempt ran longer than ``max_time``."""
