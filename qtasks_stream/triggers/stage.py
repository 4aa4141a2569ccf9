"""The trigger stage: one ``Submitted`` event per record of the topics tasks are triggered by.

It consumes the foreign topics in its own consumer group and emits each task's ``Submitted``
tied to the record that started it, so the :class:`~qtasks_stream.stages.runner.StageRunner`
commits the record's offset in the same transaction as the event: a record starts exactly
one task, also across restarts and rebalances. The task id derives from the record's topic,
partition and offset (:func:`~qtasks_stream.triggers.base.trigger_task_id`), so should a
record ever be handled twice the scheduler sees one task submitted twice, and ignores the
repeat.

A record that cannot be decoded, whose value does not fit the task's arguments, or whose
filter raises goes to the dead-letter topic with its bytes, headers and the reason. A record
the filter rejects starts no task: :attr:`TriggerStage.counts` counts it as ``skipped`` and
interceptors are told (the metrics interceptor counts ``qtasks.triggers.skipped``).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.errors import QTasksStreamError, RegistryUnavailableError
from qtasks_stream.events import TaskEvent
from qtasks_stream.interceptors import Interceptor, SkipInput
from qtasks_stream.records import Record
from qtasks_stream.serde.payloads import TaskPayloads
from qtasks_stream.stages.base import Checkpoint, Incoming, Stage
from qtasks_stream.tasks import TaskDefinition
from qtasks_stream.topology import Topology
from qtasks_stream.triggers.base import Topic, TriggerRecord, trigger_task_id
from qtasks_stream.triggers.decode import RecordDecoder

__all__ = ["TriggerStage", "triggered"]

_SOURCE = "trigger"


def triggered(definitions: Mapping[str, TaskDefinition]) -> list[TaskDefinition]:
    """The tasks that a topic triggers."""
    return [d for d in definitions.values() if d.trigger is not None]


@dataclass(frozen=True, slots=True)
class _Trigger:
    definition: TaskDefinition
    topic: Topic
    #: The parameter that receives the :class:`TriggerRecord` (None: the task takes none).
    record_param: str | None


def _record_param(definition: TaskDefinition) -> str | None:
    parameters = list(inspect.signature(definition.fn).parameters.values())
    if definition.echo:
        parameters = parameters[1:]
    # The first parameter takes the value (TaskDefinition.build checked it is positional).
    parameters = parameters[1:]
    try:
        hints = typing.get_type_hints(definition.fn)
    except Exception:  # an unresolvable forward reference elsewhere: read the text
        hints = {}
    for p in parameters:
        hint = hints.get(p.name, p.annotation)
        if hint is TriggerRecord or hint in ("TriggerRecord", "triggers.TriggerRecord"):
            return p.name
    return None


class TriggerStage(Stage):
    name = "trigger"
    decode = False  # foreign records: decoded here, in the format each Topic names

    def __init__(
        self,
        topology: Topology,
        definitions: Mapping[str, TaskDefinition],
        payloads: TaskPayloads,
        registry: SchemaRegistryClient,
        interceptors: Sequence[Interceptor] = (),
    ) -> None:
        self._topology = topology
        self._payloads = payloads
        self._decoder = RecordDecoder(registry)
        self._interceptors = [i for i in interceptors if type(i).skipped is not Interceptor.skipped]
        self._by_topic: dict[str, list[_Trigger]] = {}
        for definition in triggered(definitions):
            assert definition.trigger is not None
            trigger = _Trigger(definition, definition.trigger, _record_param(definition))
            self._by_topic.setdefault(definition.trigger.name, []).append(trigger)
        #: Per task, records that ``submitted``, were ``skipped`` by the filter or were
        #: ``dead_lettered``, since this process started (committed or not yet).
        self.counts: dict[str, collections.Counter[str]] = {
            t.definition.name: collections.Counter()
            for triggers in self._by_topic.values()
            for t in triggers
        }

    @property
    def topics(self) -> Sequence[str]:
        return sorted(self._by_topic)

    async def handle(self, batch: Sequence[Incoming], checkpoint: Checkpoint) -> None:
        for item in batch:
            rec = item.record
            problems: list[str] = []
            error: BaseException | None = None
            for trigger in self._by_topic.get(rec.topic, ()):
                try:
                    self._start(trigger, rec, checkpoint)
                except RegistryUnavailableError:
                    raise  # the record is fine: the runner backs off and it is redone
                except Exception as exc:
                    # Bad input, or a filter that raised: the record keeps its bytes in the
                    # dead-letter topic, where the reason says which task refused it.
                    problems.append(f"task {trigger.definition.name!r}: {exc}")
                    error = exc
                    self.counts[trigger.definition.name]["dead_lettered"] += 1
            if problems:
                checkpoint.dead_letter(rec, "trigger cannot start: " + "; ".join(problems), error)

    def _start(self, trigger: _Trigger, rec: Record, checkpoint: Checkpoint) -> None:
        topic, definition = trigger.topic, trigger.definition
        value = self._decoder.value(topic, rec)
        record = self._decoder.record(topic, rec)
        if topic.filter is not None and not topic.filter(value, record):
            self.counts[definition.name]["skipped"] += 1
            skip = SkipInput(self.name, definition.name, rec)
            for interceptor in self._interceptors:
                interceptor.skipped(skip)
            return
        task_id = trigger_task_id(
            self._topology.app, definition.name, rec.topic, rec.partition, rec.offset
        )
        args, kwargs = self._arguments(trigger, value, record)
        call = self._payloads.encode_call(definition, args, kwargs)
        # The task's own options, as add_task without options would submit it (a record
        # carries no eta, priority or idempotency key of its own).
        submitted = call.submitted(definition)
        event = TaskEvent.new(task_id, definition.name, 0, _SOURCE, submitted)
        checkpoint.emit(self._topology.events, task_id, event, rec)
        self.counts[definition.name]["submitted"] += 1

    def _arguments(
        self, trigger: _Trigger, value: Any, record: TriggerRecord
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        plan = self._payloads.plan(trigger.definition)
        kwargs: dict[str, Any] = {}
        if trigger.record_param is not None:
            typed = plan.params is not None
            kwargs[trigger.record_param] = record if typed else dataclasses.asdict(record)
        if plan.params is not None:
            # A typed task: the plain decoded value becomes the first parameter's type
            # (a dataclass from a record, say), as a worker would read it.
            first = next(p for p in plan.params if p.name != trigger.record_param)
            try:
                value = first.type.from_avro(value)
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                raise QTasksStreamError(
                    f"the value does not fit parameter {first.name!r}: {exc!r}"
                ) from exc
        return (value,), kwargs
