"""The contract of a dev service (``DevKafka``, ``DevRegistry``, ``DevPostgres``).

``DevService`` writes once what every service of a dev home does alike over its
``ManagedProcess``: the lock-then-reuse-or-start shape of ``up``, the probe behind ``status``,
``down`` with its optional wipe, the check that its ports are free, and the ``home/data`` and
``home/logs`` folders. A service supplies its readiness check, what a wipe deletes, and the
steps of its own start (configuring, the command line, its progress lines).

``MavenDevService`` adds what the two JVM services (the broker, the registry) share: a
program fetched from Maven Central once into ``home``, and an ``up`` that bounds that one-off
fetch apart from the start.
"""

from __future__ import annotations

import abc
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from qtasks_stream.devenv.process import HOST, ManagedProcess, port_in_use, require, run_maven
from qtasks_stream.errors import DevEnvError

__all__ = ["DevService", "MavenDevService", "tcp_port"]


def tcp_port(value: int) -> int:
    """Return ``value`` if it is a TCP port number, else raise ``ValueError``."""
    if not 0 < value < 65536:
        raise ValueError(f"not a TCP port: {value}")
    return value


class DevService(abc.ABC):
    """One dev service whose files all live under ``home``, served on ``port`` of 127.0.0.1.

    The subclass calls ``_manage`` in its ``__init__`` once the paths its process's markers
    name are known, and implements ``_ready_check`` and ``_wiped``.
    """

    #: The service's one process of ``home``: pid file, lock, start, readiness, stop.
    _process: ManagedProcess

    def __init__(self, home: Path, *, port: int, log: Callable[[str], None]) -> None:
        self._home = home
        self._port = port
        self._log = log

    @property
    def port(self) -> int:
        """The client port on 127.0.0.1."""
        return self._port

    @property
    def home(self) -> Path:
        """The folder that holds every file of this service: data, logs, pid file."""
        return self._home

    def down(self, wipe: bool = False, timeout: float = 20) -> None:
        """Stop the service (see ``_stop``); ``wipe`` also deletes what ``_wiped`` names."""
        with self._process.locked(time.monotonic() + timeout):
            self._stop(timeout)
            if wipe:
                for folder in self._wiped():
                    shutil.rmtree(folder, ignore_errors=True)

    # -- what each service supplies ---------------------------------------------------------

    @abc.abstractmethod
    def _ready_check(self) -> Callable[[float], bool]:
        """``ready(seconds)``: true once the service answers a real request, not just a port."""

    @abc.abstractmethod
    def _wiped(self) -> Sequence[Path]:
        """The folders ``down(wipe=True)`` deletes, in order; caches are never among them."""

    def _stop(self, timeout: float) -> None:
        """Stop this home's process: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self._process.stop_running(timeout)

    # -- shared steps -----------------------------------------------------------------------

    @property
    def _data_dir(self) -> Path:
        return self._home / "data"

    @property
    def _logs_dir(self) -> Path:
        return self._home / "logs"

    def _manage(self, name: str, *, what: str, markers: Sequence[str], expectation: str) -> None:
        """Set ``_process``: this home's ``name`` process (see ``ManagedProcess``)."""
        self._process = ManagedProcess(
            self._home,
            name,
            what=what,
            markers=markers,
            expectation=expectation,
            data_dir=self._data_dir,
            log=self._log,
        )

    def _up(
        self,
        start: Callable[[], object],
        *,
        lock_deadline: float,
        timeout: float,
        ready_deadline: float | None = None,
    ) -> None:
        """Hold the home's lock; wait for the process that runs to be ready, else ``start()``.

        The wait for a running process ends at ``ready_deadline``, by default ``timeout``
        seconds after the lock is held.
        """
        process = self._process
        with process.locked(lock_deadline):
            pid = process.read_pid()
            if pid is None:
                start()
                return
            if ready_deadline is None:
                ready_deadline = time.monotonic() + timeout
            process.wait_ready(pid, ready_deadline, timeout, self._ready_check())

    def _probe(self) -> tuple[int | None, bool]:
        """The running process's pid (None if none) and whether it answers within 2 s."""
        pid = self._process.read_pid(cleanup=False)
        return pid, pid is not None and self._ready_check()(2.0)

    def _check_ports_free(self, ports: Sequence[int], suspects: str = "") -> None:
        """Raise ``DevEnvError`` if another program holds one of ``ports``.

        ``suspects`` names who that may be, for the message ("(another registry?)").
        """
        for port in ports:
            if port_in_use(port):
                choose = "other ports" if len(ports) > 1 else "another port"
                raise DevEnvError(
                    f"{HOST}:{port} is already in use by a process this {type(self).__name__} "
                    f"did not start{suspects}; stop it or choose {choose}"
                )


class MavenDevService(DevService):
    """A dev service whose program ``version`` Maven fetches once (cached under ``home``).

    The subclass implements ``_start`` (all of ``up`` past the lock, calling ``_fetch_once``)
    and ``_address``.
    """

    def __init__(self, home: Path, *, port: int, version: str, log: Callable[[str], None]) -> None:
        super().__init__(home, port=port, log=log)
        self._version = version

    @property
    def version(self) -> str:
        """The version of the program this instance runs."""
        return self._version

    def up(self, timeout: float = 90, *, fetch_timeout: float = 900) -> str:
        """Start the service unless it already runs healthy; return the address clients use.

        ``timeout`` bounds the start and the wait until it is ready; the one-off fetch from
        Maven Central is bounded separately by ``fetch_timeout``. Raises ``DevEnvError`` with
        the log's tail on failure.
        """
        self._up(
            lambda: self._start(timeout, fetch_timeout),
            lock_deadline=time.monotonic() + timeout + fetch_timeout,
            timeout=timeout,
        )
        return self._address

    @property
    @abc.abstractmethod
    def _address(self) -> str:
        """What ``up`` returns: the address clients use."""

    @abc.abstractmethod
    def _start(self, timeout: float, fetch_timeout: float) -> None:
        """Start the service: this home's lock is held and its process does not run."""

    def _fetch_once(
        self,
        target: Path,
        *,
        fetch_timeout: float,
        mvn_hint: str,
        args: Callable[[], Sequence[str]],
        what: str,
        fetching: str,
        finish: Callable[[], tuple[str, str]],
    ) -> None:
        """Fetch into ``target`` with Maven unless ``target/.complete`` marks a finished fetch.

        ``args()`` gives Maven's arguments once ``mvn`` is found (see ``run_maven``, which
        ``what`` is for); ``fetching`` names the download in the progress line. ``finish()``
        checks and tidies what Maven left, and returns the marker's text and how the last
        progress line says what was fetched.
        """
        marker = target / ".complete"
        if marker.is_file():
            return
        mvn = require("mvn", mvn_hint)
        argv = args()
        maven_log = self._logs_dir / f"maven-{self._version}.log"
        prefix = f"dev{self._process.name}"
        self._log(
            f"{prefix}: fetching {fetching} from Maven Central into {target} "
            f"(once, then cached; log: {maven_log})"
        )
        started = time.monotonic()
        run_maven(
            mvn,
            argv,
            target=target,
            maven_repo=self._maven_repo,
            log_file=maven_log,
            timeout=fetch_timeout,
            what=what,
        )
        record, fetched = finish()
        marker.write_text(record, encoding="utf-8")
        self._log(f"{prefix}: {fetched} in {time.monotonic() - started:.1f}s")

    @property
    def _maven_repo(self) -> Path:
        return self._home / "maven-repo"
