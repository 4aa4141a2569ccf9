"""Pushes completion and progress events to clients that wait, without polling any store.

One consumer reads the events topic from its end, on its own (no group). Only records whose
key is a task somebody waits on, or one this client submitted while listening (see
:meth:`ResultListener.adopt`), are decoded; each waited task's state is folded from its
history in the log (read by the app once the watch is registered, see :meth:`seed`) and what
arrives after, so a client needs no view to learn the outcome. The last final states it
delivered are kept (bounded) for read-your-writes: :meth:`newest`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from qtasks_stream.errors import RecordDecodeError, TaskNotFoundError
from qtasks_stream.eventlog.base import Consumer, EventLog
from qtasks_stream.eventlog.reading import follow
from qtasks_stream.events import TERMINAL_KINDS, Progress, TaskEvent, event_kind
from qtasks_stream.records import Record, TopicPartition
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.codec import RecordCodec
from qtasks_stream.serde.wire import until_registry_answers
from qtasks_stream.state import TaskState, fold

__all__ = ["ResultListener"]

log = logging.getLogger("qtasks_stream.results")
_END = object()
#: Kinds that change what a waiting client gets back; the rest are skipped undecoded.
#: (The client seeds each watch with the task as submitted, or as the view has it.)
_NEEDED = TERMINAL_KINDS | {"Started", "Progress"}
#: Longest wait (seconds) between tries to decode while the schema registry is unavailable:
#: clients are waiting.
_REGISTRY_RETRY_MAX = 5.0
#: Final states remembered for read-your-writes (see :meth:`ResultListener.newest`).
_ENDED_KEPT = 10_000
#: Tasks this client submitted while listening, followed without a waiter so that a later
#: wait needs no read of the log (see :meth:`ResultListener.adopt`); the oldest go first.
_OWN_KEPT = 10_000


class _Watch:
    __slots__ = ("events", "futures", "own", "queues", "readers", "state")

    def __init__(self) -> None:
        self.state: TaskState | None = None
        self.futures: list[asyncio.Future[TaskState]] = []
        #: Of streams: every decoded event, then ``_END`` when the listener closes.
        self.queues: list[asyncio.Queue[Any]] = []
        #: Events seen while a reader of the log catches up (see :meth:`seed`).
        self.events: list[TaskEvent] | None = None
        #: History reads still to end in :meth:`seed` or :meth:`unseed`: while any is, the
        #: events are kept and the watch is not finished from them alone.
        self.readers = 0
        #: Submitted here while the listener listened: its state holds its whole history.
        self.own = False


class ResultListener:
    def __init__(self, event_log: EventLog, serde: Serde, topic: str, partitions: int) -> None:
        self._log = event_log
        self._codec = RecordCodec(serde)
        self._topic = topic
        self._partitions = partitions
        self._watches: dict[bytes, _Watch] = {}
        #: The last final state each recently finished watch reached, newest last.
        self._ended: OrderedDict[str, TaskState] = OrderedDict()
        #: Keys of the adopted watches (``own``), oldest first.
        self._own: OrderedDict[bytes, None] = OrderedDict()
        self._consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._task is not None:
                return
            consumer = self._log.consumer(
                [self._topic], group_id=None, start="latest", pauses=False
            )
            await consumer.start()
            # Pin the start position now: "latest" resolved lazily could skip the outcome of
            # a task submitted right after this returns.
            tps = [TopicPartition(self._topic, p) for p in range(self._partitions)]
            for tp, end in (await consumer.end_offsets(tps)).items():
                consumer.seek(tp, end)
            self._consumer = consumer
            self._task = asyncio.create_task(
                follow(consumer, self._handle, what="the result listener", max_records=1000)
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._consumer is not None:
            await self._consumer.close()
            self._consumer = None
        for watch in self._watches.values():
            for future in watch.futures:
                future.cancel()
            for queue in watch.queues:
                queue.put_nowait(_END)
        self._watches.clear()
        self._own.clear()

    def _watch(self, task_id: str) -> _Watch:
        key = task_id.encode()
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = _Watch()
        return watch

    def expect(
        self, task_id: str, base: TaskState | None = None, *, record: bool = False
    ) -> asyncio.Future[TaskState]:
        """A future of the task's final state; register it before the task can finish.

        With ``record``, events seen from now on are also kept for :meth:`seed`.
        """
        watch = self._watch(task_id)
        if record:
            watch.readers += 1
            if watch.events is None:
                watch.events = []
        if base is not None and watch.state is None:
            watch.state = base
        future: asyncio.Future[TaskState] = asyncio.get_running_loop().create_future()
        # A recording watch waits for its history (``seed``): an outcome already seen may
        # be one a resubmission since re-opened.
        if not record and watch.state is not None and watch.state.final:
            future.set_result(watch.state)
        else:
            watch.futures.append(future)
        return future

    def adopt(self, task_id: str, submitted: TaskState) -> bool:
        """Follow a new task this client is about to submit, so that a later wait needs no
        read of the log: the listener, running since before the submit, sees every event
        after ``submitted``. False (nothing done) when the listener is not running: then
        the listener would miss what happens before it starts."""
        if self._task is None:
            return False
        key = task_id.encode()
        watch = self._watch(task_id)
        if watch.state is None:
            watch.state = submitted
        watch.own = True
        self._own[key] = None
        while len(self._own) > _OWN_KEPT:
            old, _ = self._own.popitem(last=False)
            stale = self._watches.get(old)
            if stale is not None:
                stale.own = False
                self._drop_if_unused(old, stale)
        return True

    def disown(self, task_id: str) -> None:
        """The submit of an adopted task failed: stop following it."""
        key = task_id.encode()
        self._own.pop(key, None)
        watch = self._watches.get(key)
        if watch is not None:
            watch.own = False
            self._drop_if_unused(key, watch)

    def owns(self, task_id: str) -> bool:
        """Whether a wait on ``task_id`` can trust the listener alone (see :meth:`adopt`)."""
        watch = self._watches.get(task_id.encode())
        return watch is not None and watch.own

    def seed(self, task_id: str, history: Sequence[TaskEvent]) -> None:
        """Complete a watch registered (with ``record``) before ``history`` was read from the
        log: fold the history, then what the listener saw meanwhile that it lacks."""
        watch = self._watches.get(task_id.encode())
        if watch is None:
            return  # it ended meanwhile: the futures hold the outcome already
        known = {e.event_id for e in history}
        state: TaskState | None = None
        for event in (*history, *(e for e in watch.events or () if e.event_id not in known)):
            state = fold(state, event)
        self._read_ended(watch)
        if state is not None:
            watch.state = state
            if state.final:
                self._finish(task_id.encode(), watch)

    def unseed(self, task_id: str) -> None:
        """The read meant for :meth:`seed` failed: unless another read is pending, stop
        recording, and finish the watch if what the listener saw ended the task (its other
        waiters would hang otherwise)."""
        key = task_id.encode()
        watch = self._watches.get(key)
        if watch is None:
            return
        self._read_ended(watch)
        if watch.events is None and watch.state is not None and watch.state.final:
            self._finish(key, watch)

    @staticmethod
    def _read_ended(watch: _Watch) -> None:
        """One history read of ``watch`` ended; the last one stops the recording."""
        watch.readers = max(0, watch.readers - 1)
        if watch.readers == 0:
            watch.events = None

    def _finish(self, key: bytes, watch: _Watch) -> None:
        assert watch.state is not None
        for future in watch.futures:
            if not future.done():
                future.set_result(watch.state)
        watch.futures.clear()
        task_id = key.decode()
        self._ended[task_id] = watch.state.copy()
        self._ended.move_to_end(task_id)
        while len(self._ended) > _ENDED_KEPT:
            self._ended.popitem(last=False)
        # Streams end by folding what they receive; they keep the watch until they do.
        self._drop_if_unused(key, watch)

    def newest(self, task_id: str, state: TaskState | None) -> TaskState | None:
        """``state`` (from a view or the log), or the final state a wait in this process
        returned if that one is newer: read-your-writes for ``get``. Newer means a later
        last event; a later event (a resubmission) re-opening the task wins."""
        ended = self._ended.get(task_id)
        if ended is None or (state is not None and state.updated_us >= ended.updated_us):
            return state
        return ended.copy()

    def forget(self, task_id: str, future: asyncio.Future[TaskState]) -> None:
        key = task_id.encode()
        watch = self._watches.get(key)
        if watch is None:
            return
        if future in watch.futures:
            watch.futures.remove(future)
        self._drop_if_unused(key, watch)

    def _drop_if_unused(self, key: bytes, watch: _Watch) -> None:
        if not watch.futures and not watch.queues and not watch.own:
            self._watches.pop(key, None)

    async def stream(
        self,
        task_id: str,
        history: Callable[[], Awaitable[Sequence[TaskEvent]]],
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """Progress items of the task: those in its ``history`` (read once the listener
        watches, so nothing falls between), then new ones, until its state is final."""
        await self.start()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        watch = self._watch(task_id)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        watch.queues.append(queue)
        try:
            async with asyncio.timeout_at(deadline):
                past = await history()
            if not past and queue.empty():
                raise TaskNotFoundError(f"no events for task {task_id} in the log")
            state: TaskState | None = None
            seen: set[str] = set()
            for event in past:
                state = fold(state, event)
                seen.add(event.event_id)
                if isinstance(event.payload, Progress):
                    yield json.loads(event.payload.value)
            while state is None or not state.final:
                try:
                    # Around the get only, not the yields: it would cancel the caller's code.
                    # (Not wait_for: on 3.11 it can swallow a cancel that meets an event.)
                    async with asyncio.timeout_at(deadline):
                        event = await queue.get()
                except TimeoutError:
                    raise TimeoutError(f"task {task_id} did not end within {timeout}s") from None
                if event is _END:
                    return  # the listener closed
                if event.event_id in seen:
                    continue
                seen.add(event.event_id)
                state = fold(state, event)
                if isinstance(event.payload, Progress):
                    yield json.loads(event.payload.value)
        finally:
            if queue in watch.queues:
                watch.queues.remove(queue)
            self._drop_if_unused(task_id.encode(), watch)

    async def _decode(self, rec: Record) -> TaskEvent | None:
        """The event in ``rec``; None (logged) for a bad record. While the registry is
        unavailable it waits and tries again: the record is fine, and dropping it would
        leave its waiters hanging. Ends with the listener (``close`` cancels it)."""
        try:
            return await until_registry_answers(
                lambda: self._codec.event(rec), "the result listener", most=_REGISTRY_RETRY_MAX
            )
        except RecordDecodeError as exc:
            log.warning("result listener skipped an undecodable record: %s", exc)
            return None

    async def _handle(self, records: list[Record]) -> None:
        watches = self._watches
        for rec in records:
            watch = watches.get(rec.key or b"")
            if watch is None or rec.value is None:
                continue
            kind = event_kind(rec.headers)
            if kind is not None and kind not in _NEEDED:
                continue
            event = await self._decode(rec)
            if event is None:
                continue
            watch.state = fold(watch.state, event)
            if watch.events is not None:
                watch.events.append(event)
            for queue in watch.queues:
                queue.put_nowait(event)
            # While a reader of the log catches up (``seed`` pending), the state lacks what
            # only the history has (the submitted arguments): ``seed`` finishes the watch.
            if watch.state.final and watch.events is None:
                self._finish(rec.key or b"", watch)
