"""Task arguments and results: typed Avro where the signature gives the types, JSON otherwise.

A task whose parameters are all annotated with types :mod:`qtasks_stream.serde.typed` maps
gets an ``Arguments`` record (one field per parameter); one with a mapped return annotation
gets a ``Result`` record (one field, ``value``). Each is registered under its own subject,
``<events topic>.task.<task name>.arguments`` / ``.result``, with the same compatibility
rules as the topics. The encoded record travels in the event's ``*_avro`` bytes field in the
Confluent wire format (magic byte, schema id, body) with content type :data:`AVRO`, so any
Avro client with the registry decodes it; the JSON text fields then hold ``[]``/``{}``/``""``.
Everything else (no annotations, ``*args``, types with no Avro form, generator items) travels
as JSON text with content type :data:`JSON`.

A worker decodes arguments with its own schema as the reader, so a client on an older
version of the task (fewer parameters with defaults, say) is resolved the Avro way.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.errors import ConfigurationError, SerdeError
from qtasks_stream.events import DEFAULT_QUEUE, Submitted
from qtasks_stream.serde import wire
from qtasks_stream.serde.typed import (
    AvroType,
    NoAvroMapping,
    avro_name,
    compile_hint,
    field_default,
)
from qtasks_stream.state import TaskState
from qtasks_stream.tasks import TaskDefinition

__all__ = ["AVRO", "JSON", "EncodedCall", "EncodedResult", "TaskPayloads", "task_subjects"]

log = logging.getLogger(__name__)

JSON = "application/json"
#: One Avro record in the Confluent wire format, in the event's bytes field.
AVRO = "application/vnd.qtasks.avro"


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    type: AvroType
    positional_only: bool
    keyword_only: bool


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one task's arguments and result travel; ``None`` parts go as JSON (``why``)."""

    params: tuple[_Param, ...] | None
    arguments: dict[str, Any] | None
    result: AvroType | None
    result_schema: dict[str, Any] | None
    why_json: str
    #: What a call binds to (without ``self`` for echo tasks); computed once, not per call.
    signature: inspect.Signature


@dataclass(frozen=True, slots=True)
class EncodedCall:
    content_type: str
    args: str
    kwargs: str
    arguments_avro: bytes | None

    def submitted(self, definition: TaskDefinition, **fields: Any) -> Submitted:
        """The Submitted of this call of ``definition``: the task's own priority, tags and
        named queue (None for the default one, as ``add_task`` writes it) unless ``fields``
        say otherwise, which also set the rest (workflow step, eta...)."""
        own: dict[str, Any] = {
            "priority": definition.priority,
            "tags": definition.tags,
            "queue": None if definition.queue == DEFAULT_QUEUE else definition.queue,
        }
        return Submitted(
            args=self.args,
            kwargs=self.kwargs,
            content_type=self.content_type,
            arguments_avro=self.arguments_avro,
            **(own | fields),
        )


@dataclass(frozen=True, slots=True)
class EncodedResult:
    content_type: str
    text: str
    data: bytes | None


def task_subjects(events_topic: str, task_name: str) -> tuple[str, str]:
    """The registry subjects of a task's arguments and of its result."""
    base = f"{events_topic}.task.{task_name}"
    return f"{base}.arguments", f"{base}.result"


def _plan(definition: TaskDefinition) -> _Plan:
    namespace = f"qtasks.stream.tasks.{avro_name(definition.name)}"
    reasons: list[str] = []
    params, arguments = _arguments(definition, namespace, reasons)
    result, result_schema = _result(definition, namespace, reasons)
    signature = inspect.signature(definition.fn)
    if definition.echo:
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    return _Plan(params, arguments, result, result_schema, "; ".join(reasons), signature)


def _hints(definition: TaskDefinition, reasons: list[str]) -> dict[str, Any] | None:
    try:
        return typing.get_type_hints(definition.fn, include_extras=True)
    except Exception as exc:  # a forward reference that does not resolve, for one
        reasons.append(f"its annotations do not resolve: {exc}")
        return None


def _arguments(
    definition: TaskDefinition, namespace: str, reasons: list[str]
) -> tuple[tuple[_Param, ...] | None, dict[str, Any] | None]:
    hints = _hints(definition, reasons)
    if hints is None:
        return None, None
    parameters = list(inspect.signature(definition.fn).parameters.values())
    if definition.echo:
        parameters = parameters[1:]  # `self`, filled in by the worker
    defined: dict[str, Any] = {}
    params: list[_Param] = []
    fields: list[dict[str, Any]] = []
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            reasons.append(f"arguments: *{p.name} has no fixed Avro field")
            return None, None
        if p.name not in hints:
            reasons.append(f"arguments: parameter {p.name!r} has no annotation")
            return None, None
        try:
            avro_type = compile_hint(hints[p.name], defined, f"parameter {p.name!r}")
        except NoAvroMapping as exc:
            reasons.append(f"arguments: {exc}")
            return None, None
        field: dict[str, Any] = {"name": p.name, "type": avro_type.schema}
        if p.default is not p.empty:
            field_default(field, p.default)
        fields.append(field)
        params.append(
            _Param(p.name, avro_type, p.kind is p.POSITIONAL_ONLY, p.kind is p.KEYWORD_ONLY)
        )
    if not params:
        # An empty record encodes to no bytes, which Confluent's deserializers refuse.
        reasons.append("arguments: the task takes none")
        return None, None
    schema = {
        "type": "record",
        "name": "Arguments",
        "namespace": namespace,
        "doc": f"Arguments of task {definition.name!r}, one field per parameter.",
        "fields": fields,
    }
    return tuple(params), schema


def _result(
    definition: TaskDefinition, namespace: str, reasons: list[str]
) -> tuple[AvroType | None, dict[str, Any] | None]:
    if definition.kind in ("asyncgen", "syncgen"):
        reasons.append("result: generator items travel as JSON")
        return None, None
    hints = _hints(definition, [])
    if hints is None or "return" not in hints:
        reasons.append("result: no return annotation")
        return None, None
    try:
        result = compile_hint(hints["return"], {}, "return value")
    except NoAvroMapping as exc:
        reasons.append(f"result: {exc}")
        return None, None
    if result.schema == "null":
        reasons.append("result: always None")  # an empty body, as above
        return None, None
    schema = {
        "type": "record",
        "name": "Result",
        "namespace": namespace,
        "doc": f"Return value of task {definition.name!r}.",
        "fields": [{"name": "value", "type": result.schema}],
    }
    return result, schema


class TaskPayloads:
    """Encodes and decodes the arguments and results of an app's tasks.

    Args:
        registry: the registry client the app's serde uses.
        events_topic: names the subjects (see :func:`task_subjects`).
        definitions: the app's tasks by name (read live: routers may be added later); tasks
            not in it are decoded with their writer's schema, to plain values.
    """

    def __init__(
        self,
        registry: SchemaRegistryClient,
        events_topic: str,
        definitions: Mapping[str, TaskDefinition],
    ) -> None:
        self._registry = registry
        self._events_topic = events_topic
        self._definitions = definitions
        self._plans: dict[str, _Plan] = {}
        self._parsed: dict[str, tuple[Any, Any]] = {}  # task → parsed (arguments, result)
        self._headers: dict[str, tuple[bytes | None, bytes | None]] = {}
        self._schemas = wire.WriterSchemas(registry)

    def plan(self, definition: TaskDefinition) -> _Plan:
        plan = self._plans.get(definition.name)
        if plan is None:
            plan = self._plans[definition.name] = _plan(definition)
            if plan.why_json:
                log.debug("task %s: partly JSON: %s", definition.name, plan.why_json)
        return plan

    def subject_schemas(self, definitions: Iterable[TaskDefinition]) -> dict[str, str]:
        """Subject → schema text of every typed part of ``definitions`` (for CLI checks)."""
        out: dict[str, str] = {}
        for definition in definitions:
            plan = self.plan(definition)
            arguments, result = task_subjects(self._events_topic, definition.name)
            if plan.arguments is not None:
                out[arguments] = json.dumps(plan.arguments)
            if plan.result_schema is not None:
                out[result] = json.dumps(plan.result_schema)
        return out

    async def start(self, definitions: Iterable[TaskDefinition]) -> None:
        """Register the schemas of tasks not registered yet (idempotent, cheap when done)."""
        pending = [d for d in definitions if d.name not in self._headers]
        if pending:
            await asyncio.to_thread(self._register, pending)

    def _register(self, definitions: Sequence[TaskDefinition]) -> None:
        from qtasks_stream.serde.compat import register_schemas

        subjects = self.subject_schemas(definitions)
        # One call for all: any incompatible task stops the app before anything is produced.
        ids = register_schemas(self._registry, subjects) if subjects else {}
        for definition in definitions:
            plan = self.plan(definition)
            arguments, result = task_subjects(self._events_topic, definition.name)
            parsed_arguments = (
                fastavro.parse_schema(plan.arguments) if plan.arguments is not None else None
            )
            parsed_result = (
                fastavro.parse_schema(plan.result_schema)
                if plan.result_schema is not None
                else None
            )
            self._parsed[definition.name] = (parsed_arguments, parsed_result)
            arguments_id, result_id = ids.get(arguments), ids.get(result)
            for schema_id, parsed in ((arguments_id, parsed_arguments), (result_id, parsed_result)):
                if schema_id is not None:
                    self._schemas.add(schema_id, parsed)
            self._headers[definition.name] = (
                wire.header(arguments_id) if arguments_id is not None else None,
                wire.header(result_id) if result_id is not None else None,
            )

    # -- arguments ------------------------------------------------------------------------

    def encode_call(
        self, definition: TaskDefinition, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> EncodedCall:
        """The call's arguments as they go into a Submitted event.

        Raises:
            ConfigurationError: the arguments do not fit the signature or its types.
        """
        plan = self.plan(definition)
        header = self._headers.get(definition.name, (None, None))[0]
        if plan.params is None or header is None:
            # Checked one by one first, so that the error names the argument.
            for index, arg in enumerate(args):
                _json(f"argument {index} of task {definition.name!r}", arg)
            for key, arg in kwargs.items():
                _json(f"keyword argument {key!r} of task {definition.name!r}", arg)
            return EncodedCall(
                JSON,
                _json(f"arguments of task {definition.name!r}", list(args)),
                _json(f"keyword arguments of task {definition.name!r}", kwargs),
                None,
            )
        bound = _bind(plan.signature, definition, args, kwargs)
        record: dict[str, Any] = {}
        for param in plan.params:
            try:
                record[param.name] = param.type.to_avro(bound[param.name])
            except (TypeError, ValueError, KeyError) as exc:
                raise ConfigurationError(
                    f"argument {param.name!r} of task {definition.name!r}: {exc}"
                ) from exc
        parsed = self._parsed[definition.name][0]
        data = wire.write(
            parsed,
            header,
            record,
            f"arguments of task {definition.name!r} do not fit their schema",
            ConfigurationError,
        )
        return EncodedCall(AVRO, "[]", "{}", data)

    def decode_call(
        self,
        definition: TaskDefinition | None,
        content_type: str,
        args: str,
        kwargs: str,
        arguments_avro: bytes | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments to call the task's function with.

        Raises:
            SerdeError: the encoded arguments are corrupt or of an unknown content type.
        """
        if content_type == JSON:
            decoded_args, decoded_kwargs = json.loads(args), json.loads(kwargs)
            if not isinstance(decoded_args, list) or not isinstance(decoded_kwargs, dict):
                raise SerdeError("arguments must be a JSON array and keyword arguments an object")
            return tuple(decoded_args), decoded_kwargs
        if content_type != AVRO or arguments_avro is None:
            raise SerdeError(f"arguments of content type {content_type!r} are not supported")
        if definition is None:
            # Another app's task: its arguments by name, as the writer's schema has them.
            return (), self._read(arguments_avro, None, "arguments")
        plan = self.plan(definition)
        if plan.params is None:
            raise SerdeError(
                f"task {definition.name!r} got Avro arguments but its signature here has no "
                f"Avro form ({plan.why_json})"
            )
        reader = self._reader(definition, 0)
        record = self._read(arguments_avro, reader, f"arguments of task {definition.name!r}")
        positional: list[Any] = []
        named: dict[str, Any] = {}
        for param in plan.params:
            if param.name not in record:
                continue
            value = param.type.from_avro(record[param.name])
            if param.positional_only:
                positional.append(value)
            else:
                named[param.name] = value
        return tuple(positional), named

    def task_values(self, state: TaskState) -> tuple[Any, Any, Any]:
        """``(args, kwargs, result)`` of a task as a client shows them (a PayloadDecoder)."""
        definition = self._definitions.get(state.task_name)
        args, kwargs = self.decode_call(
            definition, state.content_type, state.args, state.kwargs, state.arguments_avro
        )
        params = self.plan(definition).params if definition is not None else None
        if state.content_type == AVRO and params is not None:
            # One normal form, as a call would spell it: positional where the signature
            # allows it (the log does not say how the caller wrote the call).
            values = dict(zip((p.name for p in params if p.positional_only), args, strict=False))
            values.update(kwargs)
            args = tuple(values[p.name] for p in params if not p.keyword_only and p.name in values)
            kwargs = {p.name: values[p.name] for p in params if p.keyword_only and p.name in values}
        result = None
        if state.result is not None or state.result_avro is not None:
            result = self.decode_result(
                definition, state.result_content_type, state.result or "", state.result_avro
            )
        return list(args), kwargs, result

    # -- results --------------------------------------------------------------------------

    def encode_result(self, definition: TaskDefinition, value: Any) -> EncodedResult:
        """The return value as it goes into a Succeeded event.

        Raises:
            SerdeError: the value does not fit the return annotation, or is not JSON.
        """
        plan = self.plan(definition)
        header = self._headers.get(definition.name, (None, None))[1]
        if plan.result is None or header is None:
            try:
                return EncodedResult(JSON, json.dumps(value), None)
            except (TypeError, ValueError) as exc:
                raise SerdeError(
                    f"result of task {definition.name!r} is not JSON-serializable: {exc}"
                ) from exc
        try:
            record = {"value": plan.result.to_avro(value)}
        except (TypeError, ValueError, KeyError) as exc:
            raise SerdeError(
                f"result of task {definition.name!r} does not fit its return annotation: {exc}"
            ) from exc
        parsed = self._parsed[definition.name][1]
        data = wire.write(
            parsed, header, record, f"result of task {definition.name!r} does not fit its schema"
        )
        return EncodedResult(AVRO, "", data)

    def decode_result(
        self, definition: TaskDefinition | None, content_type: str, text: str, data: bytes | None
    ) -> Any:
        """The return value; typed when ``definition`` (this process's) has a result type.

        Raises:
            SerdeError: the encoded result is corrupt or of an unknown content type.
        """
        if content_type == JSON:
            return json.loads(text)
        if content_type != AVRO or data is None:
            raise SerdeError(f"result of content type {content_type!r} is not supported")
        plan = self.plan(definition) if definition is not None else None
        if plan is None or plan.result is None:
            # Another app's task, or one whose annotation here has no Avro form: plain data.
            return self._read(data, None, "a result")["value"]
        assert definition is not None
        record = self._read(data, self._reader(definition, 1), f"result of {definition.name!r}")
        return plan.result.from_avro(record["value"])

    def decode_plain(self, data: bytes, what: str) -> dict[str, Any]:
        """A typed payload as plain values, decoded with its writer's schema alone."""
        return self._read(data, None, what)

    # -- codecs ---------------------------------------------------------------------------

    def _reader(self, definition: TaskDefinition, part: int) -> Any:
        parsed = self._parsed.get(definition.name)
        if parsed is None:
            plan = self.plan(definition)
            schema = plan.arguments if part == 0 else plan.result_schema
            return fastavro.parse_schema(schema) if schema is not None else None
        return parsed[part]

    def _read(self, data: bytes, reader: Any, what: str) -> dict[str, Any]:
        value = wire.read(data, self._schemas, reader, what)
        if not isinstance(value, dict):
            raise SerdeError(f"{what} is not an Avro record")
        return value


def _bind(
    signature: inspect.Signature,
    definition: TaskDefinition,
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigurationError(f"arguments of task {definition.name!r}: {exc}") from exc
    # Defaults are sent too: a default the schema cannot express still reaches the worker.
    bound.apply_defaults()
    return dict(bound.arguments)


def _json(what: str, value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{what} cannot be sent as JSON: {exc}") from exc
