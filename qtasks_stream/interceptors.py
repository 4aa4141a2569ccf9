"""Interceptors wrap task execution and stage steps; each call takes one input object.

Subclass :class:`Interceptor` and override what you need; the defaults pass through. Adding a
field to an input never breaks an interceptor, which is why there is one input per hook
instead of a list of arguments. Retries, tracing and metrics are built on these.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtasks_stream.events import WorkItem
from qtasks_stream.records import Record

if TYPE_CHECKING:
    from qtasks_stream.context import TaskContext
    from qtasks_stream.tasks import TaskDefinition

__all__ = ["ExecuteInput", "Interceptor", "StepInput", "chain_execute", "chain_step"]


@dataclass(frozen=True, slots=True)
class ExecuteInput:
    """One attempt of a task about to run."""

    definition: TaskDefinition
    item: WorkItem
    ctx: TaskContext
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StepInput:
    """One batch a stage is about to handle."""

    stage: str
    records: Sequence[Record]


ExecuteNext = Callable[[ExecuteInput], Awaitable[Any]]
StepNext = Callable[[StepInput], Awaitable[None]]


class Interceptor:
    async def execute(self, input: ExecuteInput, next: ExecuteNext) -> Any:
        """Around one execution attempt; returns the task's result or raises its error."""
        return await next(input)

    async def step(self, input: StepInput, next: StepNext) -> None:
        """Around one stage step (a polled batch)."""
        await next(input)


def chain_execute(interceptors: Sequence[Interceptor], last: ExecuteNext) -> ExecuteNext:
    """``last`` wrapped so that the first interceptor is outermost; built once per worker."""
    call = last
    for interceptor in reversed(interceptors):
        call = _bind_execute(interceptor, call)
    return call


def _bind_execute(interceptor: Interceptor, next: ExecuteNext) -> ExecuteNext:
    async def call(input: ExecuteInput) -> Any:
        return await interceptor.execute(input, next)

    return call


def chain_step(interceptors: Sequence[Interceptor], last: StepNext) -> StepNext:
    call = last
    for interceptor in reversed(interceptors):
        call = _bind_step(interceptor, call)
    return call


def _bind_step(interceptor: Interceptor, next: StepNext) -> StepNext:
    async def call(input: StepInput) -> None:
        await interceptor.step(input, next)

    return call
