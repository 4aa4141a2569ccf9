"""The executor contract: run one call of a user function to its end."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Call", "Executor", "FunctionKind"]

FunctionKind = Literal["async", "sync", "asyncgen", "syncgen"]


@dataclass(frozen=True, slots=True)
class Call:
    fn: Callable[..., Any]
    kind: FunctionKind
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: What log lines call it (the task, its id and attempt).
    label: str = ""
    #: Called in the event loop when the function starts to run, after any wait for a
    #: thread or a process: the attempt's ``max_time`` counts from there.
    on_start: Callable[[], None] | None = None


class Executor(ABC):
    async def start(self) -> None:
        """Start pools; a no-op by default."""

    async def close(self) -> None:
        """Stop pools; a no-op by default."""

    @property
    def abandoned(self) -> int:
        """Calls still running after their attempt ended (timeout or cancel), each holding
        a thread or process; 0 where the executor stops such calls (the default)."""
        return 0

    @abstractmethod
    async def run(self, call: Call, on_item: Callable[[Any], None]) -> Any:
        """Run ``call``; a generator's items go to ``on_item`` and its result is their list.

        Cancelling the awaiting coroutine abandons the call (async functions are cancelled;
        how far a running thread or process is stopped depends on the executor). A call
        that never started does not start.
        """
