"""How to reach a Kafka cluster, in one value both Kafka clients understand.

The same :class:`KafkaConfig` drives the aiokafka and the confluent-kafka event logs, so a
deployment can switch clients without rewriting its settings. Nothing here reads the
environment: the CLI builds the config and passes it in.
"""

from __future__ import annotations

import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from qtasks_stream.errors import ConfigurationError

__all__ = ["UNMANAGED_GROUP_PREFIX", "ConfValue", "KafkaConfig", "principal_of", "redacted"]

#: A librdkafka property value; confluent-kafka converts it to the string librdkafka wants.
ConfValue = str | int | float | bool

#: The group ids confluent-kafka's consumers without a group get (librdkafka insists on one,
#: and looks its coordinator up): on a secured cluster every role needs DESCRIBE on them.
UNMANAGED_GROUP_PREFIX = "qtasks-unmanaged-"

_SECURITY_PROTOCOLS = frozenset({"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"})
_SECRET_FIELDS = frozenset({"sasl_password", "ssl_keyfile_password"})


@dataclass(frozen=True, repr=False)
class KafkaConfig:
    """Connection, security and group-timing settings for a Kafka cluster.

    Args:
        bootstrap_servers: ``host:port[,host:port...]``.
        extra: client properties passed on as they are, last, so they win over everything
            this package sets. Keys use librdkafka's dotted names; for aiokafka they are
            translated to keyword arguments (``max.poll.records`` -> ``max_poll_records``).
    """

    bootstrap_servers: str
    client_id: str = "qtasks-stream"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_check_hostname: bool = True
    #: A group member silent this long is dropped and its partitions move on.
    session_timeout_ms: int = 10_000
    #: How often members learn about a rebalance; smaller rebalances faster.
    heartbeat_interval_ms: int = 1_000
    #: How long a member may take to rejoin a rebalance (and between polls, for librdkafka).
    max_poll_interval_ms: int = 300_000
    metadata_max_age_ms: int = 60_000
    #: How long the broker may hold a fetch that finds no new data, for a consumer that
    #: pauses partitions (aiokafka's worker lanes, readers of a topic up to its end; a
    #: confluent-kafka group member pauses in its own buffer and takes the long wait). A
    #: partition resumed after a pause is fetched only once the fetch in flight returns, so
    #: this bounds how long a drained priority lane idles (the 500 ms default halved a
    #: worker's throughput whenever its lanes filled).
    fetch_max_wait_ms: int = 50
    #: The same for a consumer that never pauses (every stage but the worker, the result
    #: and control listeners): a fetch returns as soon as data arrives, so a longer wait
    #: costs them no latency, and a quiet one wakes its client 10x less often (an idle
    #: worker process: 1.75-1.90% -> 1.00-1.20% of a core). What it still delays: a
    #: partition newly assigned by a rebalance, whose first fetch waits for the one in
    #: flight.
    long_fetch_max_wait_ms: int = 500
    request_timeout_ms: int = 30_000
    transaction_timeout_ms: int = 60_000
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ConfigurationError("KafkaConfig.bootstrap_servers is empty")
        protocol = self.security_protocol.upper()
        if protocol not in _SECURITY_PROTOCOLS:
            raise ConfigurationError(
                f"unknown security_protocol {self.security_protocol!r}; "
                f"expected one of {sorted(_SECURITY_PROTOCOLS)}"
            )
        if self.sasl_mechanism is not None and not protocol.startswith("SASL_"):
            raise ConfigurationError(
                f"sasl_mechanism {self.sasl_mechanism!r} needs security_protocol "
                "SASL_PLAINTEXT or SASL_SSL"
            )
        # Freeze a copy: a caller mutating its dict later must not change a frozen config.
        object.__setattr__(self, "security_protocol", protocol)
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value is not None:
                parts.append(f"{f.name}='***'")
            elif f.name == "extra":
                parts.append(f"extra={redacted(value)!r}")
            else:
                parts.append(f"{f.name}={value!r}")
        return f"KafkaConfig({', '.join(parts)})"

    @property
    def principal(self) -> str:
        """The principal the cluster sees, as its ACLs name it (``User:NAME``)."""
        return principal_of(self.to_librdkafka())

    def fetch_wait_ms(self, *, pauses: bool) -> int:
        """The fetch wait of a consumer that may pause partitions, or never does."""
        return self.fetch_max_wait_ms if pauses else self.long_fetch_max_wait_ms

    # -- librdkafka (confluent-kafka) -------------------------------------------------------

    def to_librdkafka(
        self, settings: Mapping[str, ConfValue] | None = None
    ) -> dict[str, ConfValue]:
        """A librdkafka configuration: connection and security, then ``settings``, then
        :attr:`extra`."""
        conf: dict[str, ConfValue] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol.lower(),
            # librdkafka drops the bootstrap connection once it knows the brokers, then opens
            # the next one no sooner than half this after the last (100 ms by default): every
            # new client waited 50 ms before its first fetch or transaction. Failed
            # connections still back off exponentially from here.
            "reconnect.backoff.ms": 20,
        }
        if self.sasl_mechanism is not None:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password
        if self.ssl_cafile is not None:
            conf["ssl.ca.location"] = self.ssl_cafile
        if self.ssl_certfile is not None:
            conf["ssl.certificate.location"] = self.ssl_certfile
        if self.ssl_keyfile is not None:
            conf["ssl.key.location"] = self.ssl_keyfile
        if self.ssl_keyfile_password is not None:
            conf["ssl.key.password"] = self.ssl_keyfile_password
        if self.security_protocol.endswith("SSL"):
            conf["ssl.endpoint.identification.algorithm"] = (
                "https" if self.ssl_check_hostname else "none"
            )
        conf.update(settings or {})
        conf.update(self.extra)
        return conf

    # -- aiokafka ---------------------------------------------------------------------------

    def to_aiokafka_kwargs(
        self, settings: Mapping[str, Any] | None = None, *, accepted: Collection[str] = ()
    ) -> dict[str, Any]:
        """Keyword arguments for an aiokafka client: connection and security, then
        ``settings``, then those :attr:`extra` entries whose translated name is in
        ``accepted`` (the client's parameter names)."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "metadata_max_age_ms": self.metadata_max_age_ms,
        }
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            kwargs["sasl_plain_username"] = self.sasl_username
        if self.sasl_password is not None:
            kwargs["sasl_plain_password"] = self.sasl_password
        if self.security_protocol.endswith("SSL"):
            kwargs["ssl_context"] = self.ssl_context()
        kwargs.update(settings or {})
        kwargs.update(
            (name, value) for name, value in self.aiokafka_extra().items() if name in accepted
        )
        return kwargs

    def aiokafka_extra(self) -> dict[str, Any]:
        """:attr:`extra` with aiokafka names and Python values (ints, floats, booleans)."""
        return {key.replace(".", "_"): _coerce(value) for key, value in self.extra.items()}

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for aiokafka, from the ``ssl_*`` fields."""
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        # Like librdkafka's ssl.endpoint.identification.algorithm=none: the certificate is
        # still verified, only its host name is not.
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile is not None:
            context.load_cert_chain(
                self.ssl_certfile, self.ssl_keyfile, password=self.ssl_keyfile_password
            )
        return context


#: Parts of a client property name that mark its value secret (``sasl.password``,
#: ``ssl.key.password``, ``sasl.jaas.config``, ``sasl.oauthbearer.client.secret``...).
_SECRET_KEY_PARTS = ("password", "secret", "jaas", "token", "key.pem", "credentials")


def redacted(properties: Mapping[str, Any]) -> dict[str, Any]:
    """``properties`` with the values of secret-looking keys shown as ``'***'``."""
    return {
        key: "***" if any(part in key.lower() for part in _SECRET_KEY_PARTS) else value
        for key, value in properties.items()
    }


def principal_of(conf: Mapping[str, Any]) -> str:
    """The principal a librdkafka or aiokafka configuration authenticates as, as ACLs name it."""
    user = conf.get("sasl.username") or conf.get("sasl_plain_username")
    if user:
        return f"User:{user}"
    protocol = str(conf.get("security.protocol") or conf.get("security_protocol") or "")
    # Without SASL the broker names a TLS client by its certificate, anyone else ANONYMOUS.
    return "the client's certificate" if protocol.upper() == "SSL" else "User:ANONYMOUS"


def _coerce(value: str) -> Any:
    """``"true"`` -> True, ``"5"`` -> 5, ``"0.5"`` -> 0.5, anything else unchanged."""
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value
