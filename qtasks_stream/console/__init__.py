"""The console: pages and an HTTP API to look at any task's life and act on it
(``qtasks-stream console``; ``pip install 'qtasks-stream[console]'``)."""

from __future__ import annotations

from qtasks_stream.console.settings import ConsoleSettings

__all__ = ["ConsoleSettings"]
