"""A Confluent-compatible schema registry for development and tests, without Docker.

``DevRegistry`` runs Apicurio Registry (a Quarkus application) from Maven Central: ``mvn``
fetches and unpacks ``io.apicurio:apicurio-registry-app:<version>:tar.gz:all`` once (cached
under ``home``) and the JVM runs detached, listening on 127.0.0.1 only. Clients use its
Confluent-compatible API, ``http://127.0.0.1:<port>/apis/ccompat/v7``, with confluent-kafka's
``SchemaRegistryClient``.

Apicurio Registry 3.3 is compiled for Java 21: the ``java`` on ``PATH`` may be older than that
(Debian 12 packages only 17), so a Java 21+ runtime is looked for in ``QTASKS_REGISTRY_JAVA``,
``JAVA_HOME``, ``PATH`` and ``/usr/lib/jvm``, in that order.

Differences from Confluent's defaults, set here so the registry behaves like Confluent's:

- the global compatibility level is ``BACKWARD`` (Apicurio's own default is no rule);
- schemas are kept in an H2 database file under ``home`` (Apicurio's default is in memory),
  so the schema ids inside records a dev broker still holds stay valid across restarts;
- ids stay content ids (``apicurio.ccompat.legacy-id-mode.enabled=false``): the same schema
  text has the same id in every subject, as with Confluent. Unlike Confluent, the same schema
  formatted differently (other whitespace) gets a new id in another subject.

With ``secrets`` (the secured dev environment's, see :mod:`.secure`) every request needs HTTP
basic auth, anonymous ones are answered 401 on every path, and Apicurio's role-based
authorization gives each user its role from ``REGISTRY_ROLES``: ``admin`` all, ``app``
registers schemas and sets subjects' compatibility, ``reader`` only reads. The users are
Quarkus' embedded users, read from ``secrets.registry_users_file`` (no password on the
command line), with the passwords of the broker's SCRAM users.

Layout of ``home``::

    apicurio-<version>/  the unpacked Quarkus application (``.complete`` marks a finished fetch)
    maven-repo/          Maven's local repository (the plugin; the tarball is deleted once unpacked)
    cds/                 the JVM's class-data archive, written by the first run (faster starts)
    data/                the H2 database: subjects, schemas, ids, compatibility settings
    tmp/                 the JVM's java.io.tmpdir
    logs/                registry.out (the JVM's stdout and stderr), maven-<version>.log
    registry.pid         pid of the running registry
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qtasks_stream.devenv.base import MavenDevService, tcp_port
from qtasks_stream.devenv.process import (
    HOST,
    check_java_major,
    java_major,
    print_to_stderr,
)
from qtasks_stream.devenv.secure import APP_USER, READER_USER, DevSecrets
from qtasks_stream.errors import DevEnvError

__all__ = [
    "APICURIO_VERSION",
    "CCOMPAT_PATH",
    "DevEnvError",
    "DevRegistry",
    "DevRegistryStatus",
]

#: The Apicurio Registry release the dev registry runs (the newest 3.x that resolves on Maven
#: Central with its parent POM; 3.0.9 and 3.3.2 do not).
APICURIO_VERSION: Final = "3.3.3"
#: Where Apicurio serves the Confluent Schema Registry API (v7; ``/apis/ccompat/v8`` also exists).
CCOMPAT_PATH: Final = "/apis/ccompat/v7"
#: The environment variable naming the ``java`` executable to run the registry with.
JAVA_ENV: Final = "QTASKS_REGISTRY_JAVA"

_ARTIFACT: Final = "io.apicurio:apicurio-registry-app:{version}:tar.gz:all"
# Pinned: without a version Maven 3.8 resolves an old dependency plugin whose unpack has no
# -Dartifact.
_DEPENDENCY_PLUGIN: Final = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
# Apicurio Registry 3.3's classes are Java 21 bytecode (class file version 65).
_MIN_JAVA: Final = 21
_JVM_DIRS: Final = (Path("/usr/lib/jvm"),)
_JAVA_INSTALL_HINT: Final = (
    "install a Java 21+ runtime (for example Temurin 21 or 25; Debian 12's apt has only 17) "
    f"and put it on PATH, or set {JAVA_ENV} (or JAVA_HOME) to it"
)
_MVN_HINT: Final = (
    "mvn not found: install Apache Maven 3.8+ (apt-get install maven); "
    "it fetches Apicurio Registry from Maven Central once"
)
_JVM_OPTS: Final = (
    # Sized for a 2-core box: a dev registry holds a few schemas (RSS settles near 220 MB).
    "-Xms128m",
    "-Xmx512m",
    # C1 only and the serial collector: measured the quickest start here (about 6 s, against
    # 10 s with the JVM's defaults) and nothing runs long enough for C2 to pay.
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseSerialGC",
    # Die visibly instead of limping on after an OOM.
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)


@dataclass(frozen=True, slots=True)
class DevRegistryStatus:
    """What ``DevRegistry.status`` saw; ``running`` means the pid is alive and the API answers."""

    running: bool
    pid: int | None
    url: str
    home: Path
    version: str
    #: Whether the registry requires basic auth (``secrets`` given).
    secured: bool = False


class DevRegistry(MavenDevService):
    """Start, check and stop one local Apicurio Registry whose files all live under ``home``.

    ``down(wipe=True)`` also deletes the database (every subject and id) and the logs; the
    downloaded application and the JVM's class-data archive are kept either way.
    """

    def __init__(
        self,
        home: Path,
        *,
        port: int = 18081,
        version: str = APICURIO_VERSION,
        java: str | None = None,
        secrets: DevSecrets | None = None,
        log: Callable[[str], None] = print_to_stderr,
    ) -> None:
        tcp_port(port)
        if not re.fullmatch(r"[0-9A-Za-z.\-]+", version):
            raise ValueError(f"not an Apicurio Registry version: {version!r}")
        # The JVM gets absolute paths: its working directory is whatever the caller's is.
        super().__init__(Path(home).absolute(), port=port, version=version, log=log)
        self._java = java
        self._secrets = secrets
        # A pid is this home's registry only if it runs this home's application: still as the
        # sh that is about to exec the JVM, or as the JVM.
        self._manage(
            "registry",
            what="Apicurio Registry",
            markers=(str(self._run_jar),),
            expectation=f"answer GET {self.url}/subjects",
        )

    # -- public API -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``url`` for confluent-kafka's ``SchemaRegistryClient`` (the ccompat v7 API)."""
        return f"http://{HOST}:{self._port}{CCOMPAT_PATH}"

    @property
    def _address(self) -> str:
        return self.url

    def client_exports(self) -> dict[str, str]:
        """The client variables for this registry: its URL, and when secured the file with
        the app's ``user:password`` (the password itself is never exported)."""
        exports = {"QTASKS_SCHEMA_REGISTRY_URL": self.url}
        if self._secrets is not None:
            exports["QTASKS_SCHEMA_REGISTRY_AUTH_FILE"] = str(
                self._secrets.registry_auth_file(APP_USER)
            )
        return exports

    def status(self) -> DevRegistryStatus:
        """Report whether the registry runs and answers ``GET /subjects``."""
        pid, running = self._probe()
        return DevRegistryStatus(
            running=running,
            pid=pid,
            url=self.url,
            home=self._home,
            version=self._version,
            secured=self._secrets is not None,
        )

    def system_properties(self) -> dict[str, str]:
        """The Quarkus and Apicurio settings passed to the JVM as ``-D`` properties."""
        return self._plain_properties() | self._auth_properties()

    def _auth_properties(self) -> dict[str, str]:
        """With ``secrets``: basic auth on every path, each user's role enforced."""
        if self._secrets is None:
            return {}
        return {
            # Apicurio reads this at run time to put basic auth in its chain (Quarkus also
            # warns that it is "build time fixed": the build left it unset).
            "quarkus.http.auth.basic": "true",
            # Every path needs a login, whatever level Apicurio gives an operation: none is
            # served to an anonymous client (401), the Confluent API included.
            "quarkus.http.auth.permission.everything.paths": "/*",
            "quarkus.http.auth.permission.everything.policy": "authenticated",
            # Roles from the identity (Quarkus' embedded users): sr-admin, sr-developer,
            # sr-readonly. A reader that tries to register is answered 403.
            "apicurio.auth.role-based-authorization": "true",
            "apicurio.auth.role-source": "token",
            "apicurio.auth.anonymous-read-access.enabled": "false",
            "apicurio.auth.authenticated-read-access.enabled": "false",
            "quarkus.security.users.embedded.enabled": "true",
            "quarkus.security.users.embedded.plain-text": "true",
            # The users and their passwords: a 0600 file, not this world-readable command line.
            "quarkus.config.locations": self._secrets.registry_users_file.as_uri(),
        }

    def _plain_properties(self) -> dict[str, str]:
        return {
            # Loopback only, for the API and for Quarkus's management interface (health and
            # metrics, which nothing here uses: any free port).
            "quarkus.http.host": HOST,
            "quarkus.http.port": str(self._port),
            "quarkus.management.host": HOST,
            "quarkus.management.port": "0",
            # Persistent H2 instead of the default in-memory database: the ids in records that
            # a dev broker keeps must still mean the same schemas after a restart.
            "apicurio.storage.kind": "sql",
            "apicurio.storage.sql.kind": "h2",
            "apicurio.datasource.url": f"jdbc:h2:file:{self._data_dir / 'registry'}",
            # The default pool opens 20 connections at start; one dev client needs a few.
            "apicurio.datasource.jdbc.initial-size": "2",
            "apicurio.datasource.jdbc.min-size": "2",
            "apicurio.datasource.jdbc.max-size": "20",
            # Confluent's default compatibility level; Apicurio's default is none at all.
            "apicurio.rules.global.compatibility": "BACKWARD",
            # Confluent's ids: one per schema content, whatever the subject (the default, pinned
            # because the legacy mode hands out one id per subject version instead).
            "apicurio.ccompat.legacy-id-mode.enabled": "false",
            # Scratch files under home, not /tmp.
            "java.io.tmpdir": str(self._tmp_dir),
            "apicurio.storage.snapshot.location": str(self._tmp_dir),
            "apicurio.import.work-dir": str(self._tmp_dir),
            # Tracing is off in the build's defaults; keep it off whatever the environment says.
            "quarkus.otel.sdk.disabled": "true",
        }

    # -- paths ------------------------------------------------------------------------------

    @property
    def _app_dir(self) -> Path:
        return self._home / f"apicurio-{self._version}"

    @property
    def _run_jar(self) -> Path:
        return self._app_dir / "quarkus-run.jar"

    @property
    def _tmp_dir(self) -> Path:
        return self._home / "tmp"

    @property
    def _cds_archive(self) -> Path:
        return self._home / "cds" / f"apicurio-{self._version}.jsa"

    # -- steps of up() ----------------------------------------------------------------------

    def _wiped(self) -> tuple[Path, ...]:
        return self._data_dir, self._logs_dir, self._tmp_dir

    def _ready_check(self) -> Callable[[float], bool]:
        return self._api_ok

    def _start(self, timeout: float, fetch_timeout: float) -> None:
        process = self._process
        if ";" in str(self._home):
            raise DevEnvError(f"{self._home} holds ';', which H2's JDBC URL cannot carry")
        java = self._find_java()
        self._check_ports_free((self._port,), " (another registry?)")
        if self._secrets is not None:
            self._secrets.write_registry_users()
        app = self._ensure_app(fetch_timeout)
        had_archive = self._cds_archive.is_file()
        started = time.monotonic()
        argv = self._prepare_jvm(java, app)
        self._log(
            f"devregistry: starting Apicurio Registry {self._version} with {java} "
            f"(log: {process.out_file})"
        )
        try:
            pid = process.start(
                argv,
                deadline=started + timeout,
                timeout=timeout,
                ready=self._api_ok,
            )
        except BaseException:
            # start() has stopped the JVM that never became ready.
            if not had_archive:
                # Written at exit by a JVM stopped halfway through its start: it would
                # hold only part of the classes, and it is never rewritten once valid.
                self._cds_archive.unlink(missing_ok=True)
            raise
        elapsed = time.monotonic() - started
        self._log(
            f"devregistry: Apicurio Registry {self._version} ready at {self.url} "
            f"(pid {pid}) in {elapsed:.1f}s"
        )

    def _find_java(self) -> str:
        """Return a ``java`` of version 21+, or raise ``DevEnvError`` naming what was found."""
        explicit = self._java or os.environ.get(JAVA_ENV)
        if explicit:
            path = shutil.which(explicit)
            if path is None:
                raise DevEnvError(f"{explicit} (from {JAVA_ENV} or java=) is not an executable")
            check_java_major(
                path,
                _java_major_or_none(path),
                minimum=_MIN_JAVA,
                product=f"Apicurio Registry {self._version}",
                hint=f": {_JAVA_INSTALL_HINT}",
            )
            return path
        seen: dict[str, tuple[str, int | None]] = {}  # real path -> (path as found, major)
        for candidate in _java_candidates():
            real = os.path.realpath(candidate)
            if real in seen:
                continue
            major = _java_major_or_none(candidate)
            seen[real] = (candidate, major)
            if major is not None and major >= _MIN_JAVA:
                return candidate
        if not seen:
            raise DevEnvError(f"java not found: {_JAVA_INSTALL_HINT}")
        found = ", ".join(
            f"{path} (Java {major if major is not None else '?'})" for path, major in seen.values()
        )
        raise DevEnvError(
            f"Apicurio Registry {self._version} needs Java {_MIN_JAVA}+, found only {found}: "
            f"{_JAVA_INSTALL_HINT}"
        )

    def _ensure_app(self, fetch_timeout: float) -> Path:
        app = self._app_dir
        artifact = _ARTIFACT.format(version=self._version)

        def finish() -> tuple[str, str]:
            if not self._run_jar.is_file():
                raise DevEnvError(f"Maven finished but {self._run_jar} is missing")
            # The unpacked copy is what runs: drop the tarball from Maven's repository.
            tarballs = self._maven_repo.joinpath(
                "io", "apicurio", "apicurio-registry-app", self._version
            )
            for tarball in tarballs.glob("*.tar.gz"):
                tarball.unlink()
            return f"{artifact}\n", "fetched and unpacked"

        self._fetch_once(
            app,
            fetch_timeout=fetch_timeout,
            mvn_hint=_MVN_HINT,
            args=lambda: [f"{_DEPENDENCY_PLUGIN}:unpack", f"-Dartifact={artifact}"],
            what=artifact,
            fetching=f"{artifact} (about 160 MB)",
            finish=finish,
        )
        return app

    def _prepare_jvm(self, java: str, app: Path) -> list[str]:
        """Create the folders the JVM writes to; return the command line that starts it."""
        for folder in (self._data_dir, self._tmp_dir, self._cds_archive.parent):
            folder.mkdir(parents=True, exist_ok=True)
        argv = [
            java,
            *_JVM_OPTS,
            # Class-data sharing: the first run writes the archive when it exits, later runs
            # start about 2 s sooner (and a JVM that cannot use it rewrites it).
            "-XX:+AutoCreateSharedArchive",
            f"-XX:SharedArchiveFile={self._cds_archive}",
            f"-XX:ErrorFile={self._logs_dir / 'hs_err_pid%p.log'}",
            *(f"-D{key}={value}" for key, value in self.system_properties().items()),
            "-jar",
            str(self._run_jar),
        ]
        # Quarkus also reads '.env' and 'config/application.properties' in its working
        # directory: start it in the application's folder, not wherever the caller runs.
        # posix_spawn cannot change directory on Python 3.11, so sh does it and execs the JVM
        # (same pid).
        return ["/bin/sh", "-c", 'cd "$0" && exec "$@"', str(app), *argv]

    def _api_ok(self, timeout: float) -> bool:
        """True if ``GET <url>/subjects`` answers 200 with a JSON list."""
        headers = {"Accept": "*/*"}
        if self._secrets is not None:
            # The least the check needs: a read-only user.
            try:
                password = self._secrets.password(READER_USER)
            except DevEnvError:
                return False
            token = base64.b64encode(f"{READER_USER}:{password}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        connection = http.client.HTTPConnection(HOST, self._port, timeout=timeout)
        try:
            connection.request("GET", f"{CCOMPAT_PATH}/subjects", headers=headers)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()
        if response.status != 200:
            return False
        try:
            return isinstance(json.loads(body), list)
        except ValueError:
            return False


def _java_candidates() -> Iterator[str]:
    """``java`` executables in the order they are tried: JAVA_HOME, PATH, then /usr/lib/jvm."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        path = Path(java_home) / "bin" / "java"
        if os.access(path, os.X_OK):
            yield str(path)
    on_path = shutil.which("java")
    if on_path:
        yield on_path
    for folder in _JVM_DIRS:
        if folder.is_dir():
            for path in sorted(folder.glob("*/bin/java")):
                if os.access(path, os.X_OK):
                    yield str(path)


def _java_major_or_none(java: str) -> int | None:
    """The major version of ``java``, or None if it cannot be told (it may not even run)."""
    # A candidate that will not run is passed over, not fatal: a later one may do.
    try:
        return java_major(java)
    except DevEnvError:
        return None
