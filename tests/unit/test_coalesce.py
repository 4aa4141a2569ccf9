"""CoalescedSends: concurrent sends on one transactional producer share its transactions."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest

from qtasks_stream.errors import EventLogError
from qtasks_stream.eventlog.base import Consumer, Producer
from qtasks_stream.eventlog.coalesce import CoalescedSends
from qtasks_stream.records import OutRecord, TopicPartition


class _Transactions(Producer):
    """Each send() is one transaction, taking a moment; ``fail`` makes the next one fail."""

    def __init__(self) -> None:
        self.transactions: list[list[bytes | None]] = []
        self.fail = False

    async def send(self, records: Sequence[OutRecord]) -> None:
        await asyncio.sleep(0.01)
        if self.fail:
            self.fail = False
            raise EventLogError("transaction failed, nothing was written")
        self.transactions.append([r.value for r in records])

    async def commit_transaction(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        consumer: Consumer,
    ) -> None:
        raise AssertionError("not used")


def _records(i: int) -> list[OutRecord]:
    return [OutRecord("t", b"k", f"{i}.{n}".encode()) for n in range(2)]


async def test_concurrent_sends_share_transactions_and_keep_each_callers_records_together() -> None:
    producer = _Transactions()
    sends = CoalescedSends(producer)
    await asyncio.gather(*(sends.send(_records(i)) for i in range(20)))
    # All twenty were queued before the flusher ran: one transaction, not twenty.
    assert [len(t) for t in producer.transactions] == [40]
    written = [v for t in producer.transactions for v in t]
    assert written == [v for i in range(20) for v in (f"{i}.0".encode(), f"{i}.1".encode())]


async def test_a_failed_transaction_fails_every_caller_in_it_and_the_next_batch_goes_on() -> None:
    producer = _Transactions()
    sends = CoalescedSends(producer)
    first = asyncio.create_task(sends.send(_records(0)))
    await asyncio.sleep(0)
    producer.fail = True  # the first transaction fails
    later = [asyncio.create_task(sends.send(_records(i))) for i in (1, 2)]
    with pytest.raises(EventLogError):
        await first
    await asyncio.gather(*later)
    assert producer.transactions == [[b"1.0", b"1.1", b"2.0", b"2.1"]]
