"""A single-node Apache Kafka broker for development and tests, without Docker.

``DevKafka`` fetches the broker jars from Maven Central with ``mvn`` (once, cached under
``home``), formats a KRaft log directory and runs ``kafka.Kafka`` (broker and controller in
one JVM) detached, listening on 127.0.0.1 only. ``docker/compose.yaml`` runs the same broker,
with the same ports, for machines that have Docker.

Layout of ``home``::

    libs-<version>/      jars from Maven (``.complete`` marks a finished fetch)
    maven-repo/          Maven's local repository for that fetch
    config/              server.properties, log4j2.properties, kafka-pom.xml (rewritten by up)
    data/                log.dirs: topic data and the KRaft metadata log
    logs/                kafka.out (the JVM's stdout and stderr), format.log, maven-<version>.log
    kafka.pid            pid of the running broker
    secure/              with ``secure``: the CA, the broker's keystore, SCRAM passwords
                         (see :mod:`.secure`)

With ``secure`` the client port is a SASL_SSL listener (SCRAM-SHA-512) and the standard
authorizer refuses whatever no ACL allows; the controller port takes SASL PLAIN from the
broker's own principal only. The SCRAM users ``admin`` (a super user), ``app`` and
``reader`` (no ACLs) are created when the storage is formatted.
"""

from __future__ import annotations

import base64
import importlib.resources
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from qtasks_stream.devenv.base import MavenDevService, tcp_port

# HOST is re-exported: it was defined here first, and callers import it from this module.
from qtasks_stream.devenv.process import HOST as HOST
from qtasks_stream.devenv.process import (
    check_java_major,
    java_major,
    print_to_stderr,
    require,
    run_logged,
    with_tail,
)
from qtasks_stream.devenv.secure import ADMIN_USER, APP_USER, SCRAM_MECHANISM, USERS, DevSecrets
from qtasks_stream.errors import DevEnvError

__all__ = ["KAFKA_VERSION", "DevEnvError", "DevKafka", "DevKafkaStatus"]

#: The one Kafka version the dev broker and ``docker/compose.yaml`` use.
KAFKA_VERSION: Final = "4.1.1"

_PACKAGE: Final = "qtasks_stream.devenv"
_MIN_JAVA: Final = 17
_JAVA_HINT: Final = (
    "java not found: install a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"
)
_MVN_HINT: Final = (
    "mvn not found: install Apache Maven 3.8+ (apt-get install maven); "
    "it fetches the Kafka jars from Maven Central once"
)
_JVM_OPTS: Final = (
    # Sized for a 2-core box: a test broker needs little heap; cores are the limit.
    "-Xms256m",
    "-Xmx768m",
    # The GC settings of Kafka's own kafka-run-class.sh.
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    # C1 only: the broker is ready sooner, and a dev broker never runs long enough for C2 to pay.
    "-XX:TieredStopAtLevel=1",
    # Die visibly instead of limping on after an OOM.
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    # Log4j's own shutdown hook would stop logging while Kafka's hook is still shutting down,
    # losing the last lines of kafka.out; stdout needs no flushing hook.
    "-Dlog4j2.shutdownHookEnabled=false",
)
# StorageTool runs for about a second: small heap, serial GC, no C2.
_TOOL_JVM_OPTS: Final = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")


@dataclass(frozen=True, slots=True)
class DevKafkaStatus:
    """What ``DevKafka.status`` saw; ``running`` means the pid is alive and metadata answers."""

    running: bool
    pid: int | None
    bootstrap: str
    home: Path
    version: str
    #: The CA file when the broker is secured (SASL_SSL), else None.
    ca_file: Path | None = None


class DevKafka(MavenDevService):
    """Start, check and stop one local Kafka broker whose files all live under ``home``.

    ``up``'s ``timeout`` bounds formatting the storage too. ``down(wipe=True)`` also
    deletes the data and logs; the jar cache is kept either way.
    """

    def __init__(
        self,
        home: Path,
        *,
        port: int = 19092,
        controller_port: int = 19093,
        kafka_version: str = KAFKA_VERSION,
        secure: bool = False,
        log: Callable[[str], None] = print_to_stderr,
    ) -> None:
        if port == controller_port:
            raise ValueError("port and controller_port must differ")
        # The JVM gets absolute paths: its working directory is whatever the caller's is.
        super().__init__(Path(home).absolute(), port=tcp_port(port), version=kafka_version, log=log)
        self._controller_port = tcp_port(controller_port)
        self._secrets = DevSecrets(self._home / "secure") if secure else None
        # A pid is this home's broker only if it runs kafka.Kafka with this home's config.
        self._manage(
            "kafka",
            what="the Kafka broker",
            markers=("kafka.Kafka", str(self._server_props)),
            expectation=f"answer metadata requests on {self.bootstrap}",
        )

    # -- public API -------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` value for clients."""
        return f"{HOST}:{self._port}"

    @property
    def _address(self) -> str:
        return self.bootstrap

    @property
    def controller_port(self) -> int:
        """The KRaft controller port on 127.0.0.1."""
        return self._controller_port

    @property
    def secrets(self) -> DevSecrets | None:
        """The CA and passwords of a secured broker; None for a PLAINTEXT one."""
        return self._secrets

    def client_exports(self) -> dict[str, str]:
        """The client variables for this broker: the app's principal and the CA when secured
        (the password stays in its file, named by ``QTASKS_SASL_PASSWORD_FILE``)."""
        exports = {"QTASKS_BOOTSTRAP_SERVERS": self.bootstrap}
        if self._secrets is not None:
            exports |= {
                "QTASKS_SECURITY_PROTOCOL": "SASL_SSL",
                "QTASKS_SASL_MECHANISM": SCRAM_MECHANISM,
                "QTASKS_SASL_USERNAME": APP_USER,
                "QTASKS_SASL_PASSWORD_FILE": str(self._secrets.password_file(APP_USER)),
                "QTASKS_SSL_CAFILE": str(self._secrets.ca_file),
            }
        return exports

    def status(self) -> DevKafkaStatus:
        """Report whether the broker runs and answers a metadata request."""
        pid, running = self._probe()
        return DevKafkaStatus(
            running=running,
            pid=pid,
            bootstrap=self.bootstrap,
            home=self._home,
            version=self._version,
            ca_file=self._secrets.ca_file if self._secrets is not None else None,
        )

    def server_properties(self) -> dict[str, str]:
        """The settings written to ``server.properties``; docker/compose.yaml mirrors them."""
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            # Dynamic quorum (KIP-853), so storage is formatted with --standalone.
            "controller.quorum.bootstrap.servers": f"{HOST}:{self._controller_port}",
            # Explicit loopback: an empty host would bind 0.0.0.0 and advertise the hostname.
            "listeners": f"PLAINTEXT://{HOST}:{self._port},CONTROLLER://{HOST}:{self._controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self._port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self._data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            # Apps create their topics with the partitions and configs they need; a typo'd
            # topic must fail, not appear with one partition.
            "auto.create.topics.enable": "false",
            # No 3 s wait before the first consumer group rebalance.
            "group.initial.rebalance.delay.ms": "0",
            # One node: replication factor 1 everywhere, and one partition for internal topics
            # (the default 50 makes the first group join or transaction slow on 2 cores).
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            # Small-box tuning: fewer threads; the cleaner's 128 MiB dedupe buffer shrunk to 8 MiB.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.dedupe.buffer.size": "8388608",
        } | self._security_properties()

    def _security_properties(self) -> dict[str, str]:
        """With ``secure``: SASL_SSL for clients and the broker itself, SASL PLAIN on the
        controller port (KRaft controllers cannot check SCRAM: its credentials live in the
        metadata they serve), and deny-by-default ACLs with ``admin`` the only super user."""
        if self._secrets is None:
            return {}
        admin = self._secrets.password(ADMIN_USER)
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
        return {
            "listeners": f"SASL_SSL://{HOST}:{self._port},CONTROLLER://{HOST}:{self._controller_port}",
            "advertised.listeners": f"SASL_SSL://{HOST}:{self._port}",
            "inter.broker.listener.name": "SASL_SSL",
            "listener.security.protocol.map": "CONTROLLER:SASL_PLAINTEXT,SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": (
                f'{plain} required username="{ADMIN_USER}" password="{admin}" '
                f'user_{ADMIN_USER}="{admin}";'
            ),
            f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": (
                f'{scram} required username="{ADMIN_USER}" password="{admin}";'
            ),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self._secrets.keystore),
            "ssl.keystore.password": self._secrets.keystore_password,
            "ssl.key.password": self._secrets.keystore_password,
            # The broker is a client of itself (inter-broker): it trusts the same CA.
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self._secrets.ca_file),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:{ADMIN_USER}",
        }

    # -- paths ------------------------------------------------------------------------------

    @property
    def _libs_dir(self) -> Path:
        return self._home / f"libs-{self._version}"

    @property
    def _config_dir(self) -> Path:
        return self._home / "config"

    @property
    def _server_props(self) -> Path:
        return self._config_dir / "server.properties"

    @property
    def _log4j_props(self) -> Path:
        return self._config_dir / "log4j2.properties"

    # -- steps of up() ----------------------------------------------------------------------

    def _wiped(self) -> tuple[Path, ...]:
        return self._data_dir, self._logs_dir

    def _start(self, timeout: float, fetch_timeout: float) -> None:
        process = self._process
        java = require("java", _JAVA_HINT)
        # An unknown version format lets the broker start and fail with its own message.
        check_java_major(
            java,
            java_major(java),
            minimum=_MIN_JAVA,
            product=f"Kafka {self._version}",
            hint=" (apt-get install openjdk-17-jre-headless)",
        )
        self._check_ports_free(
            (self._port, self._controller_port), " (another broker or docker compose?)"
        )
        libs = self._ensure_libs(fetch_timeout)
        if self._secrets is not None:
            self._secrets.ensure()
        started = time.monotonic()
        deadline = started + timeout
        self._write_config()
        self._format_storage(java, libs, deadline)
        self._log(f"devkafka: starting Kafka {self._version} (log: {process.out_file})")
        pid = process.start(
            self._argv(java, libs),
            deadline=deadline,
            timeout=timeout,
            ready=self._ready_check(),
        )
        elapsed = time.monotonic() - started
        self._log(
            f"devkafka: Kafka {self._version} ready at {self.bootstrap} "
            f"(pid {pid}) in {elapsed:.1f}s"
        )

    def _ensure_libs(self, fetch_timeout: float) -> Path:
        libs = self._libs_dir
        pom = self._config_dir / "kafka-pom.xml"

        def args() -> list[str]:
            self._config_dir.mkdir(parents=True, exist_ok=True)
            pom.write_bytes(
                importlib.resources.files(_PACKAGE).joinpath("kafka-pom.xml").read_bytes()
            )
            return [
                "-f",
                str(pom),
                f"-Dkafka.version={self._version}",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
            ]

        def finish() -> tuple[str, str]:
            if not (libs / f"kafka_2.13-{self._version}.jar").is_file():
                raise DevEnvError(
                    f"Maven finished but kafka_2.13-{self._version}.jar is not in {libs}"
                )
            jars = sum(1 for _ in libs.glob("*.jar"))
            return f"kafka {self._version}: {jars} jars\n", f"fetched {jars} jars"

        self._fetch_once(
            libs,
            fetch_timeout=fetch_timeout,
            mvn_hint=_MVN_HINT,
            args=args,
            what=f"Kafka {self._version}",
            fetching=f"Kafka {self._version} jars",
            finish=finish,
        )
        return libs

    def _write_config(self) -> None:
        self._config_dir.mkdir(parents=True, exist_ok=True)
        # Values only, never a trailing comment: .properties would make it part of the value.
        lines = ["# Written by qtasks_stream.devenv.kafka.DevKafka on every start; edits are lost."]
        lines += [
            f"{key}={value.replace(chr(92), chr(92) * 2)}"
            for key, value in self.server_properties().items()
        ]
        # It holds the broker's passwords when secured: its owner's eyes only.
        self._server_props.touch(mode=0o600)
        self._server_props.chmod(0o600)
        self._server_props.write_text("\n".join(lines) + "\n", encoding="utf-8")
        log4j = importlib.resources.files(_PACKAGE).joinpath("kafka-log4j2.properties")
        self._log4j_props.write_bytes(log4j.read_bytes())

    def _classpath(self, libs: Path) -> str:
        return f"{libs}{os.sep}*"  # the JVM expands the wildcard itself

    def _format_storage(self, java: str, libs: Path, deadline: float) -> None:
        if (self._data_dir / "meta.properties").is_file():
            return
        # Without meta.properties the directory holds nothing worth keeping, and a half-formatted
        # one can make the next format fail.
        shutil.rmtree(self._data_dir, ignore_errors=True)
        self._data_dir.mkdir(parents=True)
        self._logs_dir.mkdir(parents=True, exist_ok=True)
        format_log = self._logs_dir / "format.log"
        command = [
            java,
            *_TOOL_JVM_OPTS,
            f"-Dlog4j2.configurationFile={self._log4j_props}",
            "-cp",
            self._classpath(libs),
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "--cluster-id",
            _new_cluster_id(),
            "--config",
            str(self._server_props),
            "--ignore-formatted",
        ]
        if self._secrets is not None:
            # The SCRAM users exist from the first start: the broker needs its own to serve.
            for user in USERS:
                password = self._secrets.password(user)
                command += ["--add-scram", f"{SCRAM_MECHANISM}=[name={user},password={password}]"]
        self._log(f"devkafka: formatting {self._data_dir}")
        code = run_logged(
            command,
            format_log,
            timeout=max(1.0, deadline - time.monotonic()),
            timed_out="formatting Kafka storage timed out",
        )
        if code != 0:
            raise DevEnvError(
                with_tail(f"formatting Kafka storage failed (exit {code})", format_log)
            )

    def _argv(self, java: str, libs: Path) -> list[str]:
        return [
            java,
            *_JVM_OPTS,
            f"-XX:ErrorFile={self._logs_dir / 'hs_err_pid%p.log'}",
            f"-Dkafka.logs.dir={self._logs_dir}",
            f"-Dlog4j2.configurationFile={self._log4j_props}",
            "-cp",
            self._classpath(libs),
            "kafka.Kafka",
            str(self._server_props),
        ]

    def admin_conf(self) -> dict[str, str | int]:
        """A librdkafka configuration for this broker as its super user (``admin``)."""
        conf: dict[str, str | int] = {"bootstrap.servers": self.bootstrap}
        if self._secrets is not None:
            conf |= {
                "security.protocol": "SASL_SSL",
                "sasl.mechanism": SCRAM_MECHANISM,
                "sasl.username": ADMIN_USER,
                "sasl.password": self._secrets.password(ADMIN_USER),
                "ssl.ca.location": str(self._secrets.ca_file),
            }
        return conf

    def _admin(self) -> AdminClient:
        return AdminClient(
            {
                **self.admin_conf(),
                "client.id": "qtasks-devkafka",
                # Quiet: "connection refused" is expected while the broker starts.
                "log_level": 0,
                # Retry the connection often so readiness is seen promptly.
                "reconnect.backoff.ms": 100,
                "reconnect.backoff.max.ms": 500,
            }
        )

    def _ready_check(self) -> Callable[[float], bool]:
        admin = self._admin()  # one client for the whole wait: it keeps retrying to connect

        def ready(timeout: float) -> bool:
            # A metadata answer, not an open port: the socket is bound before requests are
            # served.
            try:
                admin.list_topics(timeout=timeout)
            except KafkaException:
                return False
            return True

        return ready


def _new_cluster_id() -> str:
    """Return a random id in Kafka's ``Uuid`` text form (22 characters of URL-safe base64)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        # Kafka's Uuid.randomUuid() skips ids with a leading '-': CLIs read them as options.
        if not text.startswith("-"):
            return text
