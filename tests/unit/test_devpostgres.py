"""DevPostgres: a second server of its own (a free port, a tmp home), up, status, down, wipe.

It needs the machine's PostgreSQL programs, as the test command's server does; it runs
where that server runs (``QTASKS_TEST_POSTGRES_DSN`` set) and is skipped elsewhere.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from qtasks_stream.devenv.postgres import DevPostgres
from qtasks_stream.devenv.process import port_in_use
from qtasks_stream.errors import DevEnvError

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    # Not an OS-chosen port: those are ephemeral, and any outgoing connection may take one
    # before the server binds it.
    for port in range(15433, 15500):
        if not port_in_use(port):
            return port
    raise AssertionError("no free port in 15433..15499")


@pytest.fixture
def home() -> Iterator[Path]:
    # pytest's tmp_path sits under a folder only root may enter; the server may run as an
    # unprivileged account (when the tests run as root), which must reach its data folder.
    with tempfile.TemporaryDirectory(prefix="qtasks-devpg-") as folder:
        os.chmod(folder, 0o755)
        yield Path(folder)


def test_a_home_the_server_account_cannot_enter_moves_the_data_to_tmp(
    postgres_dsn: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the server to another account")
    dev = DevPostgres(tmp_path / "pg", port=_free_port(), log=lambda _: None)
    try:
        dev.up()
        assert dev.status().running
        assert not (tmp_path / "pg" / "data").exists()
        assert (tmp_path / "pg" / "logs" / "postgres.out").is_file()
        moved = [p for p in Path(tempfile.gettempdir()).glob("qtasks-devpostgres-*/data")]
        assert any((p / "PG_VERSION").is_file() for p in moved)
    finally:
        dev.down(wipe=True)
    assert not dev.status().running


async def test_up_status_down_wipe(postgres_dsn: str, home: Path) -> None:
    tmp_path = home
    dev = DevPostgres(tmp_path / "pg", port=_free_port(), database="qtasks_dev", log=lambda _: None)
    assert not dev.status().running
    try:
        dsn = dev.up()
        assert dsn == f"postgresql://qtasks@127.0.0.1:{dev.port}/qtasks_dev"
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT current_database()") == "qtasks_dev"
            # Only TCP on loopback: no Unix socket is configured.
            assert await conn.fetchval("SHOW unix_socket_directories") == ""
            assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        finally:
            await conn.close()
        status = dev.status()
        assert status.running and status.pid is not None
        assert dev.up() == dsn  # already running: the same server
        assert dev.status().pid == status.pid

        # The port is taken now: a second home on it refuses to start.
        other = DevPostgres(tmp_path / "other", port=dev.port, log=lambda _: None)
        with pytest.raises(DevEnvError, match="already in use"):
            other.up()
    finally:
        dev.down(wipe=True)
    assert not dev.status().running
    assert not (tmp_path / "pg" / "data").exists()
