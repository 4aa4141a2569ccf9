"""Settings: one value read from the environment, secrets kept out of reprs and logs, and a
doc that lists every variable."""

from __future__ import annotations

import logging
import re
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest

from qtasks_stream import QueueTasks
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.settings import Settings
from qtasks_stream.views.sqlite import SqliteViewStore

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
SECRETS = {
    "QTASKS_SASL_PASSWORD": "hunter2-sasl",
    "QTASKS_SCHEMA_REGISTRY_AUTH": "reg:hunter2-registry",
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer hunter2-otel",
}


def _full_env(tmp_path: Path) -> dict[str, str]:
    return {
        "QTASKS_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "QTASKS_SECURITY_PROTOCOL": "sasl_ssl",
        "QTASKS_SASL_MECHANISM": "PLAIN",
        "QTASKS_SASL_USERNAME": "alice",
        "QTASKS_SSL_CAFILE": "/etc/ca.pem",
        "QTASKS_KAFKA_EXTRA": '{"linger.ms": 5}',
        "QTASKS_TRANSACTION_TIMEOUT_MS": "20000",
        "QTASKS_SCHEMA_REGISTRY_URL": "http://127.0.0.1:1",
        "QTASKS_TOPIC_PREFIX": "team.",
        "QTASKS_INSTANCE_ID": "w1",
        "QTASKS_VIEW_URL": f"sqlite:///{tmp_path}/view.db",
        **SECRETS,
    }


def test_every_field_is_read_from_its_documented_variable(tmp_path: Path) -> None:
    doc = DOC.read_text()
    undocumented = [
        f.metadata["env"] for f in fields(Settings) if f"`{f.metadata['env']}`" not in doc
    ]
    assert not undocumented, f"docs/configuration.md lacks {undocumented}"
    documented = set(re.findall(r"^\| `(\w+\*?)`", doc, flags=re.MULTILINE))
    assert documented <= {f.metadata["env"] for f in fields(Settings)}, documented
    settings = Settings.from_env(_full_env(tmp_path))
    assert settings.event_log == "confluent"  # the default client with bootstrap servers
    assert settings.kafka_extra == {"linger.ms": 5}
    assert settings.transaction_timeout_ms == 20000
    assert settings.telemetry == {
        "OTEL_EXPORTER_OTLP_HEADERS": SECRETS["OTEL_EXPORTER_OTLP_HEADERS"]
    }
    with pytest.raises(FrozenInstanceError):
        settings.topic_prefix = "x."  # type: ignore[misc]


def test_defaults_are_the_embedded_app() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert (settings.event_log, settings.shared_log) == ("memory", False)
    app = QueueTasks.from_env("plain", env={})
    assert isinstance(app.event_log, InMemoryEventLog)
    assert app.topology.events == "qtasks.plain.events"


def test_settings_build_the_components(tmp_path: Path) -> None:
    env = _full_env(tmp_path)
    del env["QTASKS_SECURITY_PROTOCOL"], env["QTASKS_SASL_MECHANISM"]
    app = QueueTasks.from_env("shop", env=env)
    assert isinstance(app.event_log, ConfluentEventLog)
    assert isinstance(app.view, SqliteViewStore)
    assert app.topology.events == "team.shop.events"
    assert app.instance_id == "w1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QTASKS_EVENT_LOG": "aiokafka"}, "needs QTASKS_BOOTSTRAP_SERVERS"),
        ({"QTASKS_EVENT_LOG": "memory", "QTASKS_BOOTSTRAP_SERVERS": "h:1"}, "unset one"),
        ({"QTASKS_KAFKA_EXTRA": "[1]"}, "QTASKS_KAFKA_EXTRA must be a JSON object"),
        ({"QTASKS_KAFKA_EXTRA": "{"}, "QTASKS_KAFKA_EXTRA is not JSON"),
        ({"QTASKS_TRANSACTION_TIMEOUT_MS": "soon"}, "must be an integer"),
        ({"QTASKS_VIEW_URL": "mysql://x/y"}, "unknown view URL"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        QueueTasks.from_env("bad", env=env)


def test_secrets_never_appear_in_reprs_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.from_env(_full_env(tmp_path))
    app = QueueTasks("shop", settings=settings)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("qtasks_stream").info("settings %s / %r", settings, settings)
        logging.getLogger("qtasks_stream").info("log %r", app.event_log)
    shown = " ".join(
        [repr(settings), str(settings), f"{settings}", repr(app.event_log), caplog.text]
    )
    for secret in ("hunter2-sasl", "hunter2-registry", "hunter2-otel"):
        assert secret not in shown
    assert "sasl_password='***'" in repr(settings)
    assert "schema_registry_auth='***'" in repr(settings)
    assert "sasl_username='alice'" in repr(settings)  # only the secrets are hidden


async def test_an_embedded_app_warns_when_the_environment_names_a_kafka_cluster(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A client importing the module a worker runs with `-A` (QueueTasks("shop"), not
    # from_env) stayed on its own in-memory log and ran its tasks alone, silently.
    monkeypatch.setenv("QTASKS_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    app = QueueTasks("alone")

    @app.task
    def noop() -> None: ...

    with caplog.at_level(logging.WARNING, logger="qtasks_stream"):
        async with app:
            await app.add_task("noop")
    warned = [r.getMessage() for r in caplog.records if "from_env" in r.getMessage()]
    assert warned == [
        "app 'alone' runs on the embedded in-memory log although QTASKS_BOOTSTRAP_SERVERS is "
        "set: no other process sees its tasks. Build it with QueueTasks.from_env('alone') to "
        "use that Kafka cluster (docs/deployment.md)"
    ]


async def test_an_embedded_app_without_a_kafka_cluster_in_the_environment_says_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("QTASKS_BOOTSTRAP_SERVERS", raising=False)
    app = QueueTasks("alone")

    @app.task
    def noop() -> None: ...

    with caplog.at_level(logging.WARNING, logger="qtasks_stream"):
        async with app:
            await app.add_task("noop")
    assert not [r for r in caplog.records if "from_env" in r.getMessage()]
