"""``Settings``: everything a deployment configures, in one typed, frozen value.

``Settings.from_env()`` is the one reader of the ``QTASKS_*`` variables (and of the
OpenTelemetry ones); docs/configuration.md lists each (a test keeps it in step with the fields
here). An app takes them as ``QueueTasks(name, settings=...)`` or ``QueueTasks.from_env(name)``;
the CLI builds them the same way and moves the app it loads onto them. The settings build the
components (event log, schema registry client, view store): they are the composition root.

Nothing set means the embedded default: a private in-memory log, a ``mock://`` registry and an
in-memory view, which no other process can reach. Secrets (the SASL password, the registry's
basic auth, the OpenTelemetry values, which may carry exporter headers, secret-looking
``QTASKS_KAFKA_EXTRA`` properties) never appear in the repr or str of the settings; the
passwords may be read from files (``QTASKS_SASL_PASSWORD_FILE``...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, cast

from qtasks_stream.errors import ConfigurationError

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from qtasks_stream.eventlog.base import EventLog
    from qtasks_stream.eventlog.kafka_config import ConfValue, KafkaConfig
    from qtasks_stream.views.base import ViewStore

__all__ = ["BOOTSTRAP_ENV", "EVENT_LOG_KINDS", "Settings"]

EventLogKind = Literal["memory", "aiokafka", "confluent"]
EVENT_LOG_KINDS: tuple[EventLogKind, ...] = ("memory", "aiokafka", "confluent")
#: The variable naming the Kafka cluster: its presence says the process belongs on Kafka.
BOOTSTRAP_ENV = "QTASKS_BOOTSTRAP_SERVERS"
#: Seconds one registry request may take before the client retries it (the client's default
#: is to wait forever).
REGISTRY_TIMEOUT_S = 10
#: Variables handed to the OpenTelemetry configuration as they are.
_OTEL_PREFIXES = ("OTEL_", "QTASKS_OTEL_")


def _env(name: str, *, secret: bool = False) -> dict[str, Any]:
    return {"env": name, "secret": secret}


@dataclass(frozen=True, repr=False)
class Settings:
    """Where an app's components live. Every field has a default (the embedded one).

    ``event_log`` left empty means ``confluent`` when ``bootstrap_servers`` is set and
    ``memory`` otherwise. ``topic_prefix`` and ``instance_id`` left ``None`` keep what the app
    was declared with; ``view_url`` left ``None`` keeps the app's view (in-memory by default).
    """

    bootstrap_servers: str = field(default="", metadata=_env(BOOTSTRAP_ENV))
    event_log: str = field(default="", metadata=_env("QTASKS_EVENT_LOG"))
    security_protocol: str = field(default="PLAINTEXT", metadata=_env("QTASKS_SECURITY_PROTOCOL"))
    sasl_mechanism: str | None = field(default=None, metadata=_env("QTASKS_SASL_MECHANISM"))
    sasl_username: str | None = field(default=None, metadata=_env("QTASKS_SASL_USERNAME"))
    sasl_password: str | None = field(
        default=None, metadata=_env("QTASKS_SASL_PASSWORD", secret=True)
    )
    #: A file holding the SASL password (its first line): the password stays off the command
    #: line and out of the environment. Read when the settings are made.
    sasl_password_file: str | None = field(default=None, metadata=_env("QTASKS_SASL_PASSWORD_FILE"))
    ssl_cafile: str | None = field(default=None, metadata=_env("QTASKS_SSL_CAFILE"))
    #: Client properties passed on as they are, last (librdkafka's dotted names).
    kafka_extra: Mapping[str, ConfValue] = field(
        default_factory=dict, metadata=_env("QTASKS_KAFKA_EXTRA")
    )
    transaction_timeout_ms: int = field(
        default=10_000, metadata=_env("QTASKS_TRANSACTION_TIMEOUT_MS")
    )
    schema_registry_url: str | None = field(
        default=None, metadata=_env("QTASKS_SCHEMA_REGISTRY_URL")
    )
    #: ``user:password`` for the registry's basic auth.
    schema_registry_auth: str | None = field(
        default=None, metadata=_env("QTASKS_SCHEMA_REGISTRY_AUTH", secret=True)
    )
    #: A file holding ``user:password`` for the registry (its first line).
    schema_registry_auth_file: str | None = field(
        default=None, metadata=_env("QTASKS_SCHEMA_REGISTRY_AUTH_FILE")
    )
    topic_prefix: str | None = field(default=None, metadata=_env("QTASKS_TOPIC_PREFIX"))
    instance_id: str | None = field(default=None, metadata=_env("QTASKS_INSTANCE_ID"))
    #: A view store URL for :func:`qtasks_stream.views.open_view`.
    view_url: str | None = field(default=None, metadata=_env("QTASKS_VIEW_URL"))
    #: The OpenTelemetry settings (``OTEL_*``, ``QTASKS_OTEL_*``), as the environment had them.
    telemetry: Mapping[str, str] = field(default_factory=dict, metadata=_env("OTEL_*", secret=True))

    def __post_init__(self) -> None:
        kind = self.event_log.strip().lower() or (
            "confluent" if self.bootstrap_servers.strip() else "memory"
        )
        if kind not in EVENT_LOG_KINDS:
            raise ConfigurationError(
                f"QTASKS_EVENT_LOG must be memory, aiokafka or confluent, not {self.event_log!r}"
            )
        if kind != "memory" and not self.bootstrap_servers.strip():
            raise ConfigurationError(
                f"the {kind} event log needs QTASKS_BOOTSTRAP_SERVERS (host:port,...)"
            )
        if kind == "memory" and self.bootstrap_servers.strip():
            raise ConfigurationError(
                "QTASKS_EVENT_LOG=memory ignores QTASKS_BOOTSTRAP_SERVERS: unset one of them"
            )
        if self.transaction_timeout_ms <= 0:
            raise ConfigurationError(
                f"QTASKS_TRANSACTION_TIMEOUT_MS must be > 0, not {self.transaction_timeout_ms}"
            )
        for secret, path in (
            ("sasl_password", self.sasl_password_file),
            ("schema_registry_auth", self.schema_registry_auth_file),
        ):
            if path:
                if getattr(self, secret):
                    raise ConfigurationError(
                        f"both {secret} and {secret}_file are set: set one of them"
                    )
                object.__setattr__(self, secret, _secret_from(path))
        if self.topic_prefix == "":
            object.__setattr__(self, "topic_prefix", None)
        object.__setattr__(self, "event_log", kind)
        # Frozen copies: a caller mutating its dict later must not change frozen settings.
        object.__setattr__(self, "kafka_extra", MappingProxyType(dict(self.kafka_extra)))
        object.__setattr__(self, "telemetry", MappingProxyType(dict(self.telemetry)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """The settings ``env`` holds; unset or empty variables take the defaults."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if f.name == "telemetry":
                values[f.name] = {k: v for k, v in env.items() if k.startswith(_OTEL_PREFIXES)}
                continue
            raw = env.get(name, "").strip()
            if not raw:
                continue
            if f.name == "kafka_extra":
                values[f.name] = _json_object(name, raw)
            elif f.name == "transaction_timeout_ms":
                try:
                    values[f.name] = int(raw)
                except ValueError as exc:
                    raise ConfigurationError(f"{name} must be an integer, not {raw!r}") from exc
            else:
                values[f.name] = raw
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def shared_log(self) -> bool:
        """Whether the event log is one other processes can reach (Kafka)."""
        return self.event_log != "memory"

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                shown = "'***'" if isinstance(value, str) else f"<{len(value)} values>"
                parts.append(f"{f.name}={shown}")
            elif f.name == "kafka_extra":
                from qtasks_stream.eventlog.kafka_config import redacted

                # QTASKS_KAFKA_EXTRA may carry a password too (sasl.jaas.config...).
                parts.append(f"{f.name}={redacted(value)!r}")
            elif isinstance(value, MappingProxyType):
                parts.append(f"{f.name}={dict(value)!r}")
            else:
                parts.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    __str__ = __repr__

    # -- the components they build ------------------------------------------------------------

    def build_event_log(self) -> EventLog:
        """The event log: a fresh in-memory one, or a client of the configured Kafka."""
        if self.event_log == "memory":
            from qtasks_stream.eventlog.memory import InMemoryEventLog

            return InMemoryEventLog()
        config = self.kafka_config()
        if self.event_log == "aiokafka":
            from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog

            return AioKafkaEventLog(config)
        from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog

        return ConfluentEventLog(config)

    def kafka_config(self) -> KafkaConfig:
        """How to reach the configured Kafka cluster (ConfigurationError without one)."""
        if not self.shared_log:
            raise ConfigurationError("no Kafka cluster is configured: set QTASKS_BOOTSTRAP_SERVERS")
        from qtasks_stream.eventlog.kafka_config import KafkaConfig

        return KafkaConfig(
            bootstrap_servers=self.bootstrap_servers,
            security_protocol=self.security_protocol,
            sasl_mechanism=self.sasl_mechanism,
            sasl_username=self.sasl_username,
            sasl_password=self.sasl_password,
            ssl_cafile=self.ssl_cafile,
            transaction_timeout_ms=self.transaction_timeout_ms,
            extra=cast("Mapping[str, str]", self.kafka_extra),
        )

    def registry_conf(self) -> dict[str, Any] | None:
        """The schema registry client's configuration; None when no registry is set."""
        if not self.schema_registry_url:
            return None
        conf: dict[str, Any] = {"url": self.schema_registry_url, "timeout": REGISTRY_TIMEOUT_S}
        if self.schema_registry_auth:
            conf["basic.auth.user.info"] = self.schema_registry_auth
        return conf

    def build_registry(self) -> SchemaRegistryClient | None:
        """A client of the configured registry; None (the app's ``mock://``) when unset."""
        conf = self.registry_conf()
        if conf is None:
            return None
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return SchemaRegistryClient(conf)

    def build_view(self) -> ViewStore | None:
        """The view store ``view_url`` names, unstarted; None when unset."""
        if not self.view_url:
            return None
        from qtasks_stream.views.url import open_view

        return open_view(self.view_url)


def _secret_from(path: str) -> str:
    """The first line of ``path``; the error names the file, never its content."""
    try:
        with open(path, encoding="utf-8") as file:
            value = file.readline().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the secret file {path!r}: {exc.strerror}") from exc
    if not value:
        raise ConfigurationError(f"the secret file {path!r} is empty")
    return value


def _json_object(name: str, raw: str) -> dict[str, ConfValue]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name} is not JSON: {exc}") from exc
    if not isinstance(value, dict) or not all(
        isinstance(v, str | int | float | bool) for v in value.values()
    ):
        raise ConfigurationError(
            f"{name} must be a JSON object of strings, numbers or booleans, not {raw!r}"
        )
    return value
