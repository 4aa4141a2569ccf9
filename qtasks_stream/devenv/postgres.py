"""A local PostgreSQL server for development and tests, from the machine's own packages.

``DevPostgres`` runs the ``initdb`` and ``postgres`` programs already installed (``PATH``,
then ``/usr/lib/postgresql/<version>/bin``): it initialises a cluster under ``home`` once,
with ``trust`` authentication for TCP connections from 127.0.0.1 only (no Unix socket, no
other address), starts ``postgres`` detached on a port and waits until a real connection
succeeds, then creates the database the DSN names.

PostgreSQL refuses to run as root. Started by root, both programs run as an unprivileged
account instead: ``QTASKS_POSTGRES_USER`` if set, else ``postgres`` (the account the
distribution's packages create), else ``nobody``. A small Python trampoline drops the
privileges and becomes the program (``exec``), so the recorded pid is the server's own pid. The data
folder is handed to that account; if it cannot enter ``home`` (a checkout under ``/root``),
the data folder moves to ``<tmp>/qtasks-devpostgres-<hash of home>/data``.

Layout of ``home``::

    data/            the cluster (owned by the account the server runs as; see above)
    logs/            postgres.out (the server's stdout and stderr), initdb.log
    postgres.pid     pid of the running server
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from qtasks_stream.devenv.base import DevService
from qtasks_stream.devenv.process import HOST, print_to_stderr, run_logged, with_tail
from qtasks_stream.errors import DevEnvError

__all__ = ["DEFAULT_PORT", "DevPostgres", "DevPostgresStatus"]

#: The dev server's port (the distribution's 5432 stays free for a system server).
DEFAULT_PORT: Final = 15432
#: The environment variable naming the account the server runs as when started by root.
USER_ENV: Final = "QTASKS_POSTGRES_USER"

_SUPERUSER: Final = "qtasks"
_PACKAGE_DIRS: Final = Path("/usr/lib/postgresql")
_INSTALL_HINT: Final = (
    "PostgreSQL server programs (initdb, postgres) were not found on PATH or under "
    "/usr/lib/postgresql/*/bin (apt-get install postgresql)"
)
# Drops to (uid, gid) with no supplementary groups, then becomes the program: same pid.
_TRAMPOLINE: Final = (
    "import os, sys; os.setgroups([]); os.setgid(int(sys.argv[2])); "
    "os.setuid(int(sys.argv[1])); os.execv(sys.argv[3], sys.argv[3:])"
)


@dataclass(frozen=True, slots=True)
class DevPostgresStatus:
    """What ``DevPostgres.status`` saw; ``running`` means the pid is alive and a login works."""

    running: bool
    pid: int | None
    dsn: str
    home: Path


class DevPostgres(DevService):
    """Start, check and stop one local PostgreSQL server whose files all live under ``home``.

    ``down(wipe=True)`` also deletes the cluster and the logs.
    """

    def __init__(
        self,
        home: Path,
        *,
        port: int = DEFAULT_PORT,
        database: str = "qtasks",
        log: Callable[[str], None] = print_to_stderr,
    ) -> None:
        super().__init__(home, port=port, log=log)
        self._database = database
        self._data = _data_folder(home)
        self._manage(
            "postgres",
            what="the PostgreSQL server",
            markers=(str(self._data_dir),),
            expectation=f"accept a login at {self.dsn}",
        )

    # -- public API -------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The connection URL of the dev database (trust authentication, no password)."""
        return f"postgresql://{_SUPERUSER}@{HOST}:{self._port}/{self._database}"

    def up(self, timeout: float = 60) -> str:
        """Start the server unless it already runs healthy; return the DSN.

        Raises ``DevEnvError`` with the log's tail on failure.
        """
        # One deadline for everything: the wait for the lock, initdb, the start, readiness.
        deadline = time.monotonic() + timeout
        self._up(
            lambda: self._start(deadline, timeout),
            lock_deadline=deadline,
            timeout=timeout,
            ready_deadline=deadline,
        )
        return self.dsn

    def status(self) -> DevPostgresStatus:
        """Report whether the server runs and accepts a login."""
        pid, running = self._probe()
        return DevPostgresStatus(running=running, pid=pid, dsn=self.dsn, home=self._home)

    # -- paths ------------------------------------------------------------------------------

    @property
    def _data_dir(self) -> Path:
        return self._data

    # -- steps of down() --------------------------------------------------------------------

    def _stop(self, timeout: float) -> None:
        """Fast shutdown, then TERM, then KILL (of the whole session if it came to KILL)."""
        pid = self._process.read_pid()
        if pid is not None:
            # SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to
            # disconnect; SIGINT (fast) ends the sessions and shuts down cleanly.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            ends = time.monotonic() + timeout
            while self._process.alive(pid) and time.monotonic() < ends:
                time.sleep(0.1)
            stuck = self._process.alive(pid)
            self._process.stop_running(timeout)
            if stuck:
                # A SIGKILLed postmaster leaves its backends behind (its session, from
                # setsid): they hold the shared memory the next start needs.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        self._process.pid_file.unlink(missing_ok=True)

    def _wiped(self) -> tuple[Path, ...]:
        if self._data_dir.parent != self._home:  # the temp-dir fallback's folder goes too
            return self._data_dir, self._data_dir.parent, self._logs_dir
        return self._data_dir, self._logs_dir

    # -- steps of up() ----------------------------------------------------------------------

    def _start(self, deadline: float, timeout: float) -> None:
        process = self._process
        bin_dir = _bin_dir()
        self._check_ports_free((self._port,))
        owner = _server_account()
        self._initdb(bin_dir, owner, deadline)
        self._log(f"devpostgres: starting PostgreSQL (log: {process.out_file})")
        started = time.monotonic()
        pid = process.start(
            self._argv(bin_dir, owner),
            deadline=deadline,
            timeout=timeout,
            ready=self._ready_check(),
        )
        _run_async(self._create_database(), max(1.0, deadline - time.monotonic()))
        self._log(
            f"devpostgres: PostgreSQL ready at {HOST}:{self._port} (pid {pid}) "
            f"in {time.monotonic() - started:.1f}s"
        )

    def _initdb(self, bin_dir: Path, owner: tuple[int, int] | None, deadline: float) -> None:
        data = self._data_dir
        if (data / "PG_VERSION").is_file():
            if owner is not None:
                _check_owner(data, owner)
            return
        # No PG_VERSION: nothing worth keeping, and initdb refuses a non-empty folder.
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        data.chmod(0o700)
        if owner is not None:
            blocked = _blocked_folder(data.parent, owner[0])
            if blocked is not None:
                raise DevEnvError(
                    f"PostgreSQL runs as uid {owner[0]}, which cannot enter {blocked}; "
                    "choose a home under a world-traversable folder"
                )
            os.chown(data, *owner)
        self._logs_dir.mkdir(parents=True, exist_ok=True)
        log_file = self._logs_dir / "initdb.log"
        command = [
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            _SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        self._log(f"devpostgres: initdb {data}")
        code = run_logged(
            _as(owner, command),
            log_file,
            timeout=max(1.0, deadline - time.monotonic()),
            timed_out="initdb timed out",
        )
        if code != 0:
            shutil.rmtree(data, ignore_errors=True)
            raise DevEnvError(with_tail(f"initdb failed (exit {code})", log_file))
        # Only TCP from 127.0.0.1, without a password: a dev server, never reachable from afar.
        (data / "pg_hba.conf").write_text(
            "# Written by qtasks_stream.devenv.postgres.DevPostgres.\n"
            f"host all all {HOST}/32 trust\n",
            encoding="utf-8",
        )

    def _argv(self, bin_dir: Path, owner: tuple[int, int] | None) -> list[str]:
        return _as(
            owner,
            [
                str(bin_dir / "postgres"),
                "-D",
                str(self._data_dir),
                "-c",
                f"listen_addresses={HOST}",
                "-c",
                f"port={self._port}",
                "-c",
                "unix_socket_directories=",
                # Small-box settings: few connections, little shared memory.
                "-c",
                "max_connections=50",
                "-c",
                "shared_buffers=64MB",
            ],
        )

    def _ready_check(self) -> Callable[[float], bool]:
        _require_asyncpg()  # fail now with the install hint, not after the whole timeout

        def ready(timeout: float) -> bool:
            try:
                _run_async(self._login(timeout), timeout + 1.0)
            except DevEnvError:
                return False
            return True

        return ready

    async def _login(self, timeout: float) -> None:
        import asyncpg

        try:
            conn = await asyncpg.connect(
                host=HOST, port=self._port, user=_SUPERUSER, database="postgres", timeout=timeout
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            # The server is starting (refused, "starting up"): not ready yet.
            raise DevEnvError(f"no login at {HOST}:{self._port}: {exc}") from exc
        await conn.close()

    async def _create_database(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(
            host=HOST, port=self._port, user=_SUPERUSER, database="postgres", timeout=10
        )
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self._database
            )
            if not exists:
                name = self._database.replace('"', '""')
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()


def _require_asyncpg() -> None:
    # asyncpg is the optional ``postgres`` extra, hence imported where used.
    try:
        import asyncpg  # noqa: F401
    except ImportError as exc:
        raise DevEnvError(
            "the dev PostgreSQL checks logins with asyncpg: pip install 'qtasks-stream[postgres]'"
        ) from exc


def _run_async(coro: Coroutine[Any, Any, None], timeout: float) -> None:
    """Run ``coro`` to completion in a fresh loop on another thread (callers may be async)."""

    def run() -> None:
        asyncio.run(coro)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pool.submit(run).result(timeout=timeout)
        except concurrent.futures.TimeoutError as exc:
            raise DevEnvError(f"PostgreSQL did not answer within {timeout:g}s") from exc


def _bin_dir() -> Path:
    found = shutil.which("initdb")
    if found is not None and shutil.which("postgres") is not None:
        return Path(found).parent
    candidates = sorted(
        (p for p in _PACKAGE_DIRS.glob("*/bin") if (p / "initdb").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise DevEnvError(_INSTALL_HINT)
    return candidates[-1]


def _server_account() -> tuple[int, int] | None:
    """(uid, gid) to run as when this process is root; None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    wanted = os.environ.get(USER_ENV, "")
    for name in [wanted] if wanted else ["postgres", "nobody"]:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            raise DevEnvError(f"{name!r} is root; PostgreSQL must run as an unprivileged user")
        return entry.pw_uid, entry.pw_gid
    raise DevEnvError(
        f"running as root and no unprivileged account to run PostgreSQL as "
        f"(tried {wanted or 'postgres, nobody'}); set {USER_ENV}"
    )


def _as(owner: tuple[int, int] | None, argv: Sequence[str]) -> list[str]:
    if owner is None:
        return list(argv)
    return [sys.executable, "-c", _TRAMPOLINE, str(owner[0]), str(owner[1]), *argv]


def _blocked_folder(folder: Path, uid: int) -> Path | None:
    """The first folder on the way to ``folder`` that ``uid`` (not root) cannot enter."""
    for part in [*reversed(folder.parents), folder]:
        try:
            mode = part.stat()
        except FileNotFoundError:
            return None  # created below by root, with the default (traversable) mode
        if mode.st_uid != uid and not mode.st_mode & stat.S_IXOTH:
            return part
    return None


def _data_folder(home: Path) -> Path:
    """``home/data``; or, when root hands the server to an account that cannot reach into
    ``home`` (a checkout under /root), a folder of this home's own in the system's temp dir."""
    data = home / "data"
    if os.geteuid() != 0:
        return data
    try:
        owner = _server_account()
    except DevEnvError:
        return data  # up() reports it
    if owner is None or _blocked_folder(home.resolve(), owner[0]) is None:
        return data
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"qtasks-devpostgres-{digest}" / "data"


def _check_owner(data: Path, owner: tuple[int, int]) -> None:
    if data.stat().st_uid != owner[0]:
        raise DevEnvError(
            f"{data} belongs to uid {data.stat().st_uid}, not to uid {owner[0]} the server runs "
            "as; wipe it (dev down --wipe) or set " + USER_ENV
        )
