"""Schedule events (``schemas/avro/ScheduleEvent.avsc``) and their fold into schedules.

The schedules topic is compacted and keyed twice per schedule: ``<name>`` holds the latest
definition (clients write it: created, changed, paused, resumed, deleted) and
``<name>@tick`` the latest tick the schedules stage decided. Two keys, because a client's
pause and the stage's tick are written concurrently: under one key, compaction would keep
whichever came last and lose the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal

from qtasks_stream.events import JSON

__all__ = [
    "DEFINITION_KINDS",
    "NAME",
    "TICK_SUFFIX",
    "Schedule",
    "ScheduleDefinition",
    "ScheduleEvent",
    "ScheduleTick",
    "fold_schedule",
]

#: What a schedule's name may hold (it becomes a record key and a tag).
NAME = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
#: Suffix of the key of a schedule's tick records (``@`` cannot occur in a name).
TICK_SUFFIX = "@tick"
DEFINITION_KINDS = frozenset({"Created", "Changed", "Paused", "Resumed", "Deleted"})

Kind = Literal["Created", "Changed", "Paused", "Resumed", "Deleted", "Ticked"]
CatchUp = Literal["skip", "one", "all"]
Overlap = Literal["skip", "allow"]
Outcome = Literal["fired", "overlap", "missed"]


@dataclass(frozen=True, slots=True)
class ScheduleDefinition:
    task: str
    args: str
    kwargs: str
    since_us: int
    cron: str | None = None
    every_us: int | None = None
    timezone: str = "UTC"
    content_type: str = JSON
    arguments_avro: bytes | None = None
    priority: int | None = None
    max_time: float | None = None
    tags: tuple[str, ...] = ()
    catch_up: str = "one"
    catch_up_limit: int = 10
    overlap: str = "skip"
    grace_us: int = 60_000_000
    paused: bool = False

    def same_plan(self, other: ScheduleDefinition) -> bool:
        """Equal but for ``since_us`` and ``paused`` (state, not what the user declared)."""
        return replace(self, since_us=0, paused=False) == replace(other, since_us=0, paused=False)


@dataclass(frozen=True, slots=True)
class ScheduleTick:
    tick_us: int
    outcome: str
    task_id: str | None = None


_DEFINITION_FIELDS = tuple(f.name for f in fields(ScheduleDefinition))


@dataclass(frozen=True, slots=True)
class ScheduleEvent:
    name: str
    kind: str
    at_us: int
    source: str
    definition: ScheduleDefinition | None = None
    tick: ScheduleTick | None = None

    SCHEMA: ClassVar[str] = "ScheduleEvent"

    @property
    def key(self) -> str:
        return self.name + TICK_SUFFIX if self.kind == "Ticked" else self.name

    def record_headers(self) -> tuple[tuple[str, bytes], ...]:
        return ()

    def to_avro(self) -> dict[str, Any]:
        definition = None
        if self.definition is not None:
            definition = {n: getattr(self.definition, n) for n in _DEFINITION_FIELDS}
            definition["tags"] = list(self.definition.tags)
        tick = None
        if self.tick is not None:
            tick = {
                "tick_us": self.tick.tick_us,
                "outcome": self.tick.outcome,
                "task_id": self.tick.task_id,
            }
        return {
            "name": self.name,
            "kind": self.kind,
            "at_us": self.at_us,
            "source": self.source,
            "definition": definition,
            "tick": tick,
        }

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> ScheduleEvent:
        raw_definition = data.get("definition")
        raw_tick = data.get("tick")
        definition = (
            ScheduleDefinition(**{**raw_definition, "tags": tuple(raw_definition["tags"])})
            if raw_definition is not None
            else None
        )
        tick = ScheduleTick(**raw_tick) if raw_tick is not None else None
        return cls(data["name"], data["kind"], data["at_us"], data["source"], definition, tick)


@dataclass(slots=True)
class Schedule:
    """A schedule as the fold of its events: its definition (None once deleted, or before
    the definition was read) and its latest decided tick."""

    name: str
    definition: ScheduleDefinition | None = None
    tick: ScheduleTick | None = None
    changed_us: int = 0

    @property
    def active(self) -> bool:
        return self.definition is not None and not self.definition.paused


def fold_schedule(previous: Schedule | None, event: ScheduleEvent) -> Schedule:
    """``previous`` with ``event`` applied. A tick only ever moves forward, so reading a
    tick again (a stage reads back what it wrote) changes nothing."""
    schedule = previous if previous is not None else Schedule(event.name)
    if event.kind == "Ticked":
        if event.tick is not None and (
            schedule.tick is None or event.tick.tick_us >= schedule.tick.tick_us
        ):
            schedule.tick = event.tick
        return schedule
    schedule.changed_us = event.at_us
    schedule.definition = None if event.kind == "Deleted" else event.definition
    return schedule
