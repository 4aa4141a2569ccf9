"""The schema contract: check local schemas against a registry before registering them.

Every topic's values have one subject (``<topic>-value``, the topic name strategy) and the
registry keeps its versions. Other teams' consumers read those topics with whatever version
they hold, so a change to a shipped schema is only acceptable if it keeps the subject's
compatibility level, ``BACKWARD_TRANSITIVE`` by default: the new schema must read data
written with every version registered before it.

:func:`check_compatibility` checks locally (with the ``avro`` package's
``ReaderWriterCompatibilityChecker``) and reports each incompatibility with the subject,
version, rule, field path and message; :func:`register_schemas` refuses to register anything
if any is found, then pins each subject's compatibility level in the registry and registers.

The checker's own result keeps messages and locations in unpaired sets and loses the
location inside unions (its union branches restart at ``/``), so the walk here descends
records, unions, arrays and maps itself, asks the checker whether each pair is compatible,
and takes the checker's message where the incompatibility bottoms out: every problem names
the field it is about (``payload.Submitted.priority``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import avro.errors
import avro.schema
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityResult,
    SchemaCompatibilityType,
    SchemaIncompatibilityType,
    lookup_writer_field,
    schema_name_equals,
)
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from qtasks_stream.errors import ConfigurationError, SchemaError
from qtasks_stream.serde.avro import subject_for
from qtasks_stream.serde.registry import raise_if_refused
from qtasks_stream.serde.schemas import load_schema_text
from qtasks_stream.topology import Topology

__all__ = [
    "COMPATIBILITY_LEVELS",
    "DEFAULT_COMPATIBILITY",
    "IncompatibleSchemaError",
    "Problem",
    "check_compatibility",
    "register_schemas",
    "subject_schemas_for",
]

#: Every registered version must stay readable by the newest schema.
DEFAULT_COMPATIBILITY = "BACKWARD_TRANSITIVE"

_BACKWARD = "backward"
_FORWARD = "forward"
_DIRECTIONS: dict[str, tuple[str, ...]] = {
    "NONE": (),
    "BACKWARD": (_BACKWARD,),
    "FORWARD": (_FORWARD,),
    "FULL": (_BACKWARD, _FORWARD),
}
#: The levels a Confluent-compatible registry understands.
COMPATIBILITY_LEVELS = frozenset(
    {*_DIRECTIONS, *(f"{level}_TRANSITIVE" for level in _DIRECTIONS if level != "NONE")}
)

#: Registry error codes: the subject, or one version of it, does not exist.
_SUBJECT_NOT_FOUND = 40401
_VERSION_NOT_FOUND = 40402

_MOCK_MODULES = (
    "confluent_kafka.schema_registry._sync.mock_schema_registry_client",  # 2.10 and later
    "confluent_kafka.schema_registry.mock_schema_registry_client",  # earlier releases
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Problem:
    """One incompatibility between a local schema and one registered version.

    Attributes:
        subject: the registry subject (``<topic>-value``).
        version: the registered version the local schema conflicts with.
        rule: the level and direction that is broken, e.g. ``"BACKWARD_TRANSITIVE: the new
            schema cannot read data written with version 2"``.
        field: readable path of the field, union branches by record name
            (``payload.Submitted.priority``); ``""`` for the schema as a whole.
        location: the same place as the checker spells it (``/fields/7/type/0/fields/3``):
            field indexes count the reader's fields, union indexes the writer's branches.
        kind: the checker's incompatibility type (``reader_field_missing_default_value``,
            ``type_mismatch``, ``missing_union_branch``, ``name_mismatch``...).
        message: what is wrong, in the checker's words.
    """

    subject: str
    version: int
    rule: str
    field: str
    location: str
    kind: str
    message: str

    def __str__(self) -> str:
        where = f"field {self.field!r}" if self.field else "the whole schema"
        return f"{self.subject}: {self.rule}: {where} ({self.location}): {self.message}"


class IncompatibleSchemaError(SchemaError):
    """A local schema breaks its subject's compatibility level; nothing was registered."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        subjects = sorted({problem.subject for problem in self.problems})
        super().__init__(
            f"refusing to register schemas: {len(self.problems)} incompatibilities with "
            f"registered versions of {', '.join(subjects)} (nothing was registered):\n{lines}"
        )


def subject_schemas_for(topology: Topology) -> dict[str, str]:
    """Subject → schema text for every topic of the application whose values are Avro."""
    return {
        subject_for(topic): load_schema_text(name)
        for topic, name in topology.topic_schemas().items()
    }


def check_compatibility(
    registry: SchemaRegistryClient,
    subject_schemas: Mapping[str, str],
    level: str = DEFAULT_COMPATIBILITY,
) -> list[Problem]:
    """Every incompatibility of the local schemas with what the registry holds.

    Args:
        registry: a Confluent-compatible registry client.
        subject_schemas: subject → local schema text (Avro JSON).
        level: ``BACKWARD`` (the new schema reads old data), ``FORWARD`` (old schemas read
            new data), ``FULL`` (both), each against the latest version only or, with
            ``_TRANSITIVE``, against every registered version; ``NONE`` checks nothing.

    Subjects the registry does not know yet have no problems.

    Raises:
        ConfigurationError: ``level`` is not a compatibility level.
        SchemaError: a schema is not valid Avro, or the registry failed or is unreachable.
    """
    level, directions, transitive = _parse_level(level)
    problems: list[Problem] = []
    for subject, text in subject_schemas.items():
        local = _parse(text, f"the local schema of subject {subject!r}")
        if not directions:
            continue
        versions = _registered_versions(registry, subject)
        for version in versions if transitive else versions[-1:]:
            registered = _registered_schema(registry, subject, version)
            if registered is None:
                continue  # deleted between listing and fetching
            for direction in directions:
                if direction == _BACKWARD:
                    reader, writer = local, registered
                    rule = (
                        f"{level}: the new schema cannot read data written with version {version}"
                    )
                else:
                    reader, writer = registered, local
                    rule = (
                        f"{level}: data written with the new schema cannot be read "
                        f"with version {version}"
                    )
                problems.extend(
                    Problem(subject, version, rule, f.field, f.location, f.kind, f.message)
                    for f in _incompatibilities(reader, writer)
                )
    return problems


def register_schemas(
    registry: SchemaRegistryClient,
    subject_schemas: Mapping[str, str],
    level: str = DEFAULT_COMPATIBILITY,
) -> dict[str, int]:
    """Check, then pin each subject's compatibility level and register its schema.

    Nothing is registered (and no level changed) when any subject has a problem. On the
    in-process ``mock://`` registry, which has no compatibility settings, the level is not
    set; the check still runs.

    Returns:
        subject → schema id.

    Raises:
        IncompatibleSchemaError: (a :class:`SchemaError`) listing every problem.
        SchemaError: the registry failed, is unreachable, or refused a schema itself.
    """
    level = _parse_level(level)[0]
    problems = check_compatibility(registry, subject_schemas, level)
    if problems:
        raise IncompatibleSchemaError(problems)
    configurable = not _is_mock(registry)
    ids: dict[str, int] = {}
    for subject, text in subject_schemas.items():
        if configurable:
            # Pinned before registering: the registry then enforces the same level we checked
            # (against versions registered meanwhile too), not whatever its global default is.
            _pin_level(registry, subject, level)
        ids[subject] = _call(
            registry,
            functools.partial(registry.register_schema, subject, Schema(text, "AVRO")),
            f"registering the schema of subject {subject!r}",
        )
    return ids


# -- registry access ------------------------------------------------------------------------


def _pin_level(registry: SchemaRegistryClient, subject: str, level: str) -> None:
    """Set ``subject``'s compatibility level; a concurrent setter of the same level is fine.

    Two processes starting together (a worker and a client of one app) both pin a new
    subject's level. Apicurio's Confluent API answers the second with 409 "A rule named
    'COMPATIBILITY' already exists" instead of updating it: the level is read back then.
    """
    what = f"setting compatibility {level} on subject {subject!r}"
    try:
        _call(
            registry,
            functools.partial(registry.set_compatibility, subject_name=subject, level=level),
            what,
        )
        return
    except SchemaError as error:
        cause = error.__cause__
        if not (isinstance(cause, SchemaRegistryError) and cause.http_status_code == 409):
            raise
        refused = error
    current = _call(
        registry,
        functools.partial(registry.get_compatibility, subject_name=subject),
        f"reading the compatibility of subject {subject!r}",
    )
    if str(current).upper() != level:
        raise refused


def _call(registry: SchemaRegistryClient, action: Callable[[], _T], what: str) -> _T:
    try:
        return action()
    except SchemaRegistryError as exc:
        raise_if_refused(registry, exc, what)
        if exc.http_status_code == 409:
            raise SchemaError(
                f"{what}: the registry refused it as incompatible with its registered "
                f"versions under its own rules: {exc}"
            ) from exc
        raise SchemaError(f"{what}: the schema registry answered with an error: {exc}") from exc
    except Exception as exc:  # the client raises its HTTP library's errors for transport failures
        raise SchemaError(f"{what}: the schema registry is unreachable: {exc!r}") from exc


def _registered_versions(registry: SchemaRegistryClient, subject: str) -> list[int]:
    try:
        versions = registry.get_versions(subject)
    except SchemaRegistryError as exc:
        raise_if_refused(registry, exc, f"listing the versions of subject {subject!r}")
        if exc.error_code == _SUBJECT_NOT_FOUND:
            return []
        raise SchemaError(
            f"listing the versions of subject {subject!r}: the schema registry answered with "
            f"an error: {exc}"
        ) from exc
    except Exception as exc:
        raise SchemaError(
            f"listing the versions of subject {subject!r}: the schema registry is unreachable: "
            f"{exc!r}"
        ) from exc
    return sorted(int(v) for v in versions)


def _registered_schema(
    registry: SchemaRegistryClient, subject: str, version: int
) -> avro.schema.Schema | None:
    what = f"version {version} of subject {subject!r}"
    try:
        registered = registry.get_version(subject, version)
    except SchemaRegistryError as exc:
        raise_if_refused(registry, exc, f"fetching {what}")
        if exc.error_code == _VERSION_NOT_FOUND:
            return None
        raise SchemaError(
            f"fetching {what}: the schema registry answered with an error: {exc}"
        ) from exc
    except Exception as exc:
        raise SchemaError(f"fetching {what}: the schema registry is unreachable: {exc!r}") from exc
    schema = registered.schema
    schema_type = (schema.schema_type or "AVRO").upper()
    if schema_type != "AVRO":
        raise SchemaError(f"{what} is a {schema_type} schema, not Avro")
    return _parse(schema.schema_str or "", what)


def _is_mock(registry: object) -> bool:
    """The in-process ``mock://`` client, which cannot hold compatibility settings."""
    for module_name in _MOCK_MODULES:
        try:
            mock_type = importlib.import_module(module_name).MockSchemaRegistryClient
        except (ImportError, AttributeError):
            continue
        if isinstance(registry, mock_type):
            return True
    return False


# -- levels and parsing ---------------------------------------------------------------------


def _parse_level(level: str) -> tuple[str, tuple[str, ...], bool]:
    normalized = level.strip().upper()
    if normalized not in COMPATIBILITY_LEVELS:
        raise ConfigurationError(
            f"unknown compatibility level {level!r}; choose from {sorted(COMPATIBILITY_LEVELS)}"
        )
    base = normalized.removesuffix("_TRANSITIVE")
    return normalized, _DIRECTIONS[base], base != normalized


def _parse(text: str, what: str) -> avro.schema.Schema:
    try:
        return avro.schema.parse(text)
    except (avro.errors.AvroException, ValueError, TypeError) as exc:
        raise SchemaError(f"{what} is not a valid Avro schema: {exc}") from exc


# -- the walk -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Found:
    field: str
    location: str
    kind: str
    message: str


def _checker_result(
    reader: avro.schema.Schema, writer: avro.schema.Schema
) -> SchemaCompatibilityResult:
    # A fresh checker each time: it memoizes results together with the locations of the
    # first call, which would be wrong relative to any other starting point.
    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    return checker.get_compatibility(reader, writer)


def _compatible(reader: avro.schema.Schema, writer: avro.schema.Schema) -> bool:
    result = _checker_result(reader, writer)
    return result.compatibility is not SchemaCompatibilityType.incompatible


def _incompatibilities(reader: avro.schema.Schema, writer: avro.schema.Schema) -> list[_Found]:
    return _walk(reader, writer, (), ())


def _location(tokens: Sequence[str]) -> str:
    return "/" + "/".join(tokens)


def _label(schema: avro.schema.Schema) -> str:
    if isinstance(schema, avro.schema.NamedSchema):
        return str(schema.name)
    return str(schema.type)


def _suffixed(path: tuple[str, ...], suffix: str) -> tuple[str, ...]:
    return (*path[:-1], path[-1] + suffix) if path else (suffix,)


def _counterpart(
    reader: avro.schema.UnionSchema, writer_branch: avro.schema.Schema
) -> avro.schema.Schema | None:
    """The reader branch that stands for ``writer_branch``: same name, or same unnamed type."""
    for branch in reader.schemas:
        if branch.type != writer_branch.type:
            continue
        if isinstance(branch, avro.schema.NamedSchema):
            named = cast(avro.schema.NamedSchema, writer_branch)
            if schema_name_equals(branch, named) or branch.fullname == named.fullname:
                return cast(avro.schema.Schema, branch)
        else:
            return cast(avro.schema.Schema, branch)
    return None


def _walk(
    reader: avro.schema.Schema,
    writer: avro.schema.Schema,
    loc: tuple[str, ...],
    path: tuple[str, ...],
) -> list[_Found]:
    if _compatible(reader, writer):
        return []
    found: list[_Found] = []
    if isinstance(reader, avro.schema.RecordSchema) and isinstance(
        writer, avro.schema.RecordSchema
    ):
        found.extend(_walk_record(reader, writer, loc, path))
    elif isinstance(writer, avro.schema.UnionSchema):
        for index, branch in enumerate(writer.schemas):
            branch = cast(avro.schema.Schema, branch)
            if _compatible(reader, branch):
                continue
            bloc = (*loc, str(index))
            if isinstance(reader, avro.schema.UnionSchema):
                bpath = (*path, _label(branch))
                match = _counterpart(reader, branch)
                if match is None:
                    found.append(
                        _Found(
                            ".".join(bpath),
                            _location(bloc),
                            SchemaIncompatibilityType.missing_union_branch.value,
                            f"reader union lacking writer type: {branch.type.upper()} "
                            f"({_label(branch)})",
                        )
                    )
                else:
                    found.extend(_walk(match, branch, bloc, bpath))
            else:
                found.extend(_walk(reader, branch, bloc, path))
    elif isinstance(reader, avro.schema.UnionSchema):
        match = _counterpart(reader, writer)
        if match is not None:
            found.extend(_walk(match, writer, loc, (*path, _label(match))))
    elif isinstance(reader, avro.schema.ArraySchema) and isinstance(
        writer, avro.schema.ArraySchema
    ):
        found.extend(_walk(reader.items, writer.items, (*loc, "items"), _suffixed(path, "[]")))
    elif isinstance(reader, avro.schema.MapSchema) and isinstance(writer, avro.schema.MapSchema):
        found.extend(_walk(reader.values, writer.values, (*loc, "values"), _suffixed(path, "{}")))
    if not found:
        found.extend(_leaf(reader, writer, loc, path))
    return found


def _walk_record(
    reader: avro.schema.RecordSchema,
    writer: avro.schema.RecordSchema,
    loc: tuple[str, ...],
    path: tuple[str, ...],
) -> list[_Found]:
    found: list[_Found] = []
    if not schema_name_equals(reader, writer):
        found.append(
            _Found(
                ".".join(path),
                _location((*loc, "name")),
                SchemaIncompatibilityType.name_mismatch.value,
                f"expected: {writer.fullname}",
            )
        )
    for index, reader_field in enumerate(reader.fields):
        floc = (*loc, "fields", str(index))
        fpath = (*path, reader_field.name)
        writer_field = lookup_writer_field(writer_schema=writer, reader_field=reader_field)
        if writer_field is not None:
            found.extend(_walk(reader_field.type, writer_field.type, (*floc, "type"), fpath))
        elif not reader_field.has_default:
            found.append(
                _Found(
                    ".".join(fpath),
                    _location(floc),
                    SchemaIncompatibilityType.reader_field_missing_default_value.value,
                    f"reader field {reader_field.name!r} has no default value and the "
                    "writer's schema does not have it",
                )
            )
    return found


def _leaf(
    reader: avro.schema.Schema,
    writer: avro.schema.Schema,
    loc: tuple[str, ...],
    path: tuple[str, ...],
) -> list[_Found]:
    """The checker's own verdict where the walk cannot descend any further."""
    result = _checker_result(reader, writer)
    kinds = ", ".join(sorted({k.value for k in result.incompatibilities})) or "incompatible"
    # Relative to this pair the checker's locations are right (``/``, ``/symbols``...).
    inner = sorted(result.locations)
    extra = [t for t in inner[0].split("/") if t] if len(inner) == 1 else []
    messages = sorted(result.messages) or [
        f"reader type {reader.type} cannot read writer type {writer.type}"
    ]
    return [_Found(".".join(path), _location((*loc, *extra)), kinds, m) for m in messages]
