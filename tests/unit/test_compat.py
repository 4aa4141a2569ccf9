"""The schema contract tooling: local Avro compatibility checks and checked registration."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from qtasks_stream.errors import ConfigurationError, SchemaError
from qtasks_stream.serde.avro import subject_for
from qtasks_stream.serde.compat import (
    DEFAULT_COMPATIBILITY,
    IncompatibleSchemaError,
    Problem,
    check_compatibility,
    register_schemas,
    subject_schemas_for,
)
from qtasks_stream.serde.schemas import load_schema_text
from qtasks_stream.topology import Topology

SUBJECT = "unit.app.events-value"
TASK_EVENT: dict[str, Any] = json.loads(load_schema_text("TaskEvent"))


def text(schema: dict[str, Any]) -> str:
    return json.dumps(schema)


def evolved(change: str) -> dict[str, Any]:
    """A copy of the shipped TaskEvent with one change applied."""
    schema = copy.deepcopy(TASK_EVENT)
    fields = schema["fields"]
    payload = next(f for f in fields if f["name"] == "payload")["type"]
    submitted = next(b for b in payload if b["name"] == "Submitted")
    if change == "tenant with default":
        fields.append({"name": "tenant", "type": ["null", "string"], "default": None})
    elif change == "tenant without default":
        fields.append({"name": "tenant", "type": "string"})
    elif change == "attempt as string":
        next(f for f in fields if f["name"] == "attempt")["type"] = "string"
    elif change == "priority as string":
        next(f for f in submitted["fields"] if f["name"] == "priority")["type"] = "string"
    elif change == "submitted gains required field":
        submitted["fields"].append({"name": "owner", "type": "string"})
    elif change == "no DeadLettered":
        payload[:] = [b for b in payload if b["name"] != "DeadLettered"]
    elif change == "tags of ints":
        tags = next(f for f in submitted["fields"] if f["name"] == "tags")
        tags["type"] = {"type": "array", "items": "int"}
        tags["default"] = []
    else:
        raise AssertionError(change)
    return schema


@dataclass
class _Registered:
    """What ``get_version`` returns, as far as compat reads it."""

    version: int
    schema: Schema


@dataclass
class FakeRegistry:
    """The few registry calls compat makes, recorded, with injectable failures."""

    subjects: dict[str, list[str]] = field(default_factory=dict)
    fail: Exception | None = None
    fail_register: Exception | None = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    levels: dict[str, str] = field(default_factory=dict)
    level_set_by_another: str | None = None

    def get_versions(self, subject_name: str) -> list[int]:
        self.calls.append(("get_versions", subject_name))
        if self.fail is not None:
            raise self.fail
        if subject_name not in self.subjects:
            raise SchemaRegistryError(404, 40401, f"Subject '{subject_name}' not found.")
        return list(range(1, len(self.subjects[subject_name]) + 1))

    def get_version(self, subject_name: str, version: int) -> _Registered:
        self.calls.append(("get_version", subject_name, version))
        return _Registered(version, Schema(self.subjects[subject_name][version - 1], "AVRO"))

    def set_compatibility(self, subject_name: str, level: str) -> dict[str, str]:
        self.calls.append(("set_compatibility", subject_name, level))
        if self.level_set_by_another is not None:
            # Apicurio when another process set the level first: 409, level already there.
            self.levels[subject_name] = self.level_set_by_another
            raise SchemaRegistryError(409, 0, "A rule named 'COMPATIBILITY' already exists.")
        self.levels[subject_name] = level
        return {"compatibility": level}

    def get_compatibility(self, subject_name: str) -> str:
        self.calls.append(("get_compatibility", subject_name))
        return self.levels[subject_name]

    def register_schema(self, subject_name: str, schema: Schema) -> int:
        self.calls.append(("register_schema", subject_name))
        if self.fail_register is not None:
            raise self.fail_register
        versions = self.subjects.setdefault(subject_name, [])
        versions.append(schema.schema_str or "")
        return 100 + len(versions)

    def writes(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] in ("set_compatibility", "register_schema")]


def registry(**subjects: list[dict[str, Any]]) -> Any:
    return FakeRegistry({name: [text(s) for s in versions] for name, versions in subjects.items()})


def with_versions(*versions: dict[str, Any]) -> Any:
    return FakeRegistry({SUBJECT: [text(s) for s in versions]})


def record(*fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "record", "name": "R", "namespace": "unit", "fields": list(fields)}


# -- pure Avro checks ---------------------------------------------------------------------


def test_the_shipped_schema_is_compatible_with_itself() -> None:
    assert check_compatibility(with_versions(TASK_EVENT), {SUBJECT: text(TASK_EVENT)}) == []


def test_adding_a_field_with_a_default_is_backward_compatible() -> None:
    new = evolved("tenant with default")
    assert check_compatibility(with_versions(TASK_EVENT), {SUBJECT: text(new)}) == []
    # ... and forward: the old schema ignores the new field.
    assert check_compatibility(with_versions(TASK_EVENT), {SUBJECT: text(new)}, "FULL") == []


def test_adding_a_field_without_a_default_names_the_field() -> None:
    problems = check_compatibility(
        with_versions(TASK_EVENT), {SUBJECT: text(evolved("tenant without default"))}
    )
    assert problems == [
        Problem(
            subject=SUBJECT,
            version=1,
            rule="BACKWARD_TRANSITIVE: the new schema cannot read data written with version 1",
            field="tenant",
            location="/fields/8",
            kind="reader_field_missing_default_value",
            message="reader field 'tenant' has no default value and the writer's schema "
            "does not have it",
        )
    ]
    assert "field 'tenant'" in str(problems[0])


def test_a_required_field_in_a_payload_branch_is_named_through_the_union() -> None:
    # The checker alone only says "reader union lacking writer type: RECORD" at the union.
    [problem] = check_compatibility(
        with_versions(TASK_EVENT), {SUBJECT: text(evolved("submitted gains required field"))}
    )
    assert problem.field == "payload.Submitted.owner"
    submitted_fields = len(TASK_EVENT["fields"][7]["type"][0]["fields"])  # owner goes last
    assert problem.location == f"/fields/7/type/0/fields/{submitted_fields}"
    assert problem.kind == "reader_field_missing_default_value"


@pytest.mark.parametrize(
    ("change", "field_path", "location", "message"),
    [
        (
            "attempt as string",
            "attempt",
            "/fields/3/type",
            "reader type: string not compatible with writer type: int",
        ),
        (
            "priority as string",
            "payload.Submitted.priority",
            "/fields/7/type/0/fields/3/type",
            "reader type: string not compatible with writer type: int",
        ),
        (
            "tags of ints",
            "payload.Submitted.tags[]",
            "/fields/7/type/0/fields/7/type/items",
            "reader type: int not compatible with writer type: string",
        ),
    ],
)
def test_changing_a_type_is_refused_with_the_checkers_message(
    change: str, field_path: str, location: str, message: str
) -> None:
    [problem] = check_compatibility(with_versions(TASK_EVENT), {SUBJECT: text(evolved(change))})
    assert (problem.field, problem.location, problem.kind, problem.message) == (
        field_path,
        location,
        "type_mismatch",
        message,
    )


def test_removing_a_union_branch_is_refused() -> None:
    [problem] = check_compatibility(
        with_versions(TASK_EVENT), {SUBJECT: text(evolved("no DeadLettered"))}
    )
    assert problem.field == "payload.DeadLettered"
    assert problem.location == "/fields/7/type/11"
    assert problem.kind == "missing_union_branch"
    assert "DeadLettered" in problem.message


def test_transitive_checks_every_version_latest_only_the_last() -> None:
    v1 = record({"name": "a", "type": "int"})
    v2 = record({"name": "a", "type": "int"}, {"name": "b", "type": "int", "default": 0})
    # b loses its default: fine against v2 (which writes b), not against v1 (which does not).
    new = record({"name": "a", "type": "int"}, {"name": "b", "type": "int"})

    latest = with_versions(v1, v2)
    assert check_compatibility(latest, {SUBJECT: text(new)}, "BACKWARD") == []
    assert [c for c in latest.calls if c[0] == "get_version"] == [("get_version", SUBJECT, 2)]

    transitive = with_versions(v1, v2)
    [problem] = check_compatibility(transitive, {SUBJECT: text(new)}, "BACKWARD_TRANSITIVE")
    assert (problem.version, problem.field) == (1, "b")
    assert problem.rule.startswith("BACKWARD_TRANSITIVE: ")
    assert "version 1" in problem.rule


def test_forward_and_full_check_the_other_direction() -> None:
    old = record({"name": "a", "type": "int"}, {"name": "b", "type": "string"})
    new = record({"name": "a", "type": "int"})  # drops b, which old readers need
    local = {SUBJECT: text(new)}
    assert check_compatibility(with_versions(old), local, "BACKWARD") == []
    [forward] = check_compatibility(with_versions(old), local, "FORWARD")
    assert forward.field == "b"
    assert forward.rule == (
        "FORWARD: data written with the new schema cannot be read with version 1"
    )
    [full] = check_compatibility(with_versions(old), local, "full_transitive")
    assert full.rule.startswith("FULL_TRANSITIVE: data written with the new schema")


def test_none_checks_nothing_and_asks_the_registry_nothing() -> None:
    fake = with_versions(TASK_EVENT)
    local = {SUBJECT: text(evolved("attempt as string"))}
    assert check_compatibility(fake, local, "NONE") == []
    assert fake.calls == []


def test_a_subject_not_in_the_registry_has_no_problems() -> None:
    fake = registry()
    local = {SUBJECT: text(evolved("attempt as string"))}
    assert check_compatibility(fake, local) == []
    assert fake.calls == [("get_versions", SUBJECT)]


def test_the_mock_registry_reports_unknown_subjects_as_no_versions() -> None:
    mock = SchemaRegistryClient.new_client({"url": "mock://compat-unknown"})
    assert check_compatibility(mock, {SUBJECT: text(TASK_EVENT)}) == []


def test_an_unknown_level_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="SIDEWAYS"):
        check_compatibility(registry(), {SUBJECT: text(TASK_EVENT)}, "SIDEWAYS")


def test_an_invalid_local_schema_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match=f"local schema of subject '{SUBJECT}'"):
        check_compatibility(registry(), {SUBJECT: '{"type": "record", "name": "R"}'})


# -- registry failures --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (SchemaRegistryError(500, 50001, "boom"), "answered with an error"),
        # A 404 that is not "subject not found" (a wrong URL) must not pass as "no versions".
        (SchemaRegistryError(404, -1, "HTTP 404 Not Found"), "answered with an error"),
        (ConnectionError("connection refused"), "unreachable"),
    ],
)
def test_registry_errors_raise_schema_error_from_the_cause(error: Exception, words: str) -> None:
    fake = FakeRegistry(fail=error)
    with pytest.raises(SchemaError, match=words) as caught:
        check_compatibility(fake, {SUBJECT: text(TASK_EVENT)})
    assert caught.value.__cause__ is error


# -- registration -------------------------------------------------------------------------


def test_register_sets_the_level_then_registers_each_subject() -> None:
    fake = registry(**{SUBJECT: [TASK_EVENT]})
    other = "unit.app.control-value"
    ids = register_schemas(
        fake,
        {SUBJECT: text(evolved("tenant with default")), other: load_schema_text("ControlCommand")},
    )
    assert ids == {SUBJECT: 102, other: 101}
    assert fake.writes() == [
        ("set_compatibility", SUBJECT, DEFAULT_COMPATIBILITY),
        ("register_schema", SUBJECT),
        ("set_compatibility", other, DEFAULT_COMPATIBILITY),
        ("register_schema", other),
    ]


def test_register_refuses_everything_when_any_subject_has_a_problem() -> None:
    fake = registry(**{SUBJECT: [TASK_EVENT]})
    fine = "unit.app.control-value"
    with pytest.raises(IncompatibleSchemaError) as caught:
        register_schemas(
            fake,
            {fine: load_schema_text("ControlCommand"), SUBJECT: text(evolved("attempt as string"))},
        )
    assert isinstance(caught.value, SchemaError)
    assert [p.field for p in caught.value.problems] == ["attempt"]
    assert "'attempt'" in str(caught.value) and SUBJECT in str(caught.value)
    assert fake.writes() == []  # not even the compatible subject


def test_register_maps_a_registry_refusal_to_schema_error() -> None:
    refusal = SchemaRegistryError(409, 409, "Incompatible artifact")
    fake = FakeRegistry(fail_register=refusal)
    with pytest.raises(SchemaError, match="refused it as incompatible") as caught:
        register_schemas(fake, {SUBJECT: text(TASK_EVENT)})
    assert caught.value.__cause__ is refusal


def test_register_passes_the_normalized_level() -> None:
    fake = registry()
    register_schemas(fake, {SUBJECT: text(TASK_EVENT)}, "full")
    assert fake.levels == {SUBJECT: "FULL"}


def test_register_on_the_mock_registry_skips_the_level_and_still_checks() -> None:
    # The mock's set_compatibility would send an HTTP request to "mock://" and fail.
    mock = SchemaRegistryClient.new_client({"url": "mock://compat-register"})
    first = register_schemas(mock, {SUBJECT: text(TASK_EVENT)})
    assert first[SUBJECT] == mock.get_latest_version(SUBJECT).schema_id
    with pytest.raises(IncompatibleSchemaError, match="tenant"):
        register_schemas(mock, {SUBJECT: text(evolved("tenant without default"))})
    assert mock.get_versions(SUBJECT) == [1]
    register_schemas(mock, {SUBJECT: text(evolved("tenant with default"))})
    assert sorted(mock.get_versions(SUBJECT)) == [1, 2]


def test_subject_schemas_for_covers_every_avro_topic_of_the_app() -> None:
    topology = Topology("shop", lanes=2)
    subjects = subject_schemas_for(topology)
    assert subjects == {
        "qtasks.shop.events-value": load_schema_text("TaskEvent"),
        "qtasks.shop.control-value": load_schema_text("ControlCommand"),
        "qtasks.shop.lane.0-value": load_schema_text("WorkItem"),
        "qtasks.shop.lane.1-value": load_schema_text("WorkItem"),
        "qtasks.shop.snapshots-value": load_schema_text("TaskSnapshot"),
        "qtasks.shop.schedules-value": load_schema_text("ScheduleEvent"),
    }
    assert set(subjects) == {subject_for(t) for t in topology.topic_schemas()}


def test_a_level_pinned_meanwhile_by_another_process_is_accepted_only_if_it_is_ours() -> None:
    # A worker and a client starting together both pin a new subject's level; Apicurio
    # answers the second with 409 instead of updating. The same level is fine...
    same = FakeRegistry(level_set_by_another="BACKWARD_TRANSITIVE")
    ids = register_schemas(same, {SUBJECT: text(TASK_EVENT)}, "BACKWARD_TRANSITIVE")
    assert ids == {SUBJECT: 101}
    assert ("get_compatibility", SUBJECT) in same.calls
    # ...another level is still refused, before anything is registered.
    other = FakeRegistry(level_set_by_another="NONE")
    with pytest.raises(SchemaError, match="already exists"):
        register_schemas(other, {SUBJECT: text(TASK_EVENT)}, "BACKWARD_TRANSITIVE")
    assert not any(c[0] == "register_schema" for c in other.calls)
