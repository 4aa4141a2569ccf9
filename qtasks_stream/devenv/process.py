"""What the dev services (``DevKafka``, ``DevRegistry``, ``DevPostgres``) share at the process
level: one detached process per ``home`` (their shared lifecycle is :mod:`.base`'s).

``ManagedProcess`` owns a service's pid file, its up/down lock, the check that a pid is still
this home's process, the detached start, the bounded wait until it is ready and the bounded
stop. For a service named ``<name>`` it uses, under ``home``::

    <name>.pid           pid of the running process
    .dev<name>.lock      held by up() and down() while they start or stop it
    logs/<name>.out      the process's stdout and stderr; earlier starts' as <name>.out.1
                         (the newest) to <name>.out.9, so a failed start is never overwritten

The module functions are the other steps the services take: finding a program, probing a
port, reading and checking ``java -version`` and fetching from Maven Central.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

from qtasks_stream.errors import DevEnvError

__all__ = [
    "HOST",
    "ManagedProcess",
    "check_java_major",
    "file_lock",
    "java_major",
    "port_in_use",
    "print_to_stderr",
    "require",
    "run_logged",
    "run_maven",
    "tail",
    "with_tail",
]

#: Everything binds and advertises loopback only.
HOST: Final = "127.0.0.1"

# How long a process that failed to become ready gets to exit on SIGTERM before SIGKILL.
_FAILED_START_STOP_TIMEOUT: Final = 10.0
# How long SIGKILL may take to show: past this the process is stuck in the kernel.
_KILL_WAIT: Final = 5.0
# How long a live process's command line may read empty (it is in execve or exiting) before
# the process counts as not ours; the window lasts microseconds, more on a loaded machine.
_EXEC_WINDOW: Final = 1.0
# How many earlier runs' output each service keeps (logs/<name>.out.1 is the newest).
_KEPT_RUNS: Final = 9


def print_to_stderr(message: str) -> None:
    """The default ``log`` of the dev services: progress goes to stderr, not stdout."""
    print(message, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - 32768))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return f"({path} is missing)"
    return "\n".join(text.splitlines()[-lines:])


def with_tail(message: str, log_file: Path) -> str:
    """``message``, then the last lines of ``log_file``: for an error its log explains."""
    return f"{message}; last lines of {log_file}:\n{tail(log_file)}"


def run_logged(
    command: Sequence[str],
    log_file: Path,
    *,
    timeout: float,
    timed_out: str,
    cwd: Path | None = None,
) -> int:
    """Run ``command`` (no stdin, stdout and stderr to ``log_file``); return its exit code.

    Raises ``DevEnvError`` with ``timed_out`` and the log's name if it outlives ``timeout``
    seconds.
    """
    with log_file.open("wb") as out:
        try:
            result = subprocess.run(
                command,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DevEnvError(f"{timed_out}; see {log_file}") from exc
    return result.returncode


def require(program: str, hint: str) -> str:
    """Return the path of ``program`` on PATH, or raise ``DevEnvError(hint)``."""
    path = shutil.which(program)
    if path is None:
        raise DevEnvError(hint)
    return path


def port_in_use(port: int) -> bool:
    """True if something accepts connections on ``HOST:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def java_major(java: str) -> int | None:
    """The major version ``java -version`` reports, or None if its output has no version.

    Raises ``DevEnvError`` if ``java`` cannot be run at all.
    """
    try:
        result = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DevEnvError(f"cannot run {java} -version: {exc}") from exc
    # 'openjdk version "21.0.5" ...', 'openjdk version "25" ...' or 'java version "1.8.0_292"'.
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if match is None:
        return None
    major = int(match[1])
    if major == 1 and match[2] is not None:
        major = int(match[2])
    return major


def check_java_major(
    java: str, major: int | None, *, minimum: int, product: str, hint: str
) -> None:
    """Raise ``DevEnvError`` if ``java`` is Java ``major`` and that is older than ``minimum``.

    An unknown ``major`` (None) passes. ``product`` names what needs the version ("Kafka
    4.1.1"); ``hint``, which follows the message as it is, says what to install.
    """
    if major is not None and major < minimum:
        raise DevEnvError(f"{java} is Java {major}; {product} needs Java {minimum}+{hint}")


def run_maven(
    mvn: str,
    args: Sequence[str],
    *,
    target: Path,
    maven_repo: Path,
    log_file: Path,
    timeout: float,
    what: str,
) -> None:
    """Run ``mvn <args> -DoutputDirectory=<target>`` with its output in ``log_file``.

    A ``target`` left by an interrupted fetch is deleted first; Maven runs in a scratch
    folder next to ``maven_repo``. Raises ``DevEnvError`` (with the log's tail) if Maven fails
    or outlives ``timeout`` seconds; ``what`` names the fetch in that message.
    """
    if target.exists():
        shutil.rmtree(target)  # an interrupted fetch: start clean rather than trust it
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # Without a project, the dependency plugin drops a literal '${project.basedir}' folder
    # (its markers) into the working directory: give Maven a scratch one, never the caller's.
    scratch = maven_repo.parent / ".fetch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    command = [
        mvn,
        "--batch-mode",
        "--no-transfer-progress",
        f"-Dmaven.repo.local={maven_repo}",
        *args,
        f"-DoutputDirectory={target}",
    ]
    try:
        code = run_logged(
            command,
            log_file,
            timeout=timeout,
            timed_out=f"Maven did not finish within {timeout:.0f}s",
            cwd=scratch,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if code != 0:
        raise DevEnvError(with_tail(f"Maven failed (exit {code}) fetching {what}", log_file))


@contextlib.contextmanager
def file_lock(path: Path, deadline: float, busy: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` while the block runs.

    Waits until ``deadline`` at most, then raises ``DevEnvError(busy)``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Python opens files close-on-exec, so a JVM started meanwhile never inherits the lock.
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DevEnvError(busy) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rotate(path: Path, keep: int) -> None:
    """Shift ``path`` to ``path.1``, ``path.1`` to ``path.2``, ...; drop what passes ``keep``."""
    for number in range(keep, 0, -1):
        older = path.with_name(f"{path.name}.{number}")
        newer = path if number == 1 else path.with_name(f"{path.name}.{number - 1}")
        if newer.exists():
            newer.replace(older)  # replaces (drops) the oldest when number == keep


class ManagedProcess:
    """One detached service process of ``home``: its pid file, lock, start, wait and stop.

    ``what`` names the service in messages ("the Kafka broker"). A pid counts as this
    service only while its command line holds every one of ``markers`` as a whole argument,
    so a pid reused by another program after a crash is never signalled. ``expectation`` is
    what readiness means, for the message when it does not come ("answer GET ..."), and
    ``data_dir`` what ``down(wipe=True)`` clears, named when the process dies during startup.
    """

    def __init__(
        self,
        home: Path,
        name: str,
        *,
        what: str,
        markers: Sequence[str],
        expectation: str,
        data_dir: Path,
        log: Callable[[str], None],
    ) -> None:
        if not markers:
            raise ValueError("markers must not be empty: any process would pass as ours")
        self._home = home
        self._name = name
        self._what = what
        self._markers = tuple(marker.encode() for marker in markers)
        self._expectation = expectation
        self._data_dir = data_dir
        self._log = log

    @property
    def name(self) -> str:
        """The service's name: ``<name>.pid``, ``logs/<name>.out``, ``dev<name>:`` lines."""
        return self._name

    @property
    def pid_file(self) -> Path:
        """The file that holds the running process's pid."""
        return self._home / f"{self._name}.pid"

    @property
    def out_file(self) -> Path:
        """The process's stdout and stderr."""
        return self._home / "logs" / f"{self._name}.out"

    def locked(self, deadline: float) -> contextlib.AbstractContextManager[None]:
        """Hold this home's lock (waiting until ``deadline`` at most) while the block runs."""
        # Serialises up/down across processes (e.g. pytest workers sharing one home).
        return file_lock(
            self._home / f".dev{self._name}.lock",
            deadline,
            f"another process is starting or stopping {self._what} in {self._home}",
        )

    def read_pid(self, *, cleanup: bool = True) -> int | None:
        """Return the pid of this home's running process; drop a stale pid file if ``cleanup``."""
        try:
            pid = int(self.pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None
        if self.alive(pid):
            return pid
        if cleanup:
            self.pid_file.unlink(missing_ok=True)
        return None

    def alive(self, pid: int) -> bool:
        """True if ``pid`` runs and is this home's process (not a zombie, not a reused pid)."""
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
        # While a process execs (posix_spawn's own exec, the registry's sh exec'ing the JVM)
        # or exits, the kernel shows an empty command line for a moment: read again rather
        # than take a starting service for one that died (the "exited during startup" with
        # an empty log that one `dev up` in a few used to report).
        deadline = time.monotonic() + _EXEC_WINDOW
        while True:
            try:
                stat = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
                cmdline = (proc / str(pid) / "cmdline").read_bytes()
            except OSError:
                return False
            # The state follows the parenthesised command name, which may itself hold spaces.
            fields = stat.rpartition(")")[2].split()
            if not fields or fields[0] in ("Z", "X"):  # a zombie whose parent does not reap it
                return False
            if cmdline or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        # The pid may have been reused: it must carry every marker of this home's process.
        args = cmdline.split(b"\0")
        return all(marker in args for marker in self._markers)

    def spawn(self, argv: list[str]) -> int:
        """Start ``argv`` detached, output to ``out_file``; record and return its pid."""
        out = self.out_file
        out.parent.mkdir(parents=True, exist_ok=True)
        _rotate(out, _KEPT_RUNS)
        truncate = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        file_actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(out), truncate, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        # posix_spawn with setsid is start_new_session=True without a subprocess.Popen object:
        # the service outlives this process, and a dropped Popen would warn "still running".
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=file_actions, setsid=True)
        self.pid_file.write_text(f"{pid}\n", encoding="ascii")
        return pid

    def wait_ready(
        self, pid: int, deadline: float, timeout: float, ready: Callable[[float], bool]
    ) -> None:
        """Poll ``ready(seconds)`` until it is true; raise if ``pid`` dies or ``deadline`` passes.

        ``timeout`` is the caller's bound, for the message; the error carries the tail of
        ``out_file``.
        """
        out = self.out_file
        while True:
            if not self.alive(pid):
                raise DevEnvError(
                    with_tail(
                        f"{self._what} (pid {pid}) exited during startup (if {self._data_dir} "
                        "is damaged, down(wipe=True) clears it)",
                        out,
                    )
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevEnvError(
                    with_tail(
                        f"{self._what} (pid {pid}) did not {self._expectation} within {timeout:g}s",
                        out,
                    )
                )
            if ready(min(2.0, remaining)):
                return
            time.sleep(max(0.0, min(0.2, deadline - time.monotonic())))

    def start(
        self,
        argv: list[str],
        *,
        deadline: float,
        timeout: float,
        ready: Callable[[float], bool],
    ) -> int:
        """``spawn`` then ``wait_ready``; a process that never became ready is stopped."""
        pid = self.spawn(argv)
        try:
            self.wait_ready(pid, deadline, timeout, ready)
        except BaseException:
            # A process that never became ready still holds its ports: do not leave it behind.
            self.stop(pid, _FAILED_START_STOP_TIMEOUT)
            self.pid_file.unlink(missing_ok=True)
            raise
        return pid

    def stop_running(self, timeout: float) -> None:
        """Stop this home's process if one runs (see ``stop``) and remove the pid file."""
        pid = self.read_pid()
        if pid is not None:
            self._log(f"dev{self._name}: stopping {self._what} (pid {pid})")
            self.stop(pid, timeout)
        self.pid_file.unlink(missing_ok=True)

    def stop(self, pid: int, timeout: float) -> None:
        """SIGTERM, then SIGKILL if ``pid`` is still up ``timeout`` seconds later."""
        with contextlib.suppress(ProcessLookupError):
            # The JVM's shutdown hooks run: Kafka's controlled shutdown, Quarkus's, the CDS dump.
            os.kill(pid, signal.SIGTERM)
        if self._wait_exit(pid, time.monotonic() + timeout):
            return
        self._log(
            f"dev{self._name}: {self._what} (pid {pid}) still up {timeout:.0f}s after SIGTERM; "
            "SIGKILL"
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not self._wait_exit(pid, time.monotonic() + _KILL_WAIT):
            raise DevEnvError(f"{self._what} (pid {pid}) survived SIGKILL")

    def _wait_exit(self, pid: int, deadline: float) -> bool:
        while self.alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True
