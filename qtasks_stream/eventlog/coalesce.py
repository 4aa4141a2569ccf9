"""Concurrent sends on one transactional producer, written together.

A transactional producer writes each ``send()`` in a transaction of its own, one after the
other: a few ms each, so 500 concurrent submits would wait in line for seconds. Sends that
arrive while a transaction is being written go together in the next one instead. A batch
commits whole or fails whole: every caller in it gets the error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.base import Producer
from qtasks_stream.records import OutRecord

__all__ = ["CoalescedSends"]


class CoalescedSends:
    """``send()`` on ``producer``, one transaction per batch of concurrent calls."""

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._queued: list[tuple[Sequence[OutRecord], asyncio.Future[None]]] = []
        #: The task writing queued sends, batch after batch; None while nothing is queued.
        self._flusher: asyncio.Task[None] | None = None

    async def send(self, records: Sequence[OutRecord]) -> None:
        """Append ``records`` (with those of concurrent calls) in one transaction."""
        if not records:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queued.append((records, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush(), name="qtasks-coalesced-send")
        await future

    async def _flush(self) -> None:
        batch: list[tuple[Sequence[OutRecord], asyncio.Future[None]]] = []
        try:
            while self._queued:
                # A caller cancelled before its batch started gives up its records.
                batch = [queued for queued in self._queued if not queued[1].done()]
                self._queued = []
                if not batch:
                    continue
                try:
                    await self._producer.send([rec for records, _ in batch for rec in records])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
                batch = []
        finally:
            self._flusher = None
            # Cancelled (the loop is shutting down): no one else would answer these callers.
            for _, future in [*batch, *self._queued]:
                if not future.done():
                    future.set_exception(EventLogError("send abandoned: producer stopped"))
            self._queued = []
