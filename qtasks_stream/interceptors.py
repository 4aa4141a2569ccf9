"""Interceptors wrap task execution, stage steps and emitted records; one input object each.

Subclass :class:`Interceptor` and override what you need; the defaults pass through. Adding a
field to an input never breaks an interceptor, which is why there is one input per hook
instead of a list of arguments. Retries, tracing and metrics are built on these.

An interceptor may call ``next`` with a changed copy of its input
(``dataclasses.replace``): that is how tracing stamps its trace context on an event before
it is encoded. Hooks an interceptor does not override are left out of the chain, so an app
without interceptors pays nothing for them; so is an interceptor's ``emit`` for the stages
it names in ``passes_emits_of``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtasks_stream.events import WorkItem
from qtasks_stream.records import Record, TopicPartition

if TYPE_CHECKING:
    from qtasks_stream.context import TaskContext
    from qtasks_stream.executors.base import Executor
    from qtasks_stream.tasks import TaskDefinition

__all__ = [
    "EmitInput",
    "ExecuteInput",
    "Interceptor",
    "SkipInput",
    "StepInput",
    "chain_emit",
    "chain_execute",
    "chain_step",
]


@dataclass(frozen=True, slots=True)
class ExecuteInput:
    """One attempt of a task about to run."""

    definition: TaskDefinition
    item: WorkItem
    ctx: TaskContext
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: The lane record the work item came from (None where an attempt runs without one).
    record: Record | None = None
    #: The worker's consumer group and its id in events (``source``).
    group: str = ""
    worker_id: str = ""
    #: Where the attempt runs (for metrics such as its count of abandoned calls).
    executor: Executor | None = None


async def _no_lag() -> Mapping[TopicPartition, int]:
    return {}


@dataclass(frozen=True, slots=True)
class StepInput:
    """One batch a stage is about to handle."""

    stage: str
    records: Sequence[Record]
    #: The stage's consumer group.
    group: str = ""
    #: Records between the stage's read position and the end, per owned partition. It asks
    #: the log (a broker round trip on Kafka): call it now and then, not every step.
    measure_lag: Callable[[], Awaitable[Mapping[TopicPartition, int]]] = _no_lag


@dataclass(frozen=True, slots=True)
class EmitInput:
    """A value a stage (or the client, stage ``"client"``) is about to write to ``topic``.

    ``value`` is a :class:`~qtasks_stream.events.TaskEvent`, a ``WorkItem`` or a
    ``ControlCommand``; ``origin`` the consumed record it answers, if any.
    """

    stage: str
    topic: str
    key: str
    value: Any
    origin: Record | None = None


@dataclass(frozen=True, slots=True)
class SkipInput:
    """A consumed record a stage chose to act on not at all (a trigger's filter said no)."""

    stage: str
    task_name: str
    record: Record


ExecuteNext = Callable[[ExecuteInput], Awaitable[Any]]
StepNext = Callable[[StepInput], Awaitable[None]]
EmitNext = Callable[[EmitInput], None]


class Interceptor:
    #: Stages whose emits :meth:`emit` leaves alone: their emits skip this interceptor (a
    #: stage no interceptor wants to see emit keeps its direct path, no input built).
    passes_emits_of: frozenset[str] = frozenset()

    async def execute(self, input: ExecuteInput, next: ExecuteNext) -> Any:
        """Around one execution attempt; returns the task's result or raises its error."""
        return await next(input)

    async def step(self, input: StepInput, next: StepNext) -> None:
        """Around one stage step (a polled batch)."""
        await next(input)

    def emit(self, input: EmitInput, next: EmitNext) -> None:
        """Around queuing one output (synchronous: stages emit from plain functions).

        For stages the value becomes visible when the runner commits; for the client it is
        sent right after ``next`` returns.
        """
        next(input)

    def skipped(self, input: SkipInput) -> None:
        """Told of a record a stage skipped on purpose (observe only: nothing is written)."""


def _overriding(
    interceptors: Sequence[Interceptor], hook: str, stage: str | None = None
) -> list[Interceptor]:
    base = getattr(Interceptor, hook)
    return [
        i
        for i in interceptors
        if getattr(type(i), hook) is not base
        and not (hook == "emit" and stage in i.passes_emits_of)
    ]


def wants(interceptors: Sequence[Interceptor], hook: str, stage: str | None = None) -> bool:
    """Whether any interceptor overrides ``hook`` (``execute``, ``step`` or ``emit``; for
    ``emit``, one that wants the emits of ``stage``)."""
    return bool(_overriding(interceptors, hook, stage))


def chain_execute(interceptors: Sequence[Interceptor], last: ExecuteNext) -> ExecuteNext:
    """``last`` wrapped so that the first interceptor is outermost; built once per worker."""
    call = last
    for interceptor in reversed(_overriding(interceptors, "execute")):
        call = _bind_execute(interceptor, call)
    return call


def _bind_execute(interceptor: Interceptor, next: ExecuteNext) -> ExecuteNext:
    async def call(input: ExecuteInput) -> Any:
        return await interceptor.execute(input, next)

    return call


def chain_step(interceptors: Sequence[Interceptor], last: StepNext) -> StepNext:
    call = last
    for interceptor in reversed(_overriding(interceptors, "step")):
        call = _bind_step(interceptor, call)
    return call


def _bind_step(interceptor: Interceptor, next: StepNext) -> StepNext:
    async def call(input: StepInput) -> None:
        await interceptor.step(input, next)

    return call


def chain_emit(
    interceptors: Sequence[Interceptor], last: EmitNext, stage: str | None = None
) -> EmitNext:
    """``last`` wrapped in the interceptors that want the emits of ``stage``."""
    call = last
    for interceptor in reversed(_overriding(interceptors, "emit", stage)):
        call = _bind_emit(interceptor, call)
    return call


def _bind_emit(interceptor: Interceptor, next: EmitNext) -> EmitNext:
    def call(input: EmitInput) -> None:
        interceptor.emit(input, next)

    return call
