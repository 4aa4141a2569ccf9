"""The app on a secured broker (``dev up --secure``): SASL_SSL, SCRAM-SHA-512, and only the
ACLs ``qtasks-stream acl grant`` writes; its schema registry requires basic auth.

Every test makes its own SCRAM users (through the admin API, as the super user ``admin``)
and its own topic prefix, so tests share the broker without sharing permissions. The
registry's users are the dev environment's own (``admin``, ``app`` and the read-only
``reader``): every Kafka principal of a test logs in to the registry as one of them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, Producer

# Public in confluent_kafka.admin but missing from its __all__.
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import (
    AuthorizationError,
    EventLogError,
    QueueTasks,
    RegistryRefusedError,
    Settings,
)
from qtasks_stream.acl.kafka import check_access
from qtasks_stream.eventlog.kafka_admin import ensure_topics
from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from qtasks_stream.events import TERMINAL_KINDS
from qtasks_stream.records import OutRecord
from tests.apps.secure_app import build
from tests.conftest import SecureCluster
from tests.kafka.foreign_consumer import ForeignEvent, consume_in_group

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
TASKS = 12


def _admin_conf(cluster: SecureCluster) -> dict[str, Any]:
    return {
        "bootstrap.servers": cluster.bootstrap,
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "admin",
        "sasl.password": Path(cluster.admin_password_file).read_text().strip(),
        "ssl.ca.location": cluster.ca_file,
    }


def _new_user(cluster: SecureCluster, folder: Path, role: str) -> tuple[str, Path]:
    """A SCRAM user with a random password (in a file); no ACL yet."""
    name = f"t{uuid.uuid4().hex[:8]}-{role}"
    password = secrets.token_urlsafe(18)
    admin = AdminClient(_admin_conf(cluster))
    upsert = UserScramCredentialUpsertion(
        name, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192), password.encode()
    )
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(timeout=30)
    path = folder / f"{name}.password"
    path.write_text(password + "\n")
    return name, path


def _env(
    cluster: SecureCluster,
    user: str,
    password_file: Path,
    prefix: str,
    kind: str = "confluent",
    registry_auth_file: str | None = "",
) -> dict[str, str]:
    """The settings of ``user``; its registry login is the dev ``admin`` for ``admin``, else
    ``app``, unless ``registry_auth_file`` names another (``None``: no login at all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env.update(
        QTASKS_EVENT_LOG=kind,
        QTASKS_BOOTSTRAP_SERVERS=cluster.bootstrap,
        QTASKS_SECURITY_PROTOCOL="SASL_SSL",
        QTASKS_SASL_MECHANISM="SCRAM-SHA-512",
        QTASKS_SASL_USERNAME=user,
        QTASKS_SASL_PASSWORD_FILE=str(password_file),
        QTASKS_SSL_CAFILE=cluster.ca_file,
        QTASKS_TOPIC_PREFIX=prefix,
        QTASKS_SCHEMA_REGISTRY_URL=cluster.registry_url,
    )
    if registry_auth_file == "":
        registry_auth_file = cluster.registry_auth_file("admin" if user == "admin" else "app")
    if registry_auth_file is not None:
        env["QTASKS_SCHEMA_REGISTRY_AUTH_FILE"] = registry_auth_file
    return env


def _registry_login(cluster: SecureCluster, user: str) -> str:
    return Path(cluster.registry_auth_file(user)).read_text().strip()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qtasks_stream", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _grant(cluster: SecureCluster, prefix: str, principal: str, role: str) -> str:
    """``qtasks-stream acl grant`` as the super user; returns what it printed."""
    env = _env(cluster, "admin", Path(cluster.admin_password_file), prefix)
    done = _cli(
        env, "acl", "grant", "-A", "tests.apps.secure_app:app", "--principal", principal,
        "--role", role,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def _app(
    cluster: SecureCluster, user: str, password_file: Path, prefix: str, kind: str = "confluent"
) -> QueueTasks:
    return build().configure(Settings.from_env(_env(cluster, user, password_file, prefix, kind)))


async def _run_tasks(submitter: QueueTasks) -> list[str]:
    tasks = [await submitter.add_task("double", n) for n in range(TASKS)]
    for n, task in enumerate(tasks):
        done = await submitter.wait(task.uuid, timeout=60)
        assert (done.status, done.returning) == ("success", n * 2)
    return [task.uuid for task in tasks]


async def _terminal_counts(app: QueueTasks, ids: list[str]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for task_id in ids:
        counts[task_id] = sum(e.kind in TERMINAL_KINDS for e in await app.history(task_id))
    return counts


def _prefix() -> str:
    return f"sec-{uuid.uuid4().hex[:8]}."


@pytest.mark.parametrize("kind", ["confluent", "aiokafka"])
async def test_the_app_role_runs_end_to_end_exactly_once(
    secure_cluster: SecureCluster, tmp_path: Path, kind: str
) -> None:
    prefix = _prefix()
    user, password = _new_user(secure_cluster, tmp_path, "app")
    _grant(secure_cluster, prefix, f"User:{user}", "app")
    app = _app(secure_cluster, user, password, prefix, kind)
    async with app:
        ids = await _run_tasks(app)
        assert await _terminal_counts(app, ids) == {task_id: 1 for task_id in ids}
    # The schemas went to the secured registry, as its user ``app``.
    reader = SchemaRegistryClient(
        {"url": secure_cluster.registry_url, "basic.auth.user.info": _registry_login(
            secure_cluster, "reader")}
    )  # fmt: skip
    with reader:
        assert f"{app.topology.events}-value" in reader.get_subjects()


def test_the_registry_answers_no_anonymous_request(secure_cluster: SecureCluster) -> None:
    base = secure_cluster.registry_url.removesuffix("/apis/ccompat/v7")
    for path in (
        "/apis/ccompat/v7/subjects",
        "/apis/ccompat/v7/schemas/ids/1",
        "/apis/ccompat/v7/config",
        "/apis/ccompat/v8/subjects",
        "/apis/registry/v3/groups",
        "/apis/registry/v2/groups",
        "/apis/",
        "/",
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + path, timeout=10)
        refused.value.close()  # it holds the response open
        assert refused.value.code == 401, path


async def test_registry_refusals_say_who_was_refused_and_what_to_set(
    secure_cluster: SecureCluster, tmp_path: Path
) -> None:
    prefix = _prefix()
    user, password = _new_user(secure_cluster, tmp_path, "app")
    _grant(secure_cluster, prefix, f"User:{user}", "app")
    wrong = tmp_path / "wrong.registry"
    wrong.write_text("app:not-the-password\n")
    url = re.escape(secure_cluster.registry_url)
    for auth_file, refusal in (
        (None, r"refused an anonymous client \(no credentials\): 401 Unauthorized \(.*\): "
               r"the registry requires a login; set QTASKS_SCHEMA_REGISTRY_AUTH_FILE"),
        (str(wrong), r"refused user 'app': 401 Unauthorized \(.*\): wrong user name or "
                     r"password; set QTASKS_SCHEMA_REGISTRY_AUTH_FILE"),
        # Read-only: it may read every schema, not register the app's.
        (secure_cluster.registry_auth_file("reader"), r"refused user 'reader': 403 Forbidden "
                                                      r"\(.*\): the user's role does not allow"),
    ):  # fmt: skip
        env = _env(secure_cluster, user, password, prefix, registry_auth_file=auth_file)
        app = build().configure(Settings.from_env(env))
        try:
            with pytest.raises(RegistryRefusedError, match=rf"^schema registry at {url} {refusal}"):
                await app.connect()
        finally:
            await app.close()


async def test_worker_and_client_roles_split_the_app(
    secure_cluster: SecureCluster, tmp_path: Path
) -> None:
    prefix = _prefix()
    worker_user, worker_password = _new_user(secure_cluster, tmp_path, "worker")
    client_user, client_password = _new_user(secure_cluster, tmp_path, "client")
    _grant(secure_cluster, prefix, f"User:{worker_user}", "worker")
    _grant(secure_cluster, prefix, f"User:{client_user}", "client")
    # Neither role may create topics: the operator does, once.
    admin = KafkaConfig(**_config_args(secure_cluster, "admin", secure_cluster.admin_password_file))
    await ensure_topics(admin, build().configure(Settings(topic_prefix=prefix)).topology.specs())
    worker = _app(secure_cluster, worker_user, worker_password, prefix)
    client = _app(secure_cluster, client_user, client_password, prefix)
    await worker.start()
    try:
        await client.connect()
        ids = await _run_tasks(client)
        assert await _terminal_counts(client, ids) == {task_id: 1 for task_id in ids}
        # The client role cannot run stages: the start-up check says what it lacks.
        with pytest.raises(AuthorizationError, match=rf"^User:{client_user} lacks READ on "):
            await client.start()
    finally:
        await client.close()
        await worker.close()


def _config_args(cluster: SecureCluster, user: str, password_file: str | Path) -> dict[str, Any]:
    return {
        "bootstrap_servers": cluster.bootstrap,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": user,
        "sasl_password": Path(password_file).read_text().strip(),
        "ssl_cafile": cluster.ca_file,
        # The failures below would otherwise wait out the default 30 s.
        "request_timeout_ms": 4000,
    }


async def test_a_reader_consumes_the_events_and_cannot_write(
    secure_cluster: SecureCluster, tmp_path: Path
) -> None:
    prefix = _prefix()
    app_user, app_password = _new_user(secure_cluster, tmp_path, "app")
    reader_user, reader_password = _new_user(secure_cluster, tmp_path, "reader")
    _grant(secure_cluster, prefix, f"User:{app_user}", "app")
    _grant(secure_cluster, prefix, f"User:{reader_user}", "reader")
    app = _app(secure_cluster, app_user, app_password, prefix)
    async with app:
        ids = await _run_tasks(app)
    topology = app.topology
    client = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": reader_user,
        "sasl.password": reader_password.read_text().strip(),
        "ssl.ca.location": secure_cluster.ca_file,
    }
    succeeded: set[str] = set()

    def handle(event: ForeignEvent) -> None:
        succeeded.add(event.task_id)

    await asyncio.to_thread(
        consume_in_group,
        secure_cluster.bootstrap,
        secure_cluster.registry_url,
        topology.events,
        f"{topology.base}.reader.audit",
        handle,
        kinds={"Succeeded"},
        until=lambda: succeeded >= set(ids),
        timeout=60,
        client=client,
        # The registry's read-only user: reading schemas is all a reader team needs.
        registry_auth=_registry_login(secure_cluster, "reader"),
    )
    assert succeeded >= set(ids)
    # Writes to the events topic or a lane are refused, whatever the client.
    for topic in (topology.events, topology.lane(0)):
        errors: list[KafkaError] = []
        producer = Producer(
            {
                "bootstrap.servers": secure_cluster.bootstrap,
                **client,
                "message.timeout.ms": 8000,
            }
        )
        producer.produce(
            topic, b"forged", key=b"k", on_delivery=lambda e, _m, seen=errors: seen.append(e)
        )
        producer.flush(15)
        assert [e.code() for e in errors] == [KafkaError.TOPIC_AUTHORIZATION_FAILED], topic
    # ... and ours names the refusal: its producer is idempotent, which a principal allowed
    # to write nowhere may not be.
    reader_log = ConfluentEventLog(
        KafkaConfig(**_config_args(secure_cluster, reader_user, reader_password))
    )

    aio_log = AioKafkaEventLog(
        KafkaConfig(**_config_args(secure_cluster, reader_user, reader_password))
    )
    for log in (reader_log, aio_log):
        producer_ = log.producer()
        try:
            with pytest.raises(
                AuthorizationError, match=rf"^User:{reader_user} lacks (IDEMPOTENT_)?WRITE on "
            ):
                await producer_.start()
                await producer_.send([OutRecord(topology.events, b"k", b"forged")])
        finally:
            await producer_.close()
            await log.close()


async def test_authentication_and_tls_failures_say_what_is_wrong(
    secure_cluster: SecureCluster, tmp_path: Path
) -> None:
    user, password = _new_user(secure_cluster, tmp_path, "app")
    specs = build().configure(Settings(topic_prefix=_prefix())).topology.specs()
    good = _config_args(secure_cluster, user, password)
    wrong_password = KafkaConfig(**{**good, "sasl_password": "not-the-password"})
    with pytest.raises(AuthorizationError, match=rf"User:{user} lacks AUTHENTICATE") as refused:
        await ensure_topics(wrong_password, specs)
    assert "authentication failed" in str(refused.value)
    plaintext = KafkaConfig(secure_cluster.bootstrap, request_timeout_ms=4000)
    with pytest.raises(EventLogError, match="QTASKS_SECURITY_PROTOCOL"):
        await ensure_topics(plaintext, specs)
    no_ca = KafkaConfig(**{**good, "ssl_cafile": None})
    with pytest.raises(EventLogError, match=r"TLS handshake .* failed: check QTASKS_SSL_CAFILE"):
        await ensure_topics(no_ca, specs)


async def test_a_missing_acl_is_named_by_the_start_up_check(
    secure_cluster: SecureCluster, tmp_path: Path
) -> None:
    prefix = _prefix()
    user, password = _new_user(secure_cluster, tmp_path, "worker")
    _grant(secure_cluster, prefix, f"User:{user}", "app")
    app = _app(secure_cluster, user, password, prefix)
    await app.connect()  # creates the topics
    await app.close()
    # Take away the worker's READ on its consumer groups, and nothing else.
    admin_env = _env(secure_cluster, "admin", Path(secure_cluster.admin_password_file), prefix)
    admin = AdminClient(_admin_conf(secure_cluster))
    group_read = AclBindingFilter(
        ResourceType.GROUP, f"{prefix}sec.", ResourcePatternType.PREFIXED, f"User:{user}", "*",
        AclOperation.READ, AclPermissionType.ALLOW,
    )  # fmt: skip
    for future in admin.delete_acls([group_read]).values():
        assert len(future.result(timeout=30)) == 1
    listed = _cli(admin_env, "acl", "list", "--principal", f"User:{user}")
    assert listed.returncode == 0 and f"READ on group {prefix}sec.*" not in listed.stdout
    app = _app(secure_cluster, user, password, prefix)
    try:
        with pytest.raises(
            AuthorizationError, match=rf"^User:{user} lacks READ on group {prefix}sec.deadletter"
        ):
            await app.start()
    finally:
        await app.close()
    # The check alone, as a deployment's health check would call it.
    config = KafkaConfig(**_config_args(secure_cluster, user, password))
    await check_access(config, app.topology, "client")


async def test_no_secret_reaches_a_log_repr_or_cli_output(
    secure_cluster: SecureCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    prefix = _prefix()
    user, password_file = _new_user(secure_cluster, tmp_path, "app")
    secure_folder = Path(secure_cluster.ca_file).parent
    secrets_ = _secrets_of(
        [
            password_file,
            Path(secure_cluster.admin_password_file),
            *secure_folder.glob("*.password"),
            # The registry's logins (user:password, the dev users' SCRAM passwords).
            *secure_folder.glob("*.registry"),
        ]
    )
    wrong_registry_password = secrets.token_urlsafe(12)
    secrets_.add(wrong_registry_password)
    seen: list[str] = [_grant(secure_cluster, prefix, f"User:{user}", "app")]
    env = _env(secure_cluster, user, password_file, prefix)
    settings = Settings.from_env(env)
    seen += [repr(settings), str(settings), repr(settings.kafka_config())]
    admin_env = _env(secure_cluster, "admin", Path(secure_cluster.admin_password_file), prefix)
    for args in (
        ("acl", "list"),
        ("dev", "status", "--home", secure_cluster.home),
        ("-v", "schemas", "check", "-A", "tests.apps.secure_app:app"),
    ):
        done = _cli(admin_env, *args)
        seen += [done.stdout, done.stderr]
    app = build().configure(settings)
    async with app:
        await _run_tasks(app)
        seen.append(repr(app.event_log))
    wrong = KafkaConfig(
        **{**_config_args(secure_cluster, user, password_file), "sasl_password": "x" * 12}
    )
    with pytest.raises(AuthorizationError) as refused:
        await ensure_topics(wrong, app.topology.specs())
    seen.append(str(refused.value))
    # A registry login refused: the error names the user, never the password sent.
    wrong_login = tmp_path / "wrong.registry"
    wrong_login.write_text(f"app:{wrong_registry_password}\n")
    wrong_settings = Settings.from_env(
        {**env, "QTASKS_SCHEMA_REGISTRY_AUTH_FILE": str(wrong_login)}
    )
    wrong_app = build().configure(wrong_settings)
    try:
        with pytest.raises(RegistryRefusedError) as registry_refused:
            await wrong_app.connect()
    finally:
        await wrong_app.close()
    seen += [str(registry_refused.value), repr(registry_refused.value), repr(wrong_settings)]
    seen += [record.getMessage() for record in caplog.records]
    seen += _texts(Path(secure_cluster.home) / "kafka" / "logs")
    seen += _texts(Path(secure_cluster.home) / "registry" / "logs")
    assert len(seen) > 10 and secrets_
    leaks = [
        (n, len(secret)) for n, text in enumerate(seen) for secret in secrets_ if secret in text
    ]
    assert leaks == []


def _secrets_of(files: list[Path]) -> set[str]:
    return {path.read_text().strip() for path in files}


def _texts(folder: Path) -> list[str]:
    """Every file of a service's logs folder (kafka.out, format.log, registry.out...)."""
    return [path.read_text(errors="replace") for path in folder.glob("*") if path.is_file()]
