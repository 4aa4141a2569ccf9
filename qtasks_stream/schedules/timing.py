"""When a schedule ticks, and the id of the task a tick submits.

Cron expressions are evaluated by cronsim (Debian cron semantics, zoneinfo time zones; see
docs/schedules.md for why it and not croniter). Interval ticks are the multiples of the
interval since the Unix epoch, so every process computes the same ticks without having
to agree on a start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.schedules.records import ScheduleDefinition

__all__ = ["check_cron", "next_tick", "tick_task_id", "ticks_due", "zone"]


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(f"unknown time zone {name!r} (an IANA name, e.g. UTC)") from exc


def check_cron(expression: str, timezone: str) -> None:
    """Raises ConfigurationError naming the problem when ``expression`` is no cron."""
    try:
        CronSim(expression, datetime.now(zone(timezone)))
    except CronSimError as exc:
        raise ConfigurationError(f"bad cron expression {expression!r}: {exc}") from exc


def _to_us(moment: datetime) -> int:
    # Whole seconds: cron ticks have no fraction, and float maths must not shift them.
    return int(moment.timestamp()) * 1_000_000


#: How far from a moment cron iteration starts. A local time in the hour that repeats when
#: clocks go back is ambiguous, and cronsim, started there, loses which of the two it was
#: (it skipped the second 02:00 of an hourly cron); started this far away (more than any
#: DST shift), it passes through that hour itself and keeps both.
_DST_MARGIN = timedelta(hours=3)


def _cron(definition: ScheduleDefinition, from_us: int, reverse: bool) -> Iterator[int]:
    """Ticks (µs) strictly after ``from_us``, or at or before it with ``reverse``."""
    assert definition.cron is not None
    tz = zone(definition.timezone)
    start = datetime.fromtimestamp(from_us // 1_000_000, tz)
    start = start + _DST_MARGIN if reverse else start - _DST_MARGIN
    for moment in CronSim(definition.cron, start, reverse=reverse):
        tick = _to_us(moment)
        if (tick <= from_us) if reverse else (tick > from_us):
            yield tick


def next_tick(definition: ScheduleDefinition, after_us: int) -> int | None:
    """The first tick strictly after ``after_us`` (None: the cron never matches again)."""
    if definition.every_us is not None:
        return (after_us // definition.every_us + 1) * definition.every_us
    return next(_cron(definition, after_us, reverse=False), None)


def ticks_due(definition: ScheduleDefinition, after_us: int, now_us: int, newest: int) -> list[int]:
    """Up to ``newest`` of the latest ticks in (``after_us``, ``now_us``], oldest first."""
    if definition.every_us is not None:
        every = definition.every_us
        last = now_us // every * every
        ticks: list[int] = []
        while last > after_us and len(ticks) < newest:
            ticks.append(last)
            last -= every
        return ticks[::-1]
    ticks = []
    for tick in _cron(definition, now_us, reverse=True):
        if tick <= after_us or len(ticks) >= newest:
            break
        ticks.append(tick)
    return ticks[::-1]


def tick_task_id(base: str, name: str, tick_us: int) -> str:
    """The id of the task that schedule ``name`` of app ``base`` submits for ``tick_us``:
    the same for every process and every retry, so a tick fired twice is one task.

    Shaped as a UUID version 7 whose time is the tick (the rest is a hash of app, name and
    tick), so that reading the run's history starts near the tick instead of at offset 0.
    """
    digest = int.from_bytes(hashlib.sha256(f"{base}\0{name}\0{tick_us}".encode()).digest()[:10])
    value = (max(tick_us, 0) // 1000) << 80 | digest
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def iso(tick_us: int) -> str:
    """A tick as UTC ISO 8601 text, as in the ``tick:`` tag of its run."""
    moment = datetime.fromtimestamp(tick_us // 1_000_000, UTC)
    return moment.isoformat().replace("+00:00", "Z")
