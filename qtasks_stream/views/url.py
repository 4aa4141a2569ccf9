"""``open_view(url)``: a view store named by a URL, for composition roots and tools.

- ``memory://``: :class:`MemoryViewStore` (gone with the process);
- ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (SQLAlchemy's spelling:
  the path is what follows the third slash), ``sqlite://`` or ``sqlite:///:memory:`` for an
  in-memory database: :class:`SqliteViewStore`;
- ``postgresql://user@host:port/database`` (or ``postgres://``), with an optional
  ``?schema=name`` for the schema that holds the tables: :class:`PostgresViewStore`
  (needs the ``postgres`` extra, asyncpg).

The store is returned unstarted: ``await store.start()`` (the app does it) opens it.

``on_log_reset`` says what the app's projector does when the store's positions lie past the
end of the events topic (a reset log, a topic deleted and recreated): ``"refuse"`` (the
default) to start, with a :class:`~qtasks_stream.errors.StaleViewError` naming the view,
the topic and the offsets; ``"rebuild"`` to empty the store and fold the new log.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.views.base import LogReset, ViewStore
from qtasks_stream.views.memory import MemoryViewStore
from qtasks_stream.views.sqlite import SqliteViewStore

__all__ = ["open_view"]


def open_view(url: str, *, on_log_reset: LogReset = "refuse") -> ViewStore:
    """The view store ``url`` names (see the module docstring), not yet started."""
    if on_log_reset not in ("refuse", "rebuild"):
        raise ConfigurationError(
            f"on_log_reset must be 'refuse' or 'rebuild', not {on_log_reset!r}"
        )
    store = _open(url)
    store.on_log_reset = on_log_reset
    return store


def _open(url: str) -> ViewStore:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        if parts.netloc or parts.path or parts.query:
            raise ConfigurationError(f"memory:// takes nothing after the scheme: {url!r}")
        return MemoryViewStore()
    if scheme == "sqlite":
        if parts.netloc or parts.query:
            raise ConfigurationError(
                f"a SQLite view URL is sqlite:///path (no host, no options): {url!r}"
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return SqliteViewStore(path or ":memory:")
    if scheme in ("postgresql", "postgres"):
        options = parse_qsl(parts.query, keep_blank_values=True)
        schemas = [value for key, value in options if key == "schema"]
        rest = [(key, value) for key, value in options if key != "schema"]
        dsn = urlunsplit(parts._replace(query=urlencode(rest)))
        try:
            from qtasks_stream.views.postgres import DEFAULT_SCHEMA, PostgresViewStore
        except ImportError as exc:
            raise ConfigurationError(
                f"a PostgreSQL view needs asyncpg: pip install 'qtasks-stream[postgres]' ({exc})"
            ) from exc
        return PostgresViewStore(dsn, schema=schemas[-1] if schemas else DEFAULT_SCHEMA)
    raise ConfigurationError(
        f"unknown view URL {url!r}: use memory://, sqlite:///path or postgresql://..."
    )
