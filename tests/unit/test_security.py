"""Security without a broker: secrets read from files, each role's ACLs derived from the
topology, refusals mapped to AuthorizationError, and the secured dev broker's settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from aiokafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError
from confluent_kafka import KafkaError, KafkaException

from qtasks_stream.acl import Permission, permissions
from qtasks_stream.cli import main
from qtasks_stream.devenv.environment import DevEnvironment
from qtasks_stream.devenv.kafka import DevKafka
from qtasks_stream.errors import AuthorizationError, ConfigurationError, DevEnvError
from qtasks_stream.eventlog import kafka_aio_convert, kafka_confluent_convert
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.settings import Settings
from qtasks_stream.topology import Topology


def test_secrets_are_read_from_files_and_never_shown(tmp_path: Path) -> None:
    sasl = tmp_path / "sasl"
    sasl.write_text("s3cret-sasl\n")
    registry = tmp_path / "registry"
    registry.write_text("reader:s3cret-registry\n")
    settings = Settings.from_env(
        {
            "QTASKS_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "QTASKS_SECURITY_PROTOCOL": "SASL_SSL",
            "QTASKS_SASL_MECHANISM": "SCRAM-SHA-512",
            "QTASKS_SASL_USERNAME": "app",
            "QTASKS_SASL_PASSWORD_FILE": str(sasl),
            "QTASKS_SCHEMA_REGISTRY_URL": "http://127.0.0.1:1",
            "QTASKS_SCHEMA_REGISTRY_AUTH_FILE": str(registry),
        }
    )
    assert settings.sasl_password == "s3cret-sasl"
    assert settings.kafka_config().to_librdkafka()["sasl.password"] == "s3cret-sasl"
    assert (settings.registry_conf() or {})["basic.auth.user.info"] == "reader:s3cret-registry"
    shown = repr(settings) + str(settings) + repr(settings.kafka_config())
    assert "s3cret" not in shown and str(sasl) in shown


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read the secret file"), ("\n", "is empty")],
)
def test_a_bad_secret_file_is_named_not_shown(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "password"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        Settings(bootstrap_servers="127.0.0.1:1", sasl_password_file=str(path))
    path.write_text("x\n")
    with pytest.raises(ConfigurationError, match="set one of them"):
        Settings(bootstrap_servers="h:1", sasl_password="y", sasl_password_file=str(path))


def test_each_role_gets_exactly_its_acls() -> None:
    topology = Topology("shop", prefix="team.")
    rules = {role: {str(p) for p in permissions(topology, role)} for role in ("client", "worker")}
    assert rules["client"] == {
        "READ on topic team.shop.events",
        "WRITE on topic team.shop.events",
        "WRITE on topic team.shop.lane.*",
        "WRITE on topic team.shop.queue.*",
        "WRITE on transactional id team.shop.client.*",
        "DESCRIBE on transactional id team.shop.client.*",
        "DESCRIBE on topic team.shop.*",
        "DESCRIBE_CONFIGS on topic team.shop.*",
        "DESCRIBE on group qtasks-unmanaged-*",
        "IDEMPOTENT_WRITE on the cluster",
    }
    assert rules["worker"] == {
        "READ on topic team.shop.*",
        "WRITE on topic team.shop.*",
        "DESCRIBE on topic team.shop.*",
        "DESCRIBE_CONFIGS on topic team.shop.*",
        "READ on group team.shop.*",
        "DESCRIBE on group qtasks-unmanaged-*",
        "WRITE on transactional id team.shop.*",
        "DESCRIBE on transactional id team.shop.*",
        "IDEMPOTENT_WRITE on the cluster",
    }
    # The app: the worker's rules and CREATE; the client's events rules are covered already.
    app = {str(p) for p in permissions(topology, "app")}
    assert app == rules["worker"] | {"CREATE on topic team.shop.*"}
    reader = permissions(topology, "reader", reader_groups="audit.")
    assert {str(p) for p in reader} == {
        "READ on topic team.shop.events",
        "DESCRIBE on topic team.shop.events",
        "READ on group audit.*",
    }
    assert not any(p.operation in ("WRITE", "CREATE") for p in reader)
    # Prefixed rules are the app's own: another app's topics stay out of reach.
    worker = permissions(topology, "worker")
    assert not any(p.covers("topic", "team.shopping.events") for p in worker)
    assert Permission("topic", "team.shop.", "prefixed", "READ").covers("topic", "team.shop.x")
    with pytest.raises(ConfigurationError, match="unknown role 'admin'"):
        permissions(topology, "admin")


def test_refusals_from_both_clients_name_principal_operation_and_resource() -> None:
    conf = KafkaConfig("h:1", security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                       sasl_username="bob", sasl_password="pw")  # fmt: skip
    refused = kafka_confluent_convert.map_error(
        KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)),
        "send failed",
        conf=conf.to_librdkafka(),
        operation="WRITE",
        names={"topic": "team.shop.events"},
    )
    assert isinstance(refused, AuthorizationError)
    assert str(refused).startswith("User:bob lacks WRITE on topic team.shop.events (refused")
    assert (refused.principal, refused.operation) == ("User:bob", "WRITE")
    refused = kafka_aio_convert.map_error(
        GroupAuthorizationFailedError(),
        "poll failed",
        conf=conf.to_aiokafka_kwargs(),
        operation="READ",
        names={"topic": "team.shop.events", "group": "team.shop.worker"},
    )
    assert isinstance(refused, AuthorizationError)
    assert str(refused).startswith("User:bob lacks READ on group team.shop.worker")
    refused = kafka_aio_convert.map_error(TopicAuthorizationFailedError(), "x")
    assert str(refused).startswith("this client lacks access on topic")
    idempotent = kafka_confluent_convert.map_error(
        KafkaException(KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED)),
        "send failed",
        conf=conf.to_librdkafka(),
        operation="WRITE",
    )
    assert str(idempotent).startswith("User:bob lacks IDEMPOTENT_WRITE on cluster")
    unauthenticated = kafka_confluent_convert.map_error(
        KafkaException(KafkaError(KafkaError._AUTHENTICATION)), "x", conf=conf.to_librdkafka()
    )
    assert str(unauthenticated).startswith("User:bob lacks AUTHENTICATE on the cluster")
    assert "pw" not in str(unauthenticated).split("(")[0]


def test_the_secured_dev_broker_denies_by_default(tmp_path: Path) -> None:
    kafka = DevKafka(tmp_path, port=29994, controller_port=29995, secure=True)
    assert kafka.secrets is not None
    kafka.secrets.ensure()
    props = kafka.server_properties()
    assert props["listeners"].startswith("SASL_SSL://127.0.0.1:29994")
    assert props["authorizer.class.name"].endswith("metadata.authorizer.StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:admin"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    exports = kafka.client_exports()
    assert exports["QTASKS_SASL_USERNAME"] == "app"
    assert Path(exports["QTASKS_SASL_PASSWORD_FILE"]).stat().st_mode & 0o077 == 0
    # The password stays in its file: no export line holds it.
    password = kafka.secrets.password("app")
    assert all(password not in value for value in exports.values())
    # A plain broker keeps its PLAINTEXT listener and exports the bootstrap servers only.
    plain = DevKafka(tmp_path / "plain", port=29994, controller_port=29995)
    assert "authorizer.class.name" not in plain.server_properties()
    assert plain.client_exports() == {"QTASKS_BOOTSTRAP_SERVERS": "127.0.0.1:29994"}


def test_a_home_remembers_it_is_secured(tmp_path: Path) -> None:
    record = tmp_path / "dev.json"
    record.write_text('{"ports": {"kafka": 29994, "controller": 29995}, "services": ["kafka"]}')
    assert not DevEnvironment(tmp_path).secure  # a record from before --secure existed
    record.write_text(
        '{"ports": {"kafka": 29994, "controller": 29995}, "services": ["kafka"], "secure": true}'
    )
    secured = DevEnvironment(tmp_path)
    assert secured.secure
    # status builds the secured broker's exports, naming files only (nothing runs here).
    status = secured.status(registry=False)
    assert not status.running and status.exports() == {}
    assert status.kafka_exports["QTASKS_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert status.kafka.ca_file == tmp_path / "kafka" / "secure" / "ca.pem"
    record.write_text('{"ports": {}, "services": [], "secure": "yes"}')
    with pytest.raises(DevEnvError, match="damaged"):
        DevEnvironment(tmp_path)


def test_acl_says_what_it_needs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("QTASKS_"):
            monkeypatch.delenv(name)
    assert main(["acl", "list"]) == 2
    assert "no Kafka cluster is configured" in capsys.readouterr().err
    monkeypatch.setenv("QTASKS_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    assert main(["acl", "grant", "-A", "tests.apps.secure_app:app", "--role", "worker"]) == 2
    assert "acl grant needs -A module:app, --principal User:NAME and --role" in (
        capsys.readouterr().err
    )


def test_secret_client_properties_are_hidden_too() -> None:
    extra = {"sasl.jaas.config": "x password=s3cret;", "ssl.key.password": "s3cret", "acks": "all"}
    settings = Settings(bootstrap_servers="h:1", kafka_extra=extra)
    shown = repr(settings) + repr(settings.kafka_config())
    assert "s3cret" not in shown and "'acks': 'all'" in shown
    assert settings.kafka_config().to_librdkafka()["ssl.key.password"] == "s3cret"
