"""Task storage as materialized views of the event log.

``open_view(url)`` builds a store from ``memory://``, ``sqlite:///path`` or
``postgresql://...``; the classes are in ``memory``, ``sqlite`` and ``postgres`` (the latter
imported on demand: it needs the optional asyncpg).
"""

from qtasks_stream.views.base import Applied, TaskPage, TaskQuery, ViewStore
from qtasks_stream.views.url import open_view

__all__ = ["Applied", "TaskPage", "TaskQuery", "ViewStore", "open_view"]
