"""The trigger contract: which topic starts a task, how its records read, what the task gets.

``@app.task(trigger=Topic("orders", value="avro"))`` starts the task once per record of
``orders``. The task is called with the record's decoded value as its first argument and,
when it declares a parameter annotated :class:`TriggerRecord`, the record's position, key,
headers and timestamp in that parameter (by keyword).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from qtasks_stream.errors import ConfigurationError

__all__ = ["KEY_FORMATS", "VALUE_FORMATS", "Topic", "TriggerRecord", "trigger_task_id"]

#: ``avro``: the Confluent wire format, read with the writer's schema from the registry.
ValueFormat = Literal["avro", "json", "string"]
KeyFormat = Literal["string", "json", "avro"]
VALUE_FORMATS: tuple[str, ...] = ("avro", "json", "string")
KEY_FORMATS: tuple[str, ...] = ("string", "json", "avro")

_TRIGGER_NS = uuid.UUID("0b6c3e0a-6a37-4f7e-9d6b-2f1f0c9a4e55")


@dataclass(frozen=True, slots=True)
class TriggerRecord:
    """Where a triggered task's record came from.

    A task whose parameters are all typed receives this dataclass; a task whose arguments
    travel as JSON receives a ``dict`` with the same fields.
    """

    topic: str
    partition: int
    offset: int
    #: The record's timestamp (ms since the epoch) as the log has it.
    timestamp_ms: int
    #: The key as text: as written for ``key="string"``, JSON text for ``json``/``avro``
    #: keys; ``None`` for a record without a key.
    key: str | None = None
    #: Header values as UTF-8 text (undecodable bytes escaped as ``\\xNN``); a repeated
    #: header name keeps its last value.
    headers: dict[str, str] = field(default_factory=dict)


#: ``filter(value, record)``: False skips the record (no task, counted as skipped).
TriggerFilter = Callable[[Any, TriggerRecord], bool]


@dataclass(frozen=True, slots=True)
class Topic:
    """A Kafka topic whose every record starts one task.

    Args:
        name: the topic, as written (no app prefix: it belongs to another team).
        value: how values are written: ``"avro"`` (Confluent wire format, decoded with the
            writer's schema from the app's registry), ``"json"`` or ``"string"`` (UTF-8).
        key: how keys are written (same choices, ``"string"`` by default).
        filter: ``filter(value, record)`` returning False skips the record.
    """

    name: str
    key: KeyFormat = "string"
    value: ValueFormat = "json"
    filter: TriggerFilter | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(f"Topic needs a topic name, not {self.name!r}")
        if self.value not in VALUE_FORMATS:
            raise ConfigurationError(
                f"Topic({self.name!r}): value format {self.value!r} is not one of "
                f"{', '.join(VALUE_FORMATS)}"
            )
        if self.key not in KEY_FORMATS:
            raise ConfigurationError(
                f"Topic({self.name!r}): key format {self.key!r} is not one of "
                f"{', '.join(KEY_FORMATS)}"
            )
        if self.filter is not None and not callable(self.filter):
            raise ConfigurationError(f"Topic({self.name!r}): filter must be callable")


def trigger_task_id(app: str, task_name: str, topic: str, partition: int, offset: int) -> str:
    """The id of the task a record starts: the same for a redelivered record, so the log
    never holds two tasks for one record (the app and task name keep apart several tasks
    triggered by one topic)."""
    return str(
        uuid.uuid5(_TRIGGER_NS, f"{app}\x00{task_name}\x00{topic}\x00{partition}\x00{offset}")
    )
