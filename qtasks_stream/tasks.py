"""Task definitions, the handles ``@app.task`` returns, routers and retry policy."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict, Unpack, overload

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.events import DEFAULT_QUEUE
from qtasks_stream.executors.base import FunctionKind
from qtasks_stream.triggers.base import Topic

if TYPE_CHECKING:
    from qtasks_stream.app import QueueTasks
    from qtasks_stream.context import TaskContext
    from qtasks_stream.state import Task
    from qtasks_stream.workflows.canvas import Signature

__all__ = ["SUBMIT_OPTIONS", "RetryPolicy", "Router", "TaskDefinition", "TaskHandle", "TaskSelf"]

#: The names ``add_task`` takes for itself (the task name and its keyword options); a task
#: parameter of one of these names could never be passed by keyword.
SUBMIT_OPTIONS = frozenset(
    {
        "task_name",
        "priority",
        "queue",
        "timeout",
        "countdown",
        "eta",
        "idempotency_key",
        "max_time",
        "tags",
    }
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many more attempts an exception earns, and how long to wait before each.

    ``retries`` extra attempts (``retry=2`` means up to 3 executions, as in QTasks). An
    exception earns one when it is an instance of one of ``retry_on`` (subclasses match);
    an empty ``retry_on`` retries any ``Exception``. The wait before attempt ``n+1`` is
    ``min(backoff_max, backoff * 2**(n-1))`` scaled by a random factor in ``[1-jitter, 1]``.
    """

    retries: int = 0
    retry_on: tuple[type[BaseException], ...] = ()
    backoff: float = 1.0
    backoff_max: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ConfigurationError(f"retry must be >= 0, not {self.retries}")
        if self.backoff < 0 or self.backoff_max < 0:
            raise ConfigurationError("retry_backoff and retry_backoff_max must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"retry_jitter must be within 0..1, not {self.jitter}")
        for exc_type in self.retry_on:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise ConfigurationError(f"retry_on_exc holds {exc_type!r}, not an exception class")

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        if attempt > self.retries:
            return False
        if not self.retry_on:
            return isinstance(exc, Exception)
        return isinstance(exc, self.retry_on)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt ``attempt`` (from 1)."""
        base = min(self.backoff_max, self.backoff * 2.0 ** (attempt - 1))
        return float(base * (1 - self.jitter * rng.random()))


def _kind(fn: Callable[..., Any]) -> FunctionKind:
    if inspect.isasyncgenfunction(fn):
        return "asyncgen"
    if inspect.iscoroutinefunction(fn):
        return "async"
    if inspect.isgeneratorfunction(fn):
        return "syncgen"
    return "sync"


@dataclass(frozen=True, slots=True)
class TaskDefinition:
    """A registered task function and its options."""

    name: str
    fn: Callable[..., Any]
    kind: FunctionKind
    priority: int = 0
    echo: bool = False
    max_time: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tags: tuple[str, ...] = ()
    description: str | None = None
    #: The named queue whose lanes and workers run it (see :class:`Topology`).
    queue: str = DEFAULT_QUEUE
    #: The topic whose every record starts this task (see :mod:`qtasks_stream.triggers`).
    trigger: Topic | None = None

    @classmethod
    def build(
        cls,
        fn: Callable[..., Any],
        *,
        name: str | None,
        priority: int,
        echo: bool,
        max_time: float | None,
        retry: int,
        retry_on_exc: Iterable[type[BaseException]] | None,
        retry_backoff: float,
        retry_backoff_max: float,
        retry_jitter: float,
        tags: Sequence[str],
        description: str | None,
        queue: str = DEFAULT_QUEUE,
        trigger: Topic | None = None,
    ) -> TaskDefinition:
        if not callable(fn):
            raise ConfigurationError(f"@task decorates functions, not {fn!r}")
        task_name = name or getattr(fn, "__name__", "")
        if not task_name or not isinstance(task_name, str):
            raise ConfigurationError(f"task name must be a non-empty string, not {task_name!r}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ConfigurationError(f"priority of {task_name!r} must be an int, not {priority!r}")
        if max_time is not None and not max_time > 0:
            raise ConfigurationError(f"max_time of {task_name!r} must be > 0, not {max_time!r}")
        if echo and not inspect.signature(fn).parameters:
            raise ConfigurationError(f"echo=True task {task_name!r} must accept `self` first")
        _refuse_shadowed_parameters(task_name, fn)
        if trigger is not None:
            _check_triggered(task_name, fn, trigger, echo)
        return cls(
            name=task_name,
            fn=fn,
            kind=_kind(fn),
            priority=priority,
            echo=echo,
            max_time=max_time,
            retry=RetryPolicy(
                retries=retry,
                retry_on=tuple(retry_on_exc or ()),
                backoff=retry_backoff,
                backoff_max=retry_backoff_max,
                jitter=retry_jitter,
            ),
            tags=tuple(tags),
            description=description or inspect.getdoc(fn),
            queue=queue,
            trigger=trigger,
        )


def _check_triggered(task_name: str, fn: Callable[..., Any], trigger: Topic, echo: bool) -> None:
    """A triggered task takes the record's value as its first parameter (after ``self``)."""
    if not isinstance(trigger, Topic):
        raise ConfigurationError(
            f"task {task_name!r}: trigger must be a qtasks_stream.triggers.Topic, not {trigger!r}"
        )
    parameters = list(inspect.signature(fn).parameters.values())[1 if echo else 0 :]
    first = parameters[0] if parameters else None
    if first is None or first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        raise ConfigurationError(
            f"task {task_name!r} is triggered by topic {trigger.name!r}: its first parameter "
            "must be positional, to take the record's value"
        )


def _refuse_shadowed_parameters(task_name: str, fn: Callable[..., Any]) -> None:
    """``fetch.add_task(url, timeout=5)`` sets the submit option: a parameter ``timeout``
    would keep its default and the caller would never know, so such a task is refused."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    shadowed = sorted(
        p.name
        for p in parameters
        if p.name in SUBMIT_OPTIONS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )
    if shadowed:
        raise ConfigurationError(
            f"task {task_name!r}: parameter(s) {', '.join(shadowed)} have the names of "
            f"add_task options, so add_task(..., {shadowed[0]}=...) would set the option and "
            f"never reach the function. Rename them (say {shadowed[0]}_s), or make them "
            f"positional-only (put `/` after them) and pass them by position"
        )


class TaskSelf:
    """What an ``echo=True`` task gets as ``self``: its context and a way to add tasks."""

    def __init__(self, ctx: TaskContext, app: QueueTasks) -> None:
        self.ctx = ctx
        self._app = app

    async def add_task(self, task_name: str, *args: Any, **kwargs: Any) -> Task | None:
        return await self._app.add_task(task_name, *args, **kwargs)


class TaskHandle:
    """What ``@app.task`` returns: ``await handle.add_task(...)``; calling it runs the function."""

    def __init__(self, definition: TaskDefinition, app: QueueTasks | None) -> None:
        self.definition = definition
        self._app = app
        self.__name__ = definition.name
        self.__doc__ = definition.description

    @property
    def name(self) -> str:
        return self.definition.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.definition.fn(*args, **kwargs)

    async def add_task(self, *args: Any, **kwargs: Any) -> Task | None:
        """Submit with this task's defaults; options as :meth:`QueueTasks.add_task`."""
        if self._app is None:
            raise ConfigurationError(
                f"task {self.name!r} belongs to a router not yet included in an app"
            )
        return await self._app.add_task(self.name, *args, **kwargs)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A workflow step of this task (see :mod:`qtasks_stream.workflows`): ``args`` come
        after its input, the result of the step before it (none for a first step)."""
        from qtasks_stream.workflows.canvas import Signature

        return Signature(self.name, args, kwargs)


TaskDecorator = Callable[[Callable[..., Any]], TaskHandle]


class TaskOptions(TypedDict, total=False):
    name: str
    priority: int
    echo: bool
    max_time: float | None
    retry: int
    retry_on_exc: Iterable[type[BaseException]] | None
    retry_backoff: float
    retry_backoff_max: float
    retry_jitter: float
    tags: Sequence[str]
    description: str | None
    queue: str
    trigger: Topic | None


class Router:
    """A group of tasks declared apart from the app; ``app.include_router(router)`` adds them."""

    def __init__(self) -> None:
        self.definitions: dict[str, TaskDefinition] = {}
        self.handles: list[TaskHandle] = []

    @overload
    def task(self, name_or_fn: Callable[..., Any], /) -> TaskHandle: ...

    @overload
    def task(
        self, name_or_fn: str | None = None, /, **options: Unpack[TaskOptions]
    ) -> TaskDecorator: ...

    def task(
        self,
        name_or_fn: str | Callable[..., Any] | None = None,
        /,
        **options: Unpack[TaskOptions],
    ) -> TaskHandle | TaskDecorator:
        """Register a task: ``@r.task``, ``@r.task("name")`` or ``@r.task(name=..., ...)``.

        Options: ``name``, ``priority`` (lower runs first), ``echo`` (pass ``self`` with
        ``self.ctx``), ``max_time`` (seconds per attempt), ``retry`` (extra attempts),
        ``retry_on_exc`` (exception classes, subclasses match), ``retry_backoff``,
        ``retry_backoff_max``, ``retry_jitter``, ``tags``, ``description``, ``queue`` (the
        named queue whose workers run it, ``"default"`` by default), ``trigger`` (a
        :class:`~qtasks_stream.triggers.Topic`: one task per record of that topic).
        """
        unknown = set(options) - set(TaskOptions.__annotations__)
        if unknown:
            raise ConfigurationError(f"unknown task options {sorted(unknown)}")
        name = name_or_fn if isinstance(name_or_fn, str) else options.get("name")

        def decorate(fn: Callable[..., Any]) -> TaskHandle:
            definition = TaskDefinition.build(
                fn,
                name=name,
                priority=options.get("priority", 0),
                echo=options.get("echo", False),
                max_time=options.get("max_time"),
                retry=options.get("retry", 0),
                retry_on_exc=options.get("retry_on_exc"),
                retry_backoff=options.get("retry_backoff", 1.0),
                retry_backoff_max=options.get("retry_backoff_max", 60.0),
                retry_jitter=options.get("retry_jitter", 0.5),
                tags=options.get("tags", ()),
                description=options.get("description"),
                queue=options.get("queue", DEFAULT_QUEUE),
                trigger=options.get("trigger"),
            )
            return self._register(definition)

        if callable(name_or_fn):
            return decorate(name_or_fn)
        return decorate

    def _register(self, definition: TaskDefinition) -> TaskHandle:
        if definition.name in self.definitions:
            raise ConfigurationError(f"task {definition.name!r} is already registered")
        self.definitions[definition.name] = definition
        handle = TaskHandle(definition, self._app_or_none())
        self.handles.append(handle)
        return handle

    def _app_or_none(self) -> QueueTasks | None:
        return None
