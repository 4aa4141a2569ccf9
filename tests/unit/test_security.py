"""Security without a broker: secrets read from files, each role's ACLs derived from the
topology, refusals mapped to AuthorizationError, and the secured dev broker's settings."""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream.acl import Permission, permissions
from qtasks_stream.cli import main
from qtasks_stream.devenv.environment import DevEnvironment
from qtasks_stream.devenv.kafka import DevKafka
from qtasks_stream.devenv.registry import DevRegistry
from qtasks_stream.devenv.secure import DevSecrets
from qtasks_stream.errors import (
    AuthorizationError,
    ConfigurationError,
    DevEnvError,
    EventLogError,
    RegistryRefusedError,
    RegistryUnavailableError,
    SchemaError,
)
from qtasks_stream.eventlog import kafka_aio_convert, kafka_confluent_convert
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.serde.compat import register_schemas
from qtasks_stream.serde.wire import WriterSchemas
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


def test_the_secured_dev_registry_requires_a_login_for_every_path(tmp_path: Path) -> None:
    secrets = DevSecrets(tmp_path / "kafka" / "secure")
    registry = DevRegistry(tmp_path / "registry", port=29981, secrets=secrets)
    users = secrets.write_registry_users()
    props = registry.system_properties()
    assert props["quarkus.http.auth.basic"] == "true"
    assert props["quarkus.http.auth.permission.everything.paths"] == "/*"
    assert props["quarkus.http.auth.permission.everything.policy"] == "authenticated"
    assert props["apicurio.auth.role-based-authorization"] == "true"
    assert props["apicurio.auth.anonymous-read-access.enabled"] == "false"
    # The users come from a 0600 file, not the JVM's command line (``ps`` shows that).
    assert props["quarkus.config.locations"] == users.as_uri()
    assert users.stat().st_mode & 0o077 == 0
    passwords = {user: secrets.password(user) for user in ("admin", "app", "reader")}
    assert not any(pw in value for pw in passwords.values() for value in props.values())
    lines = set(users.read_text().splitlines())
    for user, role in (("admin", "sr-admin"), ("app", "sr-developer"), ("reader", "sr-readonly")):
        assert f"quarkus.security.users.embedded.users.{user}={passwords[user]}" in lines
        assert f"quarkus.security.users.embedded.roles.{user}={role}" in lines
        auth = secrets.registry_auth_file(user)
        assert auth.read_text() == f"{user}:{passwords[user]}\n"
        assert auth.stat().st_mode & 0o077 == 0
    # The exports name the app's auth file, never a password; Settings reads it.
    exports = registry.client_exports()
    assert exports["QTASKS_SCHEMA_REGISTRY_AUTH_FILE"] == str(secrets.registry_auth_file("app"))
    assert not any(pw in value for pw in passwords.values() for value in exports.values())
    settings = Settings.from_env(exports)
    assert (settings.registry_conf() or {})["basic.auth.user.info"] == f"app:{passwords['app']}"
    # A password the properties file cannot carry as it is is refused, not mangled.
    secrets.password_file("reader").write_text("a$b\\c\n")
    with pytest.raises(DevEnvError, match=r"reader\.password may hold only") as bad:
        secrets.write_registry_users()
    assert "a$b" not in str(bad.value)
    # Without secrets: no login, no auth file.
    plain = DevRegistry(tmp_path / "plain", port=29981)
    assert not any(key.startswith(("quarkus.http.auth", "apicurio.auth")) for key in
                   plain.system_properties())  # fmt: skip
    assert plain.client_exports() == {"QTASKS_SCHEMA_REGISTRY_URL": plain.url}


def test_a_secured_home_exports_the_registry_auth_file(tmp_path: Path) -> None:
    (tmp_path / "dev.json").write_text(
        '{"ports": {"kafka": 29994, "controller": 29995, "registry": 29981}, '
        '"services": ["kafka", "registry"], "secure": true}'
    )
    status = DevEnvironment(tmp_path).status()
    assert status.registry is not None and status.registry.secured
    assert status.registry_exports == {
        "QTASKS_SCHEMA_REGISTRY_URL": "http://127.0.0.1:29981/apis/ccompat/v7",
        "QTASKS_SCHEMA_REGISTRY_AUTH_FILE": str(tmp_path / "kafka" / "secure" / "app.registry"),
    }


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A registry that answers every request with the status in its ``status`` attribute."""

    status = 401

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"" if self.status == 401 else json.dumps(
            {"error_code": self.status, "message": "no"}
        ).encode()  # fmt: skip
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_registry() -> Iterator[tuple[str, type[_Refusing]]]:
    handler = type("Handler", (_Refusing,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


SCHEMA = '{"type": "record", "name": "T", "fields": [{"name": "a", "type": "int"}]}'


def test_a_registry_refusal_names_the_registry_the_user_and_what_to_set(
    refusing_registry: tuple[str, type[_Refusing]],
) -> None:
    base, handler = refusing_registry
    url = f"{base}/apis/ccompat/v7"
    anonymous = SchemaRegistryClient({"url": url})
    with pytest.raises(RegistryRefusedError) as refused:
        register_schemas(anonymous, {"t-value": SCHEMA})
    assert str(refused.value) == (
        f"schema registry at {url} refused an anonymous client (no credentials): "
        "401 Unauthorized (listing the versions of subject 't-value'): the registry requires "
        "a login; set QTASKS_SCHEMA_REGISTRY_AUTH_FILE (or QTASKS_SCHEMA_REGISTRY_AUTH) to "
        "user:password"
    )
    # Credentials in the settings or in the URL: the user is named, the password never.
    for conf in (
        {"url": url, "basic.auth.user.info": "bob:s3cret-pw"},
        {"url": url.replace("http://", "http://bob:s3cret-pw@")},
    ):
        wrong = SchemaRegistryClient(conf)
        with pytest.raises(RegistryRefusedError, match=r"refused user 'bob': 401 Unauthorized \("
                           r"fetching schema id 7\): wrong user name or password; set "
                           r"QTASKS_SCHEMA_REGISTRY_AUTH_FILE") as refused:  # fmt: skip
            WriterSchemas(wrong).get(7)
        assert "s3cret" not in str(refused.value) and refused.value.user == "bob"
        assert refused.value.url == url and refused.value.status == 401
        # A RegistryUnavailableError: a stage backs off and retries, the record is not bad.
        assert isinstance(refused.value, RegistryUnavailableError)
    handler.status = 403
    reader = SchemaRegistryClient({"url": url, "basic.auth.user.info": "reader:s3cret-pw"})
    with pytest.raises(RegistryRefusedError, match=r"^schema registry at .* refused user "
                       r"'reader': 403 Forbidden \(listing the versions of subject 't-value'\): "
                       "the user's role does not allow it"):  # fmt: skip
        register_schemas(reader, {"t-value": SCHEMA})
    # Other failures keep their own errors.
    handler.status = 500
    with pytest.raises(SchemaError, match="answered with an error") as failed:
        register_schemas(reader, {"t-value": SCHEMA})
    assert not isinstance(failed.value, RegistryRefusedError)


class _Failing:
    def __init__(self, code: int) -> None:
        self.code = code

    def result(self, timeout: float) -> None:
        raise KafkaException(KafkaError(self.code))


def test_the_access_check_asks_again_while_the_coordinator_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qtasks_stream.acl import kafka as acl_kafka

    config = KafkaConfig(bootstrap_servers="127.0.0.1:1")
    with pytest.raises(acl_kafka._NotReady, match="group g yet"):
        acl_kafka._operations(
            config, _Failing(KafkaError.COORDINATOR_LOAD_IN_PROGRESS), 1.0, "group", "g"
        )
    with pytest.raises(EventLogError, match="cannot describe group g:"):
        acl_kafka._operations(config, _Failing(KafkaError.INVALID_REQUEST), 1.0, "group", "g")

    calls: list[int] = []

    def once(*args: object) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise acl_kafka._NotReady("cannot describe group g yet")

    monkeypatch.setattr(acl_kafka, "_check_access_once", once)
    monkeypatch.setattr(acl_kafka, "_CHECK_PAUSE_S", 0.0)
    acl_kafka._check_access(config, Topology("t"), "worker", ["g"])
    assert len(calls) == 3
