"""The dev environment as one tool: its home, its ports, and up/status/down over its services.

``DevEnvironment`` drives the broker (``DevKafka``), the schema registry (``DevRegistry``) and
PostgreSQL (``DevPostgres``) of one home together, for ``qtasks-stream dev``. The home
defaults to the user's cache folder (``$XDG_CACHE_HOME/qtasks-stream/dev``, else
``~/.cache/qtasks-stream/dev``), never the working directory, so ``dev status`` and ``dev
down`` find from any folder what ``dev up`` started. ``up`` records the ports it used and the
services it started in ``<home>/dev.json``; ``status`` and ``down`` read them back. Ports are
chosen explicitly (options or ``QTASKS_DEV_*_PORT``), else recorded, else the defaults; a
running environment keeps its ports until ``down``.

Layout of ``home``::

    dev.json     {"ports": {"kafka": ..., ...}, "services": ["kafka", ...], "secure": false}
    .dev.lock    held while up() or down() runs
    kafka/       DevKafka's home
    registry/    DevRegistry's home
    postgres/    DevPostgres's home
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qtasks_stream.devenv.kafka import DevKafka, DevKafkaStatus
from qtasks_stream.devenv.postgres import DevPostgres, DevPostgresStatus
from qtasks_stream.devenv.process import file_lock, print_to_stderr
from qtasks_stream.devenv.registry import DevRegistry, DevRegistryStatus
from qtasks_stream.errors import DevEnvError

__all__ = [
    "HOME_ENV",
    "PORT_ENVS",
    "DevEnvironment",
    "DevEnvironmentStatus",
    "DevPorts",
    "default_home",
    "home_from",
    "ports_from",
]

#: The environment variable that overrides the default home.
HOME_ENV: Final = "QTASKS_DEV_HOME"
#: The environment variable that sets each port, by ``DevPorts`` field.
PORT_ENVS: Final = {
    "kafka": "QTASKS_DEV_PORT",
    "controller": "QTASKS_DEV_CONTROLLER_PORT",
    "registry": "QTASKS_DEV_REGISTRY_PORT",
    "postgres": "QTASKS_DEV_POSTGRES_PORT",
}
# The broker always runs; the other two when asked for.
_SERVICES: Final = ("kafka", "registry", "postgres")
# Bounds the wait for another up/down of the same home (a first up fetches for minutes).
_LOCK_WAIT: Final = 1200.0


@dataclass(frozen=True, slots=True)
class DevPorts:
    """The 127.0.0.1 ports of one dev environment."""

    kafka: int = 19092
    controller: int = 19093
    registry: int = 18081
    postgres: int = 15432

    def __post_init__(self) -> None:
        values = dataclasses.astuple(self)
        for field, value in zip(PORT_ENVS, values, strict=True):
            if not 0 < value < 65536:
                raise DevEnvError(f"the {field} port must be 1-65535, not {value}")
        if len(set(values)) != len(values):
            raise DevEnvError(f"the dev environment's ports must all differ: {self}")


@dataclass(frozen=True, slots=True)
class DevEnvironmentStatus:
    """What ``DevEnvironment.status`` saw, one entry per service the home runs."""

    home: Path
    ports: DevPorts
    kafka: DevKafkaStatus
    #: The broker's client variables (the SASL_SSL ones too when secured; no password).
    kafka_exports: Mapping[str, str]
    registry: DevRegistryStatus | None
    #: The registry's client variables (with the app's auth file when secured; no password).
    registry_exports: Mapping[str, str]
    postgres: DevPostgresStatus | None

    @property
    def running(self) -> bool:
        """True if every service of the environment runs and answers."""
        return all(
            status.running for status in (self.kafka, self.registry, self.postgres) if status
        )

    def exports(self) -> dict[str, str]:
        """The client variables of the services that run."""
        exports: dict[str, str] = {}
        if self.kafka.running:
            exports.update(self.kafka_exports)
        if self.registry is not None and self.registry.running:
            exports.update(self.registry_exports)
        if self.postgres is not None and self.postgres.running:
            exports["QTASKS_POSTGRES_DSN"] = self.postgres.dsn
        return exports


def default_home(env: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME/qtasks-stream/dev``, else ``$HOME/.cache/qtasks-stream/dev``."""
    cache = env.get("XDG_CACHE_HOME", "")
    # The XDG spec: a relative value is invalid and is ignored.
    base = Path(cache) if os.path.isabs(cache) else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "qtasks-stream" / "dev"


def home_from(explicit: str | None, env: Mapping[str, str]) -> Path:
    """The home ``--home`` names, else ``QTASKS_DEV_HOME``, else ``default_home``."""
    return Path(explicit or env.get(HOME_ENV) or default_home(env)).absolute()


def ports_from(explicit: Mapping[str, int | None], env: Mapping[str, str]) -> dict[str, int]:
    """The ports asked for: each option given in ``explicit``, else its ``QTASKS_DEV_*`` variable.

    Keys are ``DevPorts`` fields; ports asked for nowhere are left out.
    """
    ports: dict[str, int] = {}
    for field, variable in PORT_ENVS.items():
        value = explicit.get(field)
        if value is not None:
            ports[field] = value
        elif env.get(variable):
            try:
                ports[field] = int(env[variable])
            except ValueError:
                raise DevEnvError(
                    f"{variable} must be a port number, not {env[variable]!r}"
                ) from None
    return ports


class DevEnvironment:
    """The broker, registry and PostgreSQL of one ``home``, started and stopped together.

    ``ports`` holds the ports asked for (see ``ports_from``); the others are the recorded ones,
    else the defaults. Asking for other ports while a service of the home runs is an error.
    """

    def __init__(
        self,
        home: Path,
        ports: Mapping[str, int] | None = None,
        *,
        secure: bool | None = None,
        log: Callable[[str], None] = print_to_stderr,
    ) -> None:
        self._home = Path(home).absolute()
        self._log = log
        recorded_ports, self._services, recorded_secure = self._read_record()
        # Like the ports: recorded unless asked for, and fixed while the broker runs.
        self._secure = recorded_secure
        asked = dict(ports or {})
        unknown = set(asked) - set(PORT_ENVS)
        if unknown:
            raise ValueError(f"unknown ports {sorted(unknown)}; known: {sorted(PORT_ENVS)}")
        self._ports = DevPorts(**recorded_ports)
        changed = {
            field: value for field, value in asked.items() if recorded_ports.get(field) != value
        }
        if changed and self._running():
            raise DevEnvError(
                f"the dev environment in {self._home} runs on ports {recorded_ports}; "
                f"run `qtasks-stream dev down` before choosing others ({changed})"
            )
        if secure is not None and secure != recorded_secure and self._running():
            raise DevEnvError(
                f"the dev broker in {self._home} runs "
                f"{'secured' if recorded_secure else 'without --secure'}; run "
                "`qtasks-stream dev down` before switching"
            )
        self._ports = DevPorts(**{**recorded_ports, **asked})
        self._secure = recorded_secure if secure is None else secure

    @property
    def home(self) -> Path:
        return self._home

    @property
    def ports(self) -> DevPorts:
        return self._ports

    @property
    def secure(self) -> bool:
        """Whether the broker runs (or will run) with SASL_SSL and ACLs (``--secure``)."""
        return self._secure

    @property
    def services(self) -> frozenset[str]:
        """The services ``up`` started and ``down`` has not stopped since."""
        return self._services

    def up(self, *, registry: bool = True, postgres: bool = False) -> dict[str, str]:
        """Start the broker, and the registry and PostgreSQL if asked; return the client
        variables (``QTASKS_BOOTSTRAP_SERVERS`` and the others) of what runs.

        Raises ``DevEnvError`` if a service fails to start (the ones already up keep running).
        """
        wanted = (
            {"kafka"}
            | ({"registry"} if registry else set())
            | ({"postgres"} if postgres else set())
        )
        with self._locked():
            # Recorded first: a failed start leaves its service for status to report and for
            # down to stop.
            self._services = self._services | wanted
            self._write_record()
            kafka = self._kafka()
            kafka.up()
            exports = kafka.client_exports()
            if registry:
                registry_ = self._registry()
                registry_.up()
                exports.update(registry_.client_exports())
            if postgres:
                exports["QTASKS_POSTGRES_DSN"] = self._postgres().up()
            return exports

    def down(self, *, wipe: bool = False, registry: bool = True, postgres: bool = False) -> None:
        """Stop every service ``up`` started here (see ``status`` for which).

        ``wipe`` also deletes their data and logs; fetched programs are kept.
        """
        with self._locked():
            services = self._services_for(registry=registry, postgres=postgres)
            if "postgres" in services:
                self._postgres().down(wipe=wipe)
            if "registry" in services:
                self._registry().down(wipe=wipe)
            self._kafka().down(wipe=wipe)
            self._services = frozenset()
            self._write_record()

    def status(self, *, registry: bool = True, postgres: bool = False) -> DevEnvironmentStatus:
        """Check the services ``up`` started here and PostgreSQL if asked; with nothing
        started, the broker and the registry unless ``registry`` is false."""
        services = self._services_for(registry=registry, postgres=postgres)
        return DevEnvironmentStatus(
            home=self._home,
            ports=self._ports,
            kafka=self._kafka().status(),
            kafka_exports=self._kafka().client_exports(),
            registry=self._registry().status() if "registry" in services else None,
            registry_exports=self._registry().client_exports(),
            postgres=self._postgres().status() if "postgres" in services else None,
        )

    # -- the services -----------------------------------------------------------------------

    def _running(self) -> list[str]:
        """The recorded services whose process still runs (none after a reboot, say)."""
        pids = {
            "kafka": lambda: self._kafka().status().pid,
            "registry": lambda: self._registry().status().pid,
            "postgres": lambda: self._postgres().status().pid,
        }
        return [name for name in sorted(self._services) if pids[name]() is not None]

    def _services_for(self, *, registry: bool, postgres: bool) -> frozenset[str]:
        """What status and down cover: the services up started here, plus PostgreSQL if asked;
        with nothing started yet, what ``up`` with the same options would start."""
        services = self._services or frozenset({"kafka", *(["registry"] if registry else [])})
        return services | ({"postgres"} if postgres else set())

    def _kafka(self) -> DevKafka:
        return DevKafka(
            self._home / "kafka",
            port=self._ports.kafka,
            controller_port=self._ports.controller,
            secure=self._secure,
            log=self._log,
        )

    def _registry(self) -> DevRegistry:
        # Secured with the broker: the same users, the same passwords.
        return DevRegistry(
            self._home / "registry",
            port=self._ports.registry,
            secrets=self._kafka().secrets,
            log=self._log,
        )

    def _postgres(self) -> DevPostgres:
        return DevPostgres(self._home / "postgres", port=self._ports.postgres, log=self._log)

    # -- the record -------------------------------------------------------------------------

    @property
    def _record_file(self) -> Path:
        return self._home / "dev.json"

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(
            self._home / ".dev.lock",
            time.monotonic() + _LOCK_WAIT,
            f"another `dev up` or `dev down` is running in {self._home}",
        )

    def _read_record(self) -> tuple[dict[str, int], frozenset[str], bool]:
        try:
            text = self._record_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, frozenset(), False
        try:
            record = json.loads(text)
            ports = {str(field): int(value) for field, value in record["ports"].items()}
            services = frozenset(str(name) for name in record["services"])
            secure = record.get("secure", False)
            if not isinstance(secure, bool):
                raise TypeError(f"secure must be true or false, not {secure!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DevEnvError(
                f"{self._record_file} is damaged ({exc!r}); delete it and check which "
                "services still run"
            ) from exc
        if not set(ports) <= set(PORT_ENVS) or not services <= set(_SERVICES):
            raise DevEnvError(f"{self._record_file} names unknown ports or services: {text!r}")
        return ports, services, secure

    def _write_record(self) -> None:
        record = {
            "ports": dataclasses.asdict(self._ports),
            "services": [name for name in _SERVICES if name in self._services],
            "secure": self._secure,
        }
        self._home.mkdir(parents=True, exist_ok=True)
        partial = self._record_file.with_name(f"{self._record_file.name}.partial")
        partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        partial.replace(self._record_file)  # atomic: a reader sees the old or the new record
