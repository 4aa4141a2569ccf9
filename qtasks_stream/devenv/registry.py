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

import contextlib
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qtasks_stream.devenv.kafka import HOST, DevEnvError

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


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class DevRegistry:
    """Start, check and stop one local Apicurio Registry whose files all live under ``home``."""

    def __init__(
        self,
        home: Path,
        *,
        port: int = 18081,
        version: str = APICURIO_VERSION,
        java: str | None = None,
        log: Callable[[str], None] = _print_to_stderr,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"not a TCP port: {port}")
        if not re.fullmatch(r"[0-9A-Za-z.\-]+", version):
            raise ValueError(f"not an Apicurio Registry version: {version!r}")
        # The JVM gets absolute paths: its working directory is whatever the caller's is.
        self._home = Path(home).absolute()
        self._port = port
        self._version = version
        self._java = java
        self._log = log

    # -- public API -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``url`` for confluent-kafka's ``SchemaRegistryClient`` (the ccompat v7 API)."""
        return f"http://{HOST}:{self._port}{CCOMPAT_PATH}"

    @property
    def port(self) -> int:
        """The HTTP port on 127.0.0.1."""
        return self._port

    @property
    def home(self) -> Path:
        """The folder that holds the application, database, logs and pid file."""
        return self._home

    @property
    def version(self) -> str:
        """The Apicurio Registry version this instance runs."""
        return self._version

    def up(self, timeout: float = 90, *, fetch_timeout: float = 900) -> str:
        """Start the registry unless it already runs healthy; return the URL clients use.

        ``timeout`` bounds startup and readiness; the one-off download (about 160 MB) is
        bounded separately by ``fetch_timeout``. Raises ``DevEnvError`` with the log tail on
        failure.
        """
        with self._locked(time.monotonic() + timeout + fetch_timeout):
            pid = self._read_pid()
            if pid is not None:
                self._wait_ready(pid, time.monotonic() + timeout, timeout)
                return self.url
            if ";" in str(self._home):
                raise DevEnvError(f"{self._home} holds ';', which H2's JDBC URL cannot carry")
            java = self._find_java()
            self._check_port_free()
            app = self._ensure_app(fetch_timeout)
            had_archive = self._cds_archive.is_file()
            started = time.monotonic()
            pid = self._spawn(java, app)
            try:
                self._wait_ready(pid, started + timeout, timeout)
            except BaseException:
                # A registry that never became ready still holds the port: do not leave it.
                self._stop(pid, 10)
                self._pid_file.unlink(missing_ok=True)
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
            return self.url

    def down(self, wipe: bool = False, timeout: float = 20) -> None:
        """Stop the registry: SIGTERM, then SIGKILL after ``timeout`` seconds.

        ``wipe`` also deletes the database (every subject and id) and the logs; the downloaded
        application and the JVM's class-data archive are kept either way.
        """
        with self._locked(time.monotonic() + timeout):
            pid = self._read_pid()
            if pid is not None:
                self._log(f"devregistry: stopping Apicurio Registry (pid {pid})")
                self._stop(pid, timeout)
            self._pid_file.unlink(missing_ok=True)
            if wipe:
                for folder in (self._data_dir, self._logs_dir, self._tmp_dir):
                    shutil.rmtree(folder, ignore_errors=True)

    def status(self) -> DevRegistryStatus:
        """Report whether the registry runs and answers ``GET /subjects``."""
        pid = self._read_pid(cleanup=False)
        running = pid is not None and self._api_ok(2.0)
        return DevRegistryStatus(
            running=running, pid=pid, url=self.url, home=self._home, version=self._version
        )

    def system_properties(self) -> dict[str, str]:
        """The Quarkus and Apicurio settings passed to the JVM as ``-D`` properties."""
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
    def _data_dir(self) -> Path:
        return self._home / "data"

    @property
    def _tmp_dir(self) -> Path:
        return self._home / "tmp"

    @property
    def _logs_dir(self) -> Path:
        return self._home / "logs"

    @property
    def _cds_archive(self) -> Path:
        return self._home / "cds" / f"apicurio-{self._version}.jsa"

    @property
    def _pid_file(self) -> Path:
        return self._home / "registry.pid"

    @property
    def _registry_out(self) -> Path:
        return self._logs_dir / "registry.out"

    # -- steps of up() ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, deadline: float) -> Iterator[None]:
        # Serialises up/down across processes (e.g. pytest workers sharing one home).
        self._home.mkdir(parents=True, exist_ok=True)
        # Python opens files close-on-exec, so the JVM never inherits (and holds) this lock.
        with (self._home / ".devregistry.lock").open("a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise DevEnvError(
                            f"another process is starting or stopping the registry in {self._home}"
                        ) from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _find_java(self) -> str:
        """Return a ``java`` of version 21+, or raise ``DevEnvError`` naming what was found."""
        explicit = self._java or os.environ.get(JAVA_ENV)
        if explicit:
            path = shutil.which(explicit)
            if path is None:
                raise DevEnvError(f"{explicit} (from {JAVA_ENV} or java=) is not an executable")
            major = _java_major(path)
            if major is not None and major < _MIN_JAVA:
                raise DevEnvError(
                    f"{path} is Java {major}; Apicurio Registry {self._version} needs Java "
                    f"{_MIN_JAVA}+: {_JAVA_INSTALL_HINT}"
                )
            return path
        seen: dict[str, tuple[str, int | None]] = {}  # real path -> (path as found, major)
        for candidate in _java_candidates():
            real = os.path.realpath(candidate)
            if real in seen:
                continue
            major = _java_major(candidate)
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

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((HOST, self._port)) == 0:
                raise DevEnvError(
                    f"{HOST}:{self._port} is already in use by a process this DevRegistry did "
                    f"not start (another registry?); stop it or choose another port"
                )

    def _ensure_app(self, fetch_timeout: float) -> Path:
        app = self._app_dir
        marker = app / ".complete"
        if marker.is_file():
            return app
        mvn = shutil.which("mvn")
        if mvn is None:
            raise DevEnvError(_MVN_HINT)
        if app.exists():
            shutil.rmtree(app)  # an interrupted fetch: start clean rather than trust it
        self._logs_dir.mkdir(parents=True, exist_ok=True)
        # Without a project, the dependency plugin drops a literal '${project.basedir}' folder
        # (its markers) into the working directory: give it a scratch one.
        scratch = self._home / ".fetch"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        maven_repo = self._home / "maven-repo"
        maven_log = self._logs_dir / f"maven-{self._version}.log"
        artifact = _ARTIFACT.format(version=self._version)
        command = [
            mvn,
            "--batch-mode",
            "--no-transfer-progress",
            f"-Dmaven.repo.local={maven_repo}",
            f"{_DEPENDENCY_PLUGIN}:unpack",
            f"-Dartifact={artifact}",
            f"-DoutputDirectory={app}",
        ]
        self._log(
            f"devregistry: fetching {artifact} (about 160 MB) from Maven Central "
            f"into {app} (once, then cached; log: {maven_log})"
        )
        started = time.monotonic()
        try:
            with maven_log.open("wb") as out:
                try:
                    result = subprocess.run(
                        command,
                        cwd=scratch,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        timeout=fetch_timeout,
                        check=False,
                    )
                except subprocess.TimeoutExpired as exc:
                    raise DevEnvError(
                        f"Maven did not finish within {fetch_timeout:.0f}s; see {maven_log}"
                    ) from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if result.returncode != 0:
            raise DevEnvError(
                f"Maven failed (exit {result.returncode}) fetching {artifact}; "
                f"last lines of {maven_log}:\n{_tail(maven_log)}"
            )
        if not self._run_jar.is_file():
            raise DevEnvError(f"Maven finished but {self._run_jar} is missing")
        # The unpacked copy is what runs: drop the tarball from Maven's repository.
        tarball_dir = maven_repo.joinpath("io", "apicurio", "apicurio-registry-app", self._version)
        for tarball in tarball_dir.glob("*.tar.gz"):
            tarball.unlink()
        marker.write_text(f"{artifact}\n", encoding="utf-8")
        self._log(f"devregistry: fetched and unpacked in {time.monotonic() - started:.1f}s")
        return app

    def _spawn(self, java: str, app: Path) -> int:
        for folder in (self._logs_dir, self._data_dir, self._tmp_dir, self._cds_archive.parent):
            folder.mkdir(parents=True, exist_ok=True)
        if self._registry_out.exists():
            # Keep one run for post-mortems.
            self._registry_out.replace(self._logs_dir / "registry.out.1")
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
        shell_argv = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', str(app), *argv]
        truncate = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        file_actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(self._registry_out), truncate, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        self._log(
            f"devregistry: starting Apicurio Registry {self._version} with {java} "
            f"(log: {self._registry_out})"
        )
        # posix_spawn with setsid is start_new_session=True without a subprocess.Popen object:
        # the registry outlives this process, and a dropped Popen would warn "still running".
        pid = os.posix_spawn(
            "/bin/sh", shell_argv, os.environ, file_actions=file_actions, setsid=True
        )
        self._pid_file.write_text(f"{pid}\n", encoding="ascii")
        return pid

    def _api_ok(self, timeout: float) -> bool:
        """True if ``GET <url>/subjects`` answers 200 with a JSON list."""
        connection = http.client.HTTPConnection(HOST, self._port, timeout=timeout)
        try:
            connection.request("GET", f"{CCOMPAT_PATH}/subjects", headers={"Accept": "*/*"})
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

    def _wait_ready(self, pid: int, deadline: float, timeout: float) -> None:
        while True:
            if not self._registry_alive(pid):
                raise DevEnvError(
                    f"Apicurio Registry (pid {pid}) exited during startup (if {self._data_dir} "
                    f"is damaged, down(wipe=True) clears it); "
                    f"last lines of {self._registry_out}:\n{_tail(self._registry_out)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevEnvError(
                    f"Apicurio Registry (pid {pid}) did not answer GET {self.url}/subjects "
                    f"within {timeout:g}s; "
                    f"last lines of {self._registry_out}:\n{_tail(self._registry_out)}"
                )
            if self._api_ok(min(2.0, remaining)):
                return
            time.sleep(max(0.0, min(0.2, deadline - time.monotonic())))

    # -- process bookkeeping ----------------------------------------------------------------

    def _read_pid(self, *, cleanup: bool = True) -> int | None:
        """Return the pid of this home's running registry; drop a stale pid file if ``cleanup``."""
        try:
            pid = int(self._pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None
        if self._registry_alive(pid):
            return pid
        if cleanup:
            self._pid_file.unlink(missing_ok=True)
        return None

    def _registry_alive(self, pid: int) -> bool:
        # Reap our own child first: an exited but unreaped child still "exists" as a zombie.
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return False
        proc = Path("/proc")
        if not proc.is_dir():  # not Linux: no way to check the command line, trust the pid
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        try:
            stat = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
            cmdline = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            return False
        # The state follows the parenthesised command name, which may itself hold spaces.
        fields = stat.rpartition(")")[2].split()
        if not fields or fields[0] in ("Z", "X"):  # a zombie whose parent does not reap it
            return False
        # The pid may have been reused: it must run this home's application (either still as
        # the sh that is about to exec the JVM, or as the JVM).
        return str(self._run_jar).encode() in cmdline.split(b"\0")

    def _stop(self, pid: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # Quarkus shuts down; the JVM writes its CDS archive
        if self._wait_exit(pid, time.monotonic() + timeout):
            return
        self._log(
            f"devregistry: registry (pid {pid}) still up {timeout:.0f}s after SIGTERM; SIGKILL"
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not self._wait_exit(pid, time.monotonic() + 5):
            raise DevEnvError(f"Apicurio Registry (pid {pid}) survived SIGKILL")

    def _wait_exit(self, pid: int, deadline: float) -> bool:
        while self._registry_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True


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


def _java_major(java: str) -> int | None:
    """The major version ``java -version`` reports, or None if it cannot be told."""
    try:
        result = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # 'openjdk version "21.0.5" ...', 'openjdk version "25" ...' or 'java version "1.8.0_292"'.
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if match is None:
        return None
    major = int(match[1])
    if major == 1 and match[2] is not None:
        major = int(match[2])
    return major


def _tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - 32768))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return f"({path} is missing)"
    return "\n".join(text.splitlines()[-lines:])
