"""open_view: the URL forms of the view stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.views import open_view
from qtasks_stream.views.memory import MemoryViewStore
from qtasks_stream.views.postgres import PostgresViewStore
from qtasks_stream.views.sqlite import SqliteViewStore


def test_memory() -> None:
    assert isinstance(open_view("memory://"), MemoryViewStore)
    with pytest.raises(ConfigurationError, match="memory"):
        open_view("memory://somewhere")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///view.db", "view.db"),
        ("sqlite:///sub/view.db", "sub/view.db"),
        ("sqlite:////tmp/x/view.db", "/tmp/x/view.db"),
        ("sqlite://", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_paths(url: str, path: str) -> None:
    store = open_view(url)
    assert isinstance(store, SqliteViewStore)
    assert store._path == path


async def test_sqlite_opens_the_named_file(tmp_path: Path) -> None:
    store = open_view(f"sqlite:///{tmp_path}/v.db")
    await store.start()
    await store.close()
    assert (tmp_path / "v.db").is_file()


def test_postgres_schema_option_is_taken_out_of_the_dsn() -> None:
    store = open_view("postgresql://u@127.0.0.1:15432/db?schema=team_a&sslmode=disable")
    assert isinstance(store, PostgresViewStore)
    assert store.schema == "team_a"
    assert store._dsn == "postgresql://u@127.0.0.1:15432/db?sslmode=disable"
    plain = open_view("postgres://u@127.0.0.1/db")
    assert isinstance(plain, PostgresViewStore) and plain.schema == "qtasks_view"
    with pytest.raises(ConfigurationError, match="schema"):
        open_view("postgresql://u@127.0.0.1/db?schema=Bad-Name")


@pytest.mark.parametrize("url", ["mysql://x/y", "view.db", "sqlite://host/view.db", ""])
def test_unknown_or_malformed(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_view(url)


def test_the_cli_moving_an_app_keeps_the_view_its_module_chose(tmp_path: Path) -> None:
    from qtasks_stream import QueueTasks
    from qtasks_stream.settings import Settings

    view = open_view(f"sqlite:///{tmp_path}/shop.db")
    app = QueueTasks("shop", view=view).configure(
        Settings.from_env({"QTASKS_TOPIC_PREFIX": "team."})
    )
    assert app.topology.events == "team.shop.events"
    assert app.view is view


def test_on_log_reset_is_carried_by_the_store_and_checked() -> None:
    assert open_view("memory://").on_log_reset == "refuse"
    assert open_view("sqlite://", on_log_reset="rebuild").on_log_reset == "rebuild"
    with pytest.raises(ConfigurationError, match="on_log_reset must be 'refuse' or 'rebuild'"):
        open_view("memory://", on_log_reset="drop")  # type: ignore[arg-type]
