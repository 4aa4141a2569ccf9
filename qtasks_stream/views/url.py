"""A view store from a URL: ``memory://`` or ``sqlite:///relative.db`` /
``sqlite:////absolute/path.db`` (SQLAlchemy's convention)."""

from __future__ import annotations

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.views.base import ViewStore

__all__ = ["open_view"]


def open_view(url: str) -> ViewStore:
    """The (not yet started) view store ``url`` names."""
    if url == "memory://":
        from qtasks_stream.views.memory import MemoryViewStore

        return MemoryViewStore()
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        from qtasks_stream.views.sqlite import SqliteViewStore

        return SqliteViewStore(url[len("sqlite:///") :])
    raise ConfigurationError(f"view URL must be memory:// or sqlite:///path, not {url!r}")
