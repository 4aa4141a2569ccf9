"""The serde contract: a topic's record values to and from plain dicts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from qtasks_stream.errors import SerdeError

__all__ = ["Serde"]


class Serde(ABC):
    """Encodes and decodes the values of the topics it was built for."""

    async def start(self) -> None:
        """Register or fetch schemas; a no-op where nothing needs it."""

    async def close(self) -> None:
        """Release connections; a no-op where there are none."""

    def add_topics(self, topic_schemas: Mapping[str, str]) -> None:
        """Also serve these topics (topic name → schema name) from the next :meth:`start`:
        the lanes of a queue a task names after the app was built."""
        raise SerdeError(f"{type(self).__name__} serves a fixed set of topics")

    @abstractmethod
    def encode(self, topic: str, value: dict[str, Any]) -> bytes:
        """``value`` as the bytes of a record of ``topic``.

        Raises:
            SerdeError: ``value`` does not fit the topic's schema.
        """

    @abstractmethod
    def decode(self, topic: str, data: bytes, *, branch: str | None = None) -> dict[str, Any]:
        """The value of a record of ``topic``.

        ``branch`` is what the record's headers say the value holds: the name, without
        namespace, of the record in its union of records (the ``qtasks.kind`` header of an
        event). A serde may use it to read faster, never trust it: a value of another
        branch decodes exactly as without the hint.

        Raises:
            SerdeError: the bytes are not a valid record of the topic.
        """
