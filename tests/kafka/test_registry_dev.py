"""The dev schema registry (``qtasks_stream.devenv.registry``) against confluent-kafka's client.

The registry is started by the test command, which exports its URL (the ccompat base, e.g.
``http://127.0.0.1:18081/apis/ccompat/v7``) as ``QTASKS_TEST_SCHEMA_REGISTRY_URL``. Subjects get
a random suffix: the dev registry keeps its schemas across runs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

pytestmark = pytest.mark.kafka


@pytest.fixture
def registry(schema_registry_url: str) -> Iterator[SchemaRegistryClient]:
    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as client:
        yield client


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _record(*fields: dict[str, Any]) -> str:
    return json.dumps(
        {"type": "record", "name": "DevTask", "namespace": "qtasks.test", "fields": list(fields)}
    )


ID = {"name": "task_id", "type": "string"}
ATTEMPT_WITH_DEFAULT = {"name": "attempt", "type": "int", "default": 0}
ATTEMPT_NO_DEFAULT = {"name": "attempt", "type": "int"}
PRIORITY_NO_DEFAULT = {"name": "priority", "type": "int"}


def test_register_then_fetch_by_id(
    registry: SchemaRegistryClient, schema_registry_url: str
) -> None:
    subject = _unique("qtasks-test-register") + "-value"
    text = _record(ID, ATTEMPT_WITH_DEFAULT)

    schema_id = registry.register_schema(subject, Schema(text, "AVRO"))

    # A fresh client: nothing may come from the registering client's cache.
    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as fresh:
        fetched = fresh.get_schema(schema_id)
        assert fetched.schema_type in (None, "AVRO")
        assert json.loads(fetched.schema_str or "") == json.loads(text)
        latest = fresh.get_latest_version(subject)
        assert (latest.schema_id, latest.version) == (schema_id, 1)
        # Confluent's id semantics: re-registering returns the same id, and so does the same
        # schema under another subject (ids are per content, not per subject version).
        assert fresh.register_schema(subject, Schema(text, "AVRO")) == schema_id
        other = _unique("qtasks-test-register-other") + "-value"
        assert fresh.register_schema(other, Schema(text, "AVRO")) == schema_id
        assert fresh.get_versions(subject) == [1]


def test_incompatible_change_refused_under_backward_transitive(
    registry: SchemaRegistryClient,
) -> None:
    subject = _unique("qtasks-test-compat") + "-value"
    registry.set_compatibility(subject, "BACKWARD_TRANSITIVE")
    assert registry.get_compatibility(subject) == "BACKWARD_TRANSITIVE"
    registry.register_schema(subject, Schema(_record(ID), "AVRO"))

    compatible = Schema(_record(ID, ATTEMPT_WITH_DEFAULT), "AVRO")
    new_field_without_default = Schema(_record(ID, PRIORITY_NO_DEFAULT), "AVRO")
    assert registry.test_compatibility(subject, compatible) is True
    assert registry.test_compatibility(subject, new_field_without_default) is False

    with pytest.raises(SchemaRegistryError) as refused:
        registry.register_schema(subject, new_field_without_default)
    assert refused.value.http_status_code == 409
    assert refused.value.error_code == 409
    message = refused.value.error_message
    assert "incompatible" in message.lower()
    assert "priority" in message, message  # the offending field is named

    registry.register_schema(subject, compatible)
    # Backward compatible with version 2 (which has 'attempt') but not with version 1: only a
    # transitive check refuses it.
    only_against_latest = Schema(_record(ID, ATTEMPT_NO_DEFAULT), "AVRO")
    assert registry.test_compatibility(subject, only_against_latest) is True
    assert registry.test_compatibility_all_versions(subject, only_against_latest) is False
    with pytest.raises(SchemaRegistryError) as refused_transitively:
        registry.register_schema(subject, only_against_latest)
    assert refused_transitively.value.http_status_code == 409
    assert "attempt" in refused_transitively.value.error_message
    assert registry.get_versions(subject) == [1, 2]


@pytest.mark.parametrize(
    "serializer_conf",
    [
        pytest.param({"auto.register.schemas": True}, id="default-strategy"),
        pytest.param(
            {"auto.register.schemas": True, "subject.name.strategy.type": "TOPIC"},
            id="topic-strategy",
        ),
    ],
)
def test_avro_serializer_deserializer_round_trip(
    registry: SchemaRegistryClient, schema_registry_url: str, serializer_conf: dict[str, Any]
) -> None:
    topic = _unique("qtasks-test-roundtrip")
    text = _record(ID, ATTEMPT_WITH_DEFAULT)
    value = {"task_id": "t-1", "attempt": 3}
    context = SerializationContext(topic, MessageField.VALUE)

    data = AvroSerializer(registry, text, conf=serializer_conf)(value, context)

    assert data is not None
    assert data[0] == 0  # Confluent wire format: magic byte 0, then a 4-byte big-endian id
    schema_id = int.from_bytes(data[1:5], "big")
    # The serializer registered the schema under the topic name strategy's subject.
    assert registry.get_latest_version(f"{topic}-value").schema_id == schema_id

    with SchemaRegistryClient({"url": schema_registry_url, "timeout": 10}) as reader:
        assert AvroDeserializer(reader)(data, context) == value
