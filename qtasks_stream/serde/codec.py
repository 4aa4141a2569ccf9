"""Records read from the log into the typed values they hold: one decode-then-convert path.

Every reader of a topic (the stage runner, the worker's control listener, the result
listener, history, replay, snapshots, schedules, workflow trees) turns a :class:`Record` into
a :class:`~qtasks_stream.events.TaskEvent`, a work item, a control command or a schedule
event through :class:`RecordCodec`, so a bad record fails the same way everywhere: one
:class:`~qtasks_stream.errors.RecordDecodeError` that names the record and its cause.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from qtasks_stream.errors import RecordDecodeError, SerdeError
from qtasks_stream.events import TaskEvent, event_kind
from qtasks_stream.records import Record
from qtasks_stream.serde.base import Serde

__all__ = ["Decodable", "RecordCodec"]

_T_co = TypeVar("_T_co", covariant=True)

#: What a decoded value may raise on its way to a typed one: the serde's errors, and the
#: converters' on a value that lacks a field or holds a wrong one (another writer's record).
#: Not RegistryUnavailableError: the record is fine, the registry is not (callers wait).
_FAILURES = (SerdeError, KeyError, TypeError, ValueError)


class Decodable(Protocol[_T_co]):
    """A record type: builds itself from the dict its topic's serde decodes (``from_avro``)."""

    def from_avro(self, data: dict[str, Any], /) -> _T_co: ...


class RecordCodec:
    """Decodes records of the topics ``serde`` serves into typed values.

    The record's kind header (an event's) is passed to the serde as the union branch to
    expect, which lets it skip reading branch names; it is a hint, never trusted.
    """

    __slots__ = ("_decode",)

    def __init__(self, serde: Serde) -> None:
        self._decode = serde.decode

    def decode(self, record: Record, as_type: Decodable[_T_co]) -> _T_co:
        """The value of ``record`` as ``as_type``.

        Raises:
            RecordDecodeError: the record has no value, its bytes are not a value of its
                topic, or that value does not convert into ``as_type``.
            RegistryUnavailableError: the writer schema cannot be fetched now (try again).
        """
        try:
            value = record.value
            if value is None:
                raise SerdeError("the record has no value (a tombstone)")
            return as_type.from_avro(
                self._decode(record.topic, value, branch=event_kind(record.headers))
            )
        except _FAILURES as exc:
            raise _failed(record, _name(as_type), exc) from exc

    def event(self, record: Record) -> TaskEvent:
        """The task event in ``record`` (of an events topic); see :meth:`decode`."""
        return self.decode(record, TaskEvent)

    def value(self, record: Record) -> dict[str, Any]:
        """The plain decoded value of ``record``, for topics whose records have no class
        (the snapshot topic's); see :meth:`decode`."""
        try:
            if record.value is None:
                raise SerdeError("the record has no value (a tombstone)")
            return self._decode(record.topic, record.value)
        except SerdeError as exc:
            raise _failed(record, "a value", exc) from exc


def _name(as_type: object) -> str:
    name = getattr(as_type, "__name__", None)
    return f"a {name}" if name else repr(as_type)


def _failed(record: Record, what: str, exc: Exception) -> RecordDecodeError:
    cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return RecordDecodeError(
        f"cannot decode {record.topic}/{record.partition}/{record.offset} as {what}: {cause}",
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
    )
