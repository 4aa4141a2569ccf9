"""Defining, pausing, resuming, deleting and listing schedules: what ``app.schedules`` does.

Every call writes one definition event (the whole definition after the change) under the
schedule's name, or reads the schedules topic to its end and folds it. The schedules stage
of whichever worker owns the topic picks the change up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from qtasks_stream.errors import ConfigurationError, RecordDecodeError, UnknownTaskError
from qtasks_stream.eventlog.reading import read_records
from qtasks_stream.events import Submitted, as_record, event_kind, now_us
from qtasks_stream.records import OutRecord, Record
from qtasks_stream.schedules.records import (
    NAME,
    Schedule,
    ScheduleDefinition,
    ScheduleEvent,
    fold_schedule,
)
from qtasks_stream.schedules.timing import check_cron, zone
from qtasks_stream.serde.codec import RecordCodec
from qtasks_stream.state import TaskState, fold

if TYPE_CHECKING:
    from qtasks_stream.app import QueueTasks

__all__ = ["Schedules", "run_tick", "schedule_run"]

_CATCH_UP = ("skip", "one", "all")
_OVERLAP = ("skip", "allow")


class Schedules:
    """The schedules of one app (``app.schedules``)."""

    def __init__(
        self, app: QueueTasks, send: Callable[[Sequence[OutRecord]], Awaitable[None]]
    ) -> None:
        self._app = app
        self._send = send

    async def add(
        self,
        name: str,
        *,
        task: str,
        cron: str | None = None,
        every: timedelta | None = None,
        tz: str = "UTC",
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        priority: int | None = None,
        max_time: float | None = None,
        tags: Iterable[str] = (),
        catch_up: Literal["skip", "one", "all"] = "one",
        catch_up_limit: int = 10,
        overlap: Literal["skip", "allow"] = "skip",
        grace: timedelta = timedelta(seconds=60),
    ) -> Schedule:
        """Create schedule ``name``, or change it to this definition (a paused schedule
        stays paused). Declaring the same definition again writes nothing, so every process
        may declare its schedules at start.

        Args:
            task: the registered task each tick submits, with ``args``/``kwargs`` (checked
                against its signature now), ``priority``, ``max_time`` and ``tags``.
            cron: five-field cron expression read in ``tz`` (an IANA zone), or
            every: an interval of at least one second (ticks: its multiples since the epoch).
            catch_up: ticks passed while no stage ran: "skip", "one" (the latest) or "all"
                (at most ``catch_up_limit`` of the latest). ``grace``: how late a tick may
                be handled and still count as on time.
            overlap: "skip" a tick while the previous run has not ended, or "allow" it.

        Raises:
            ConfigurationError: a bad name, cron, interval, zone or policy (named).
            UnknownTaskError: no task is registered under ``task``.
        """
        app = self._app
        _check_name(name)
        definition = app.definitions.get(task)
        if definition is None:
            known = ", ".join(sorted(app.definitions)) or "none"
            raise UnknownTaskError(f"no task named {task!r} (registered: {known})")
        if (cron is None) == (every is None):
            raise ConfigurationError(f"schedule {name!r}: give cron or every, exactly one")
        every_us: int | None = None
        if every is not None:
            every_us = round(every.total_seconds() * 1_000_000)
            if every_us < 1_000_000:
                raise ConfigurationError(
                    f"schedule {name!r}: every must be at least one second, not {every}"
                )
        zone(tz)
        if cron is not None:
            check_cron(cron, tz)
        if catch_up not in _CATCH_UP:
            raise ConfigurationError(f"catch_up must be one of {_CATCH_UP}, not {catch_up!r}")
        if overlap not in _OVERLAP:
            raise ConfigurationError(f"overlap must be one of {_OVERLAP}, not {overlap!r}")
        if not isinstance(catch_up_limit, int) or catch_up_limit < 1:
            raise ConfigurationError(f"catch_up_limit must be an int >= 1, not {catch_up_limit!r}")
        if grace < timedelta(0):
            raise ConfigurationError(f"grace must be >= 0, not {grace}")
        if max_time is not None and not max_time > 0:
            raise ConfigurationError(f"max_time must be > 0, not {max_time!r}")
        resolved_priority = definition.priority if priority is None else priority
        if not isinstance(resolved_priority, int) or isinstance(resolved_priority, bool):
            raise ConfigurationError(f"priority must be an int, not {resolved_priority!r}")
        await app.connect()
        await app.payloads.start([definition])
        call = app.payloads.encode_call(definition, tuple(args), dict(kwargs or {}))
        current = await self.get(name)
        existing = current.definition if current is not None else None
        wanted = ScheduleDefinition(
            task=task,
            args=call.args,
            kwargs=call.kwargs,
            content_type=call.content_type,
            arguments_avro=call.arguments_avro,
            since_us=_since(existing, cron, every_us, tz),
            cron=cron,
            every_us=every_us,
            timezone=tz,
            priority=resolved_priority,
            max_time=max_time,
            tags=tuple(tags),
            catch_up=catch_up,
            catch_up_limit=catch_up_limit,
            overlap=overlap,
            grace_us=round(grace.total_seconds() * 1_000_000),
            paused=existing.paused if existing is not None else False,
        )
        if existing is not None and existing.same_plan(wanted):
            assert current is not None
            return current
        kind = "Created" if existing is None else "Changed"
        return await self._write(current, ScheduleEvent(name, kind, now_us(), "client", wanted))

    async def pause(self, name: str) -> Schedule:
        """Stop firing ``name`` until :meth:`resume`. Raises ConfigurationError if unknown."""
        current, definition = await self._existing(name)
        if definition.paused:
            return current
        changed = replace(definition, paused=True)
        return await self._write(
            current, ScheduleEvent(name, "Paused", now_us(), "client", changed)
        )

    async def resume(self, name: str) -> Schedule:
        """Fire ``name`` again from now on: ticks that passed while it was paused never run."""
        current, definition = await self._existing(name)
        if not definition.paused:
            return current
        at = now_us()
        changed = replace(definition, paused=False, since_us=at)
        return await self._write(current, ScheduleEvent(name, "Resumed", at, "client", changed))

    async def delete(self, name: str) -> None:
        """Delete ``name``; runs already submitted go on. Raises ConfigurationError if unknown."""
        current, _ = await self._existing(name)
        await self._write(current, ScheduleEvent(name, "Deleted", now_us(), "client"))

    async def get(self, name: str) -> Schedule | None:
        """Schedule ``name`` as the log has it now (None: never defined, or deleted)."""
        schedule = (await self._read()).get(name)
        return schedule if schedule is not None and schedule.definition is not None else None

    async def all(self) -> list[Schedule]:
        """Every schedule defined now, by name."""
        found = await self._read()
        return [found[n] for n in sorted(found) if found[n].definition is not None]

    async def runs(self, name: str) -> list[TaskState]:
        """Every run of schedule ``name`` that the events topic still holds, oldest tick
        first, each as its events in the log fold (read from the log, not from a view: for
        the view, ``app.query(tag="schedule:<name>")``). Reads the whole events topic."""
        _check_name(name)
        app = self._app
        await app.connect()
        topic = app.topology.events
        tag = f"schedule:{name}"
        found: dict[str, TaskState] = {}
        codec = RecordCodec(app.serde)

        async def fold_runs(records: list[Record]) -> None:
            for rec in records:
                if rec.value is None or rec.key is None:
                    continue
                kind = event_kind(rec.headers)
                task_id = rec.key.decode(errors="replace")
                if task_id not in found and kind not in (None, "Submitted"):
                    continue  # not a run of this schedule: not even decoded
                try:
                    event = codec.event(rec)
                except RecordDecodeError:
                    continue  # in the dead-letter topic, as history leaves it out too
                if task_id in found:
                    found[task_id] = fold(found[task_id], event)
                elif isinstance(event.payload, Submitted) and tag in event.payload.tags:
                    found[task_id] = fold(None, event)

        await read_records(app.event_log, topic, app.topology.partitions, fold_runs)
        return sorted(found.values(), key=lambda state: (run_tick(state), state.task_id))

    async def _existing(self, name: str) -> tuple[Schedule, ScheduleDefinition]:
        _check_name(name)
        current = await self.get(name)
        if current is None or current.definition is None:
            raise ConfigurationError(f"no schedule named {name!r}")
        return current, current.definition

    async def _write(self, current: Schedule | None, event: ScheduleEvent) -> Schedule:
        app = self._app
        await app.connect()
        record = as_record(app.serde, app.topology.schedules, event.key, event)
        await self._send([record])
        return fold_schedule(current, event)

    async def _read(self) -> dict[str, Schedule]:
        app = self._app
        await app.connect()
        topic = app.topology.schedules
        found: dict[str, Schedule] = {}
        codec = RecordCodec(app.serde)

        async def fold(records: list[Record]) -> None:
            for rec in records:
                if rec.value is None:
                    continue
                try:
                    event = codec.decode(rec, ScheduleEvent)
                except RecordDecodeError:
                    continue  # the stage dead-letters it: the dead-letter topic has it
                found[event.name] = fold_schedule(found.get(event.name), event)

        await read_records(app.event_log, topic, 1, fold)
        return found


def _since(
    existing: ScheduleDefinition | None, cron: str | None, every_us: int | None, tz: str
) -> int:
    """From when ticks count: kept across a change of arguments or policies (a tick missed
    before it is still caught up), but a new timing starts now (its ticks before the change
    were never this schedule's)."""
    if existing is None or (existing.cron, existing.every_us, existing.timezone) != (
        cron,
        every_us,
        tz,
    ):
        return now_us()
    return existing.since_us


def run_tick(state: TaskState) -> str:
    """The tick a run was fired for, as its ``tick:`` tag says (UTC ISO 8601 text)."""
    return _tag(state.tags, "tick:")


def schedule_run(tags: Sequence[str]) -> tuple[str, str] | None:
    """(schedule name, tick) of a task whose tags say it is a schedule's run (``schedule:``
    and ``tick:``, as the schedule stage tags it), else None."""
    name = _tag(tags, "schedule:")
    return (name, _tag(tags, "tick:")) if name else None


def _tag(tags: Sequence[str], prefix: str) -> str:
    return next((t[len(prefix) :] for t in tags if t.startswith(prefix)), "")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigurationError(
            f"schedule name {name!r} must be 1-200 letters, digits, '.', '_', ':' or '-'"
        )
