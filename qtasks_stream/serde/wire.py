"""The Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body.

Shared by the topic serde and the task payload codec, so both validate, cache writer
schemas and report corrupt bytes the same way.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro.validation import ValidationError, validate

from qtasks_stream.errors import (
    QTasksStreamError,
    RegistryUnavailableError,
    SchemaError,
    SerdeError,
)
from qtasks_stream.serde.compiled import Reader, Writer
from qtasks_stream.serde.registry import raise_if_refused

__all__ = [
    "Guard",
    "WriterSchemas",
    "header",
    "int_guard",
    "read",
    "until_registry_answers",
    "write",
]

log = logging.getLogger("qtasks_stream.serde")
_T = TypeVar("_T")

_HEADER = struct.Struct(">bI")
_MAGIC = 0


def header(schema_id: int) -> bytes:
    """The five bytes that start every value written with schema ``schema_id``."""
    return _HEADER.pack(_MAGIC, schema_id)


class WriterSchemas:
    """Parsed schemas by id: ours added at registration, others fetched once when seen."""

    def __init__(self, registry: SchemaRegistryClient) -> None:
        self._registry = registry
        self._by_id: dict[int, Any] = {}

    def add(self, schema_id: int, parsed: Any) -> None:
        self._by_id[schema_id] = parsed

    def get(self, schema_id: int) -> Any:
        parsed = self._by_id.get(schema_id)
        if parsed is None:
            try:
                text = self._registry.get_schema(schema_id).schema_str
                parsed = fastavro.parse_schema(json.loads(text or ""))
            except SchemaRegistryError as exc:
                raise_if_refused(self._registry, exc, f"fetching schema id {schema_id}")
                if exc.http_status_code == 404:
                    raise SchemaError(f"unknown schema id {schema_id}: {exc}") from exc
                raise RegistryUnavailableError(
                    f"schema id {schema_id} could not be fetched: {exc}"
                ) from exc
            except (ValueError, fastavro.schema.SchemaParseException) as exc:
                raise SchemaError(
                    f"schema id {schema_id} is not a valid Avro schema: {exc}"
                ) from exc
            except Exception as exc:  # the client raises its HTTP library's transport errors
                raise RegistryUnavailableError(
                    f"schema id {schema_id} could not be fetched: {exc!r}"
                ) from exc
            self._by_id[schema_id] = parsed
        return parsed


async def until_registry_answers(
    call: Callable[[], _T], waiter: str, *, first: float = 0.2, most: float = 30.0
) -> _T:
    """``call()``, tried again while it raises :class:`RegistryUnavailableError`, after
    backoffs from ``first`` doubling to ``most`` seconds: the value is fine, the registry
    that holds its writer schema is not. Ends when it answers, or when the caller is
    cancelled (a stop, a cancel). ``waiter`` names who waits, in the log lines.
    """
    delay = first
    while True:
        try:
            return call()
        except RegistryUnavailableError as exc:
            log.warning(
                "%s waits for the schema registry (%s); next try in %.1fs", waiter, exc, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, most)


#: Checks what fastavro's writer lets through silently; raises ValueError naming the field.
Guard = Callable[[Any], None]

_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}


class _NoGuard(Exception):
    """The schema has a shape the guard does not cover: validate in full instead."""


class _OutOfRange(ValueError):
    """An int or long that the Avro type cannot hold."""


def int_guard(parsed: Any) -> Guard | None:
    """A check of every int and long in values of ``parsed``: the one thing fastavro's
    writer gets silently wrong (a Python int past 32 bits written as an Avro "int" is read
    back as another number). Wrong types and missing fields make the writer itself fail.

    Much cheaper than fastavro's ``validate``, which builds an error, JSON text of the datum
    included, for every union branch it tries before the right one. ``None`` when the
    schema has a shape this does not cover (unions of several non-null types, say): then
    :func:`write` validates in full.
    """
    named: dict[str, Any] = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
    try:
        return _guard(parsed, named, "", set())
    except _NoGuard:
        return None


def _guard(schema: Any, named: dict[str, Any], path: str, seen: set[str]) -> Guard | None:
    if isinstance(schema, str):
        if schema in _RANGES:
            low, high = _RANGES[schema]

            def in_range(value: Any) -> None:
                if type(value) is int and not low <= value <= high:
                    raise _OutOfRange(f"{path or 'value'} is {value}, outside the Avro {schema}")

            return in_range
        if schema in named:
            if schema in seen:
                raise _NoGuard  # recursive: validate in full
            return _guard(named[schema], named, path, seen | {schema})
        return None
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        records = [b for b in branches if isinstance(b, dict) and b.get("type") == "record"]
        if len(branches) == 1:
            inner = _guard(branches[0], named, path, seen)
            if inner is None:
                return None
            check_inner = inner

            def optional(value: Any) -> None:
                if value is not None:
                    check_inner(value)

            return optional
        if len(records) == len(branches):
            # A union of records, written as (record name, fields) with return_record_name.
            by_name = {
                r["name"]: _guard(r, named, f"{path}.{r['name'].rpartition('.')[2]}", seen)
                for r in records
            }
            if not any(by_name.values()):
                return None

            def branch(value: Any) -> None:
                if isinstance(value, tuple):
                    check = by_name.get(value[0])
                    if check is not None:
                        check(value[1])
                else:
                    raise _NoGuard  # not our tuple form: cannot tell the branch

            return branch
        raise _NoGuard
    kind = schema.get("type")
    if kind == "record":
        checks = [
            (f["name"], c)
            for f in schema["fields"]
            if (c := _guard(f["type"], named, f"{path}.{f['name']}".lstrip("."), seen))
        ]
        if not checks:
            return None

        def record(value: Any) -> None:
            for name, check in checks:
                if name in value:
                    check(value[name])

        return record
    if kind in ("array", "map"):
        inner = _guard(
            schema["items"] if kind == "array" else schema["values"], named, f"{path}[]", seen
        )
        if inner is None:
            return None

        def each(value: Any) -> None:
            for item in value if kind == "array" else value.values():
                inner(item)

        return each
    if kind in _RANGES and "logicalType" in schema:
        return _guard(kind, named, path, seen)
    return None


def write(
    parsed: Any,
    prefix: bytes,
    value: Any,
    what: str,
    error: type[QTasksStreamError] = SerdeError,
    guard: Guard | None = None,
    compiled: Writer | None = None,
) -> bytes:
    """``prefix`` (a :func:`header`) and ``value`` in Avro.

    With ``guard`` (from :func:`int_guard`) the value is range-checked and written, and
    validated in full only if the writer fails, for a message that names the field;
    without, it is validated in full first. ``compiled`` (for ``parsed``, see
    :mod:`.compiled`, which checks int ranges itself) writes instead of the guard and
    fastavro; if it fails, they decide and say why.

    Raises:
        error: ``value`` does not fit: ``what`` (the complaint, say "value does not fit the
            schema of topic 't'"), then every problem.
    """
    if compiled is not None:
        out = bytearray(prefix)
        try:
            compiled(value, out)
        except (ValueError, TypeError, KeyError, AttributeError, struct.error):
            return write(parsed, prefix, value, what, error, guard)
        return bytes(out)
    buf = io.BytesIO()
    buf.write(prefix)
    try:
        if guard is None:
            validate(value, parsed, raise_errors=True)
        else:
            guard(value)
        fastavro.schemaless_writer(buf, parsed, value)
    except ValidationError as exc:
        problems = "; ".join(str(e) for e in exc.errors)
        raise error(f"{what}: {problems}") from exc
    except _OutOfRange as exc:
        raise error(f"{what}: {exc}") from exc
    except (ValueError, TypeError, KeyError, AttributeError, struct.error, _NoGuard) as exc:
        if guard is not None:
            # The fast path failed: validating says which field, in fastavro's words.
            return write(parsed, prefix, value, what, error)
        raise error(f"{what}: {exc}") from exc
    return buf.getvalue()


def read(
    data: bytes,
    schemas: WriterSchemas,
    reader: Any,
    what: str,
    *,
    reader_id: int | None = None,
    compiled: Reader | None = None,
    **options: Any,
) -> Any:
    """The value in ``data``, resolved to ``reader`` unless that is the writer's own schema
    (``reader_id``) or ``None``; ``options`` go to fastavro's reader. ``compiled`` (for
    schema ``reader_id``, see :mod:`.compiled`) reads the values written with that schema
    instead of fastavro; its values are those of ``return_record_name`` and
    ``return_record_name_override``.

    Raises:
        SerdeError: not the wire format, corrupt, or trailing bytes.
        SchemaError: the writer's schema cannot be had.
    """
    if len(data) < _HEADER.size:
        raise SerdeError(f"{what} is {len(data)} bytes: too short for Avro")
    magic, schema_id = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise SerdeError(f"{what} has magic byte {magic}, not 0: not Avro")
    if compiled is not None and schema_id == reader_id:
        try:
            value, end = compiled(data, _HEADER.size)
        except Exception as exc:  # corrupt input: IndexError, ValueError, KeyError...
            raise SerdeError(f"{what} (schema id {schema_id}) cannot be decoded: {exc!r}") from exc
    else:
        writer = schemas.get(schema_id)
        if schema_id == reader_id or reader is writer:
            reader = None
        buf = io.BytesIO(data)
        buf.seek(_HEADER.size)
        try:
            value = fastavro.schemaless_reader(buf, writer, reader, **options)
        except Exception as exc:  # fastavro raises many types for corrupt input
            raise SerdeError(f"{what} (schema id {schema_id}) cannot be decoded: {exc!r}") from exc
        end = buf.tell()
    if end > len(data):
        raise SerdeError(f"{what} (schema id {schema_id}) cannot be decoded: it is truncated")
    if end != len(data):
        raise SerdeError(f"{what} has {len(data) - end} trailing bytes after its body")
    return value
