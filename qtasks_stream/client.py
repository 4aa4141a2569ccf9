"""``TaskClient``: what a process that submits and reads tasks does, and all it needs.

Submit (``add_task``), wait, stream, get, query, cancel, resubmit and read a task's history.
Its components (event log, serde, payloads, view, result listener) are wired by
:class:`~qtasks_stream.app.QueueTasks`, which is a client; a client-only process (one that
starts no stage) builds no stage machinery.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from qtasks_stream.errors import (
    ConfigurationError,
    EventLogError,
    QTasksStreamError,
    RecordDecodeError,
    UnknownTaskError,
)
from qtasks_stream.eventlog.base import EventLog, Producer
from qtasks_stream.eventlog.coalesce import CoalescedSends
from qtasks_stream.eventlog.partitioning import murmur2_partition
from qtasks_stream.eventlog.reading import read_records
from qtasks_stream.events import (
    ROUTED_HEADER,
    CancelRequested,
    Scheduled,
    Submitted,
    TaskEvent,
    as_record,
    new_task_id,
    now_us,
    task_id_ms,
)
from qtasks_stream.interceptors import EmitInput, EmitNext, Interceptor, chain_emit, wants
from qtasks_stream.ops import audit
from qtasks_stream.ops.rerun import Resubmission, ResubmitFilter, find_resubmissions, records_of
from qtasks_stream.records import OutRecord, Record
from qtasks_stream.results import ResultListener
from qtasks_stream.serde.base import Serde
from qtasks_stream.serde.codec import RecordCodec
from qtasks_stream.serde.payloads import TaskPayloads
from qtasks_stream.state import Task, TaskState, fold, work_item
from qtasks_stream.tasks import TaskDefinition
from qtasks_stream.topology import DEFAULT_QUEUE, Topology
from qtasks_stream.views.base import TaskPage, TaskQuery, ViewStore
from qtasks_stream.views.memory import MemoryViewStore

if TYPE_CHECKING:
    from qtasks_stream.workflows.canvas import Node
    from qtasks_stream.workflows.client import WorkflowHandle

__all__ = ["TaskClient"]

_IDEMPOTENCY_NS = uuid.UUID("5b0a4f0e-7c51-4d8a-9a55-6f1c1c2b8e11")
#: A task's history is read from this long before its id's time: the ``Submitted`` record's
#: timestamp is its client's clock (CreateTime), or the broker's on a LogAppendTime topic.
_HISTORY_CLOCK_MARGIN_MS = 60_000
#: How long before the events retention ends a delayed task must start at the latest.
_RETENTION_MARGIN_MS = 3_600_000


class TaskClient:
    """The client role. The wiring (:class:`~qtasks_stream.app.QueueTasks`) sets the
    components below before any call, and calls :meth:`_close_client` when it closes."""

    name: str
    topology: Topology
    definitions: dict[str, TaskDefinition]
    interceptors: list[Interceptor]
    event_log: EventLog
    serde: Serde
    payloads: TaskPayloads
    view: ViewStore
    _results: ResultListener
    _producer: Producer
    #: Every send of the client: ``_producer`` is transactional, and concurrent sends share
    #: a transaction.
    _sends: CoalescedSends

    def __init__(self) -> None:
        super().__init__()
        self._client_ready = False
        self._client_lock = asyncio.Lock()
        self._view_started = False
        #: The emit chain of the interceptors it was built for, and the list it passes
        #: events into: built once per set of interceptors, not per event.
        self._emit_chain: (
            tuple[tuple[Interceptor, ...], EmitNext | None, list[TaskEvent]] | None
        ) = None

    def _feeds_view(self) -> bool:
        """Whether a projector of this process feeds :attr:`view` (the runtime knows)."""
        return False

    async def _ensure_client(self) -> None:
        async with self._client_lock:
            if self._client_ready:
                return
            await self.event_log.create_topics(self.topology.specs())
            await self.serde.start()
            await self.payloads.start(self.definitions.values())
            await self._producer.start()
            self._client_ready = True

    async def _ensure_view(self) -> None:
        if not self._view_started:
            await self.view.start()
            self._view_started = True

    async def _close_client(self) -> None:
        await self._results.close()
        if self._client_ready:
            await self._producer.close()
            self._client_ready = False
        await self.serde.close()
        if self._view_started:
            await self.view.close()
            self._view_started = False

    async def add_task(
        self,
        task_name: str,
        *args: Any,
        priority: int | None = None,
        queue: str | None = None,
        timeout: float | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
        max_time: float | None = None,
        tags: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Task | None:
        """Submit a task. Returns it with status ``new``; with ``timeout``, waits for its end
        and returns the finished task, or ``None`` if it did not end in time.

        With ``idempotency_key``, the task id derives from the key, and a repeat of a key
        already submitted is the first task: it returns (with ``timeout``, waits for) that
        task as its history in the log has it, whatever its state, with the first call's
        arguments; the repeat's own arguments and options are ignored, even if they differ.

        ``queue`` overrides the task's named queue (one of the app's queues); ``priority``
        must be a lane, ``0 .. lanes - 1``.

        Raises:
            UnknownTaskError: no task is registered under ``task_name``.
            ConfigurationError: an option is invalid (a priority outside the lanes, an unknown
                queue) or an argument is not JSON-serializable.
        """
        definition = self.definitions.get(task_name)
        if definition is None:
            known = ", ".join(sorted(self.definitions)) or "none"
            raise UnknownTaskError(f"no task named {task_name!r} (registered: {known})")
        if timeout is not None and timeout < 0:
            raise ConfigurationError(f"timeout must be >= 0, not {timeout}")
        options = _options(
            definition,
            priority,
            countdown,
            eta,
            idempotency_key,
            max_time,
            self.topology.retention_ms,
            queue,
        )
        self.topology.check_priority(options["priority"], task_name)
        self.topology.check_queue(options["queue"] or DEFAULT_QUEUE)
        await self._ensure_client()
        await self.payloads.start([definition])  # a task added after the client started
        call = self.payloads.encode_call(definition, args, kwargs)
        submitted = call.submitted(
            definition, tags=tuple(tags) if tags is not None else definition.tags, **options
        )
        task_id = (
            str(uuid.uuid5(_IDEMPOTENCY_NS, f"{self.name}:{idempotency_key}"))
            if idempotency_key is not None
            else new_task_id()
        )
        event = TaskEvent.new(task_id, task_name, 0, "client", submitted)
        event = self._intercept(self.topology.events, task_id, event)
        # Encoded before anything is sent: a value that does not fit leaves nothing behind.
        record = as_record(self.serde, self.topology.events, task_id, event)
        # Due now and not a possible repeat: straight into its lane (the scheduler ignores a
        # repeated submit, so one with an idempotency key goes through it).
        # Folded once: routing reads it, then the waiter's state grows from it.
        state = fold(None, event)
        records = (
            self._routed(event, record, state)
            if options["eta_us"] is None and idempotency_key is None
            else [record]
        )
        waiter = None
        adopted = False
        if timeout is not None and idempotency_key is None:
            # A new task: its whole history is this event, the listener does the rest.
            await self._results.start()
            waiter = self._results.expect(task_id, base=state)
        elif idempotency_key is None:
            # If this client listens already, a later wait() on the task needs no log read.
            adopted = self._results.adopt(task_id, state)
        try:
            await self._sends.send(records)
        except BaseException:
            if waiter is not None:
                self._results.forget(task_id, waiter)
            if adopted:
                self._results.disown(task_id)
            raise
        if idempotency_key is not None:
            # A repeat of a known key is the first task (the scheduler ignores the repeat, and
            # so does fold): answer with it, as its history in the log has it.
            if timeout is not None:
                return await self._follow(task_id, timeout)
            first = _folded(await self._history_events(task_id, skip_undecodable=True))
            return (first or fold(None, event)).to_task(self.payloads)
        if waiter is None:
            return state.to_task(self.payloads)
        return await self._await(task_id, waiter, timeout)

    async def _await(
        self, task_id: str, waiter: asyncio.Future[TaskState], timeout: float | None
    ) -> Task | None:
        try:
            async with asyncio.timeout(timeout):
                state = await waiter
        except TimeoutError:
            self._results.forget(task_id, waiter)
            return None
        return state.to_task(self.payloads)

    async def wait(self, uuid: str, timeout: float | None = None) -> Task | None:
        """Wait for a task to end; returns it, or ``None`` if it did not end in time.

        The task's history in the log decides, not a view that may lag: right after a
        ``resubmit()`` this waits for the new attempt, not the old outcome.
        """
        return await self._follow(uuid, timeout)

    async def _follow(self, uuid: str, timeout: float | None) -> Task | None:
        """The one path of every wait on a task submitted earlier: listen first, then read its
        history, and let the listener fold the history and what it sees after."""
        return (await self._follow_all([uuid], timeout))[0]

    async def _follow_all(self, uuids: Sequence[str], timeout: float | None) -> list[Task | None]:
        """:meth:`_follow` of several tasks at once (see :meth:`_watch_all`)."""
        waiters = await self._watch_all(uuids)
        return list(
            await asyncio.gather(
                *(self._await(u, w, timeout) for u, w in zip(uuids, waiters, strict=True))
            )
        )

    async def _watch_all(self, uuids: Sequence[str]) -> list[asyncio.Future[TaskState]]:
        """Futures of the tasks' final states: listening first, then their histories read in
        one pass per partition (a workflow's steps share one). A future not awaited to its
        end must be given back with ``self._results.forget``."""
        await self._ensure_client()
        await self._results.start()
        # A task submitted here while listening is followed already (``adopt``): no read.
        own = {uuid for uuid in uuids if self._results.owns(uuid)}
        if own:
            waiters = {uuid: self._results.expect(uuid) for uuid in own}
            rest = [uuid for uuid in uuids if uuid not in own]
            if rest:
                waiters.update(zip(rest, await self._watch_all(rest), strict=True))
            return [waiters[uuid] for uuid in uuids]
        # Listen first, then look: whatever ends after this point reaches the listener.
        recording = [self._results.expect(uuid, record=True) for uuid in uuids]
        try:
            if len(uuids) == 1:  # the read every one-task path shares (tests hook it)
                histories = {uuids[0]: await self._history_events(uuids[0], skip_undecodable=True)}
            else:
                histories = await self._histories(uuids, skip_undecodable=True)
        except BaseException:
            for uuid, waiter in zip(uuids, recording, strict=True):
                self._results.forget(uuid, waiter)
                self._results.unseed(uuid)
            raise
        for uuid in uuids:
            self._results.seed(uuid, histories[uuid])
        return recording

    async def stream(self, uuid: str, timeout: float | None = None) -> AsyncIterator[Any]:
        """Progress items of a (generator) task: those already recorded, then the new ones as
        they are produced, until it ends (at once for a task that has ended).

        Raises:
            TaskNotFoundError: the log has no event of ``uuid``.
            TimeoutError: the task did not end within ``timeout`` seconds.
        """
        await self._ensure_client()
        async for item in self._results.stream(
            uuid, lambda: self._history_events(uuid, skip_undecodable=True), timeout
        ):
            yield item

    async def _view_state(self, uuid: str) -> TaskState | None:
        await self._ensure_view()
        return await self.view.state(uuid)

    async def _shared_view(self) -> bool:
        """Whether the view is fed by a projector: a store other processes share (SQLite,
        PostgreSQL), or an in-memory one a projector of this process fills."""
        if not isinstance(self.view, MemoryViewStore) or self._feeds_view():
            return True
        await self._ensure_view()
        return bool(await self.view.positions())  # another app's projector fed it

    async def _require_shared_view(self, call: str) -> None:
        if not await self._shared_view():
            raise ConfigurationError(
                f"{call}() needs a shared view, and this process has none (no projector "
                "feeds its in-memory view): set QTASKS_VIEW_URL (or pass view=) to the "
                "PostgreSQL or SQLite view a projector fills, or run the projector stage "
                "here; get(uuid) works without one (it reads the task's history)"
            )

    async def get(self, uuid: str, as_of: datetime | float | str | None = None) -> Task | None:
        """The task, or ``None`` when the log has no event of it.

        From the view when a projector feeds it (see ``QTASKS_VIEW_URL``), else (or when the
        view does not know the task yet) folded from the task's history in the log. Never
        older than what ``wait()`` or ``add_task(timeout=)`` returned in this process.

        With ``as_of`` (an aware datetime, epoch seconds, or ISO 8601 text), the task as it
        stood then: folded from its events in the log that happened at or before that moment
        (not from the view); ``None`` if it had no events yet.
        """
        if as_of is None:
            state = await self._view_state(uuid) if await self._shared_view() else None
            if state is None:
                state = _folded(await self._history_events(uuid, skip_undecodable=True))
            state = self._results.newest(uuid, state)
        else:
            state = audit.state_as_of(await self.history(uuid), audit.as_of_us(as_of))
        return state.to_task(self.payloads) if state is not None else None

    async def connect(self) -> None:
        """Create the topics and register the schemas: what a client of the log needs."""
        await self._ensure_client()

    async def resubmit(
        self,
        what: ResubmitFilter | None = None,
        *,
        reason: str = "",
        dry_run: bool = False,
    ) -> list[Resubmission]:
        """New attempts of ended tasks (error, timeout, dead letter) that ``what`` selects,
        chosen from the log; see :mod:`qtasks_stream.ops.rerun`. Returns every task selected
        (``event`` set) and every explicit id refused (``refused`` says why); with
        ``dry_run`` nothing is written."""
        await self._ensure_client()
        found = await find_resubmissions(
            self.event_log, self.serde, self.topology, what or ResubmitFilter(), reason
        )
        records = records_of(self.serde, self.topology, found)
        if records and not dry_run:
            # A wait right after this reads the log and waits for the new attempt, not the
            # outcome the listener holds for a task submitted here.
            for resubmission in found:
                if resubmission.event is not None:
                    self._results.disown(resubmission.task_id)
            await self._sends.send(records)
        return found

    async def query(self, query: TaskQuery | None = None, **filters: Any) -> list[Task]:
        """Tasks the shared view holds that match (see :class:`TaskQuery`).

        Raises:
            ConfigurationError: no projector feeds this process's view.
        """
        await self._require_shared_view("query")
        return await self.view.query(query or TaskQuery(**filters), payloads=self.payloads)

    async def page(self, query: TaskQuery | None = None, **filters: Any) -> TaskPage:
        """One page of :meth:`query`; pass its ``next_cursor`` as ``after`` for the next."""
        await self._require_shared_view("page")
        return await self.view.page(query or TaskQuery(**filters), payloads=self.payloads)

    async def counts(self) -> dict[str, int]:
        """Tasks per status, as the shared view has them."""
        await self._require_shared_view("counts")
        return await self.view.counts()

    async def cancel(self, uuid: str, reason: str = "") -> None:
        """Ask for the task to be cancelled; honoured wherever it is, even after restarts."""
        await self._ensure_client()
        known = await self._view_state(uuid)
        name = known.task_name if known is not None else ""
        event = TaskEvent.new(uuid, name, 0, "client", CancelRequested(reason))
        event = self._intercept(self.topology.events, uuid, event)
        await self._sends.send([as_record(self.serde, self.topology.events, uuid, event)])

    def _routed(self, event: TaskEvent, submitted: OutRecord, state: TaskState) -> list[OutRecord]:
        """A task due now, routed as the scheduler would: its ``Submitted`` (marked routed),
        its ``Scheduled`` and its first work item, to be written in one transaction. One
        transactional hop instead of two; the scheduler still folds the task (cancel,
        retries). ``state`` is the task folded from ``event``."""
        lane = self.topology.lane_for(state.priority)
        scheduled = TaskEvent.new(
            state.task_id,
            state.task_name,
            1,
            "client",
            Scheduled(lane, state.priority, None),
            traceparent=state.traceparent,
        )
        scheduled = self._intercept(self.topology.events, state.task_id, scheduled)
        assert isinstance(event.payload, Submitted)
        item = work_item(state, 1, event.payload.max_time)
        events = self.topology.events
        return [
            OutRecord(
                events, submitted.key, submitted.value, (*submitted.headers, (ROUTED_HEADER, b"1"))
            ),
            as_record(self.serde, events, state.task_id, scheduled),
            as_record(
                self.serde,
                self.topology.lane(lane, state.queue or DEFAULT_QUEUE),
                state.task_id,
                item,
            ),
        ]

    async def run_workflow(self, canvas: Node) -> WorkflowHandle:
        """Submit a workflow (a chain, group, chord or signature); see
        :mod:`qtasks_stream.workflows`."""
        from qtasks_stream.workflows.client import run_workflow

        return await run_workflow(self, canvas)

    async def workflow(self, workflow_id: str) -> WorkflowHandle:
        """The handle of a workflow submitted earlier, by this process or another.

        Raises:
            TaskNotFoundError: the log has no workflow of that id.
        """
        from qtasks_stream.workflows.client import attach

        return await attach(self, workflow_id)

    def _intercept(self, topic: str, key: str, event: TaskEvent) -> TaskEvent:
        """``event`` as the client's emit interceptors pass it on (tracing stamps it)."""
        interceptors = tuple(self.interceptors)
        cached = self._emit_chain
        if cached is None or cached[0] != interceptors:
            # Emit is synchronous, so one list of what came out serves every call.
            out: list[TaskEvent] = []
            chain = (
                chain_emit(interceptors, lambda passed: out.append(passed.value))
                if wants(interceptors, "emit")
                else None
            )
            cached = self._emit_chain = (interceptors, chain, out)
        _, chain, passed = cached
        if chain is None:
            return event
        passed.clear()
        chain(EmitInput("client", topic, key, event))
        if not passed:
            raise QTasksStreamError(f"an interceptor dropped the {event.kind} event of {key}")
        return passed[-1]

    async def history(self, uuid: str, *, limit: float = 30.0) -> list[TaskEvent]:
        """Every event of one task, in order, read from the log (not from a view).

        Records under the task's key that cannot be decoded are left out (they are in the
        dead-letter topic, and the ``DeadLettered`` event says so).
        """
        return await self._history_events(uuid, skip_undecodable=True, limit=limit)

    async def _history_events(
        self, uuid: str, *, skip_undecodable: bool, limit: float = 30.0
    ) -> list[TaskEvent]:
        histories = await self._histories([uuid], skip_undecodable=skip_undecodable, limit=limit)
        return histories[uuid]

    async def _histories(
        self, uuids: Sequence[str], *, skip_undecodable: bool, limit: float = 30.0
    ) -> dict[str, list[TaskEvent]]:
        """Every event of each task in ``uuids``, read in one pass per partition."""
        await self._ensure_client()
        by_partition: dict[int, list[str]] = {}
        for task_id in dict.fromkeys(uuids):
            partition = murmur2_partition(task_id.encode(), self.topology.partitions)
            by_partition.setdefault(partition, []).append(task_id)
        histories: dict[str, list[TaskEvent]] = {}
        for partition, keys in by_partition.items():
            histories.update(
                await self._partition_histories(partition, keys, skip_undecodable, limit)
            )
        return histories

    async def _partition_histories(
        self, partition: int, uuids: Sequence[str], skip_undecodable: bool, limit: float
    ) -> dict[str, list[TaskEvent]]:
        # A time-ordered id says when the task was submitted: start there, not at 0.
        born = [task_id_ms(uuid) for uuid in uuids]
        since = None
        if None not in born:
            since = min(ms for ms in born if ms is not None) - _HISTORY_CLOCK_MARGIN_MS
        events: dict[bytes, list[TaskEvent]] = {uuid.encode(): [] for uuid in uuids}
        codec = RecordCodec(self.serde)

        async def keep(records: list[Record]) -> None:
            for rec in records:
                found = events.get(rec.key) if rec.key is not None else None
                if found is None or rec.value is None:
                    continue
                try:
                    found.append(codec.event(rec))
                except RecordDecodeError:
                    if not skip_undecodable:
                        raise

        try:
            async with asyncio.timeout(limit):
                await read_records(
                    self.event_log,
                    self.topology.events,
                    self.topology.partitions,
                    keep,
                    only=[partition],
                    since_ms=since,
                )
        except TimeoutError as exc:
            raise EventLogError(f"reading the history of {uuids[0]} took over {limit}s") from exc
        return {key.decode(): found for key, found in events.items()}


def _folded(events: Iterable[TaskEvent]) -> TaskState | None:
    state: TaskState | None = None
    for event in events:
        state = fold(state, event)
    return state


def _options(
    definition: TaskDefinition,
    priority: int | None,
    countdown: float | None,
    eta: datetime | None,
    idempotency_key: str | None,
    max_time: float | None,
    retention_ms: int,
    queue: str | None = None,
) -> dict[str, Any]:
    """The Submitted fields other than arguments and tags, checked.

    A start further away than the events topic's retention (less a margin for the release
    itself) is refused: the task's arguments live in its ``Submitted`` event, which would
    be deleted before the task runs.
    """
    if priority is None:
        priority = definition.priority
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigurationError(f"priority must be an int, not {priority!r}")
    if countdown is not None and eta is not None:
        raise ConfigurationError("give countdown or eta, not both")
    eta_us: int | None = None
    if countdown is not None:
        if not countdown >= 0:
            raise ConfigurationError(f"countdown must be >= 0 seconds, not {countdown!r}")
        eta_us = now_us() + int(countdown * 1_000_000)
    elif eta is not None:
        if eta.tzinfo is None:
            raise ConfigurationError("eta must be timezone-aware (e.g. datetime.now(UTC))")
        eta_us = int(eta.timestamp() * 1_000_000)
    if eta_us is not None and retention_ms > 0:
        margin_ms = min(_RETENTION_MARGIN_MS, retention_ms // 10)
        if (eta_us - now_us()) // 1000 > retention_ms - margin_ms:
            raise ConfigurationError(
                f"the task would start in {(eta_us - now_us()) / 86_400e6:.2f} days, later "
                f"than the events retention of {retention_ms / 86_400e3:.2f} days allows "
                f"(less {margin_ms / 1000:.0f} s): its Submitted event, which holds the "
                "arguments, would be deleted first; raise retention_ms or submit it later"
            )
    if max_time is not None and not max_time > 0:
        raise ConfigurationError(f"max_time must be > 0, not {max_time!r}")
    if idempotency_key is not None and not idempotency_key:
        raise ConfigurationError("idempotency_key must be a non-empty string")
    if queue is None:
        queue = definition.queue
    return {
        # None for the default queue: its Submitted events stay as before queues existed.
        "queue": None if queue == DEFAULT_QUEUE else queue,
        "priority": priority,
        "eta_us": eta_us,
        "idempotency_key": idempotency_key,
        "max_time": max_time,
    }
