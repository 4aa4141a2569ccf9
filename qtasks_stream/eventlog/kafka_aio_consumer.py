"""The aiokafka consumer: membership, heartbeats and fetching in aiokafka's own tasks.

A member keeps up with rebalances while the stage is busy between polls; the rebalance
listener is called from those tasks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import TopicPartition as AioTopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import IllegalStateError, KafkaError

from qtasks_stream.errors import EventLogError, FencedError
from qtasks_stream.eventlog.base import Consumer, RebalanceListener, StartFrom
from qtasks_stream.eventlog.kafka_admin import ListedOffsets
from qtasks_stream.eventlog.kafka_aio_convert import (
    aio_tp,
    headers_of,
    map_error,
    our_tp,
    parameters,
)
from qtasks_stream.eventlog.kafka_common import NO_GROUP, check_owned
from qtasks_stream.records import Record, TopicPartition, record_at

__all__ = ["AioConsumer"]

log = logging.getLogger(__name__)

#: Extra time a poll may overrun its timeout while a rebalance settles, before giving up.
_POLL_GRACE = 5.0
_CLIENT_PARAMS = parameters(AIOKafkaClient)


async def _existing_partitions(
    kwargs: Mapping[str, Any], topics: Sequence[str]
) -> dict[str, set[int]]:
    """The partitions of ``topics``; EventLogError naming a topic that does not exist.

    Asked with a short-lived client before the consumer exists: a subscribing consumer's
    own metadata requests would make the broker auto-create a missing topic.
    """
    client = AIOKafkaClient(**{k: v for k, v in kwargs.items() if k in _CLIENT_PARAMS})
    try:
        await client.bootstrap()
        cluster = await client.fetch_all_metadata()
    except KafkaError as exc:
        raise map_error(exc, "cannot read the cluster's topics") from exc
    finally:
        await client.close()
    found = {topic: set(cluster.partitions_for_topic(topic) or ()) for topic in topics}
    missing = sorted(topic for topic, parts in found.items() if not parts)
    if missing:
        raise EventLogError(f"unknown topics {missing}: create them first")
    return found


class _AioRebalanceAdapter(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka's listener interface, forwarding to the consumer (which calls ours)."""

    def __init__(self, owner: AioConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._owner.partitions_revoked({our_tp(tp) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._owner.partitions_assigned({our_tp(tp) for tp in assigned})


class AioConsumer(ListedOffsets, Consumer):
    def __init__(
        self,
        kwargs: dict[str, Any],
        topics: tuple[str, ...],
        group_id: str | None,
        listener: RebalanceListener | None,
        start: StartFrom,
        start_timeout: float,
    ) -> None:
        self._kwargs = kwargs
        self._topics = topics
        self._group_id = group_id
        self._listener = listener
        self._start = start
        self._start_timeout = start_timeout
        self._consumer: Any = None
        self._start_lock = asyncio.Lock()
        self._first_assignment: asyncio.Future[None] | None = None
        self._paused: set[TopicPartition] = set()
        #: The first exception a listener raised in the background, for the next poll.
        self._listener_error: BaseException | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._consumer is not None:
            # Also while the first start() waits for its assignment: a listener called from
            # that assignment may use the consumer (commit, committed, seek...).
            return
        async with self._start_lock:
            if self._consumer is not None:
                return
            if self._closed:
                raise EventLogError("start on a closed consumer")
            partitions = await _existing_partitions(self._kwargs, self._topics)
            consumer = AIOKafkaConsumer(**self._kwargs)
            try:
                await consumer.start()
            except BaseException as exc:
                await consumer.stop()
                if isinstance(exc, KafkaError):
                    raise self._start_error(exc) from exc
                raise
            self._consumer = consumer
            try:
                if self._group_id is None:
                    await self._assign_everything(consumer, partitions)
                else:
                    # Subscribed only now, so the consumer is fully usable by the listener
                    # that the first assignment calls; then wait for that assignment, so a
                    # started member already owns its partitions.
                    first = self._first_assignment = asyncio.get_running_loop().create_future()
                    consumer.subscribe(list(self._topics), listener=_AioRebalanceAdapter(self))
                    async with asyncio.timeout(self._start_timeout):  # not wait_for: see poll
                        await asyncio.shield(first)
            except BaseException as exc:
                await self.close()
                if isinstance(exc, TimeoutError):
                    raise EventLogError(
                        f"group {self._group_id!r} gave no assignment within "
                        f"{self._start_timeout:.0f}s"
                    ) from exc
                if isinstance(exc, KafkaError):
                    raise self._start_error(exc) from exc
                raise

    def _start_error(self, exc: KafkaError) -> Exception:
        """What a Kafka error met while starting says, mapped (a refusal names the ACL)."""
        return map_error(
            exc,
            f"cannot start a consumer of {self._topics}",
            conf=self._kwargs,
            operation="READ",
            names={"topic": ", ".join(self._topics), "group": self._group_id or ""},
        )

    async def _assign_everything(self, consumer: Any, partitions: dict[str, set[int]]) -> None:
        tps = [
            AioTopicPartition(topic, p) for topic in self._topics for p in sorted(partitions[topic])
        ]
        consumer.assign(tps)
        if self._start == "latest":
            # Resolve "latest" now, not at the first fetch, so a record appended after
            # start() is read.
            for tp, offset in (await consumer.end_offsets(tps)).items():
                consumer.seek(tp, offset)
        else:
            await consumer.seek_to_beginning(*tps)

    async def close(self) -> None:
        """Leave the group without committing; the listener is not called (as in aiokafka)."""
        if self._closed:
            return
        self._closed = True
        if self._consumer is not None:
            await self._consumer.stop()

    # -- rebalance (called from aiokafka's coordinator task) -----------------------------

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked and self._listener is not None and not self._closed:
            await self._call_listener(self._listener.on_revoked, revoked)

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # aiokafka forgets pauses with the old assignment; keep those still assigned.
        self._paused &= assigned
        if self._paused and self._consumer is not None:
            self._consumer.pause(*(aio_tp(tp) for tp in self._paused))
        if assigned and self._listener is not None and not self._closed:
            await self._call_listener(self._listener.on_assigned, assigned)
        if self._first_assignment is not None and not self._first_assignment.done():
            self._first_assignment.set_result(None)

    async def _call_listener(self, method: Any, partitions: set[TopicPartition]) -> None:
        try:
            await method(sorted(partitions))
        except Exception as exc:
            # aiokafka would only log it; keep it for the stage's next poll instead.
            log.warning("rebalance listener %r failed: %r", method, exc)
            if self._listener_error is None:
                self._listener_error = exc

    # -- reading ----------------------------------------------------------------------------

    async def poll(self, *, max_records: int, timeout: float) -> list[Record]:
        if self._closed:
            raise EventLogError("poll on a closed consumer")
        await self.start()
        if self._listener_error is not None:
            error, self._listener_error = self._listener_error, None
            raise error
        fetch = asyncio.ensure_future(
            self._consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_records)
        )
        # getmany waits, without a timeout, for a rebalance in progress to finish; bound it.
        done, _ = await asyncio.wait({fetch}, timeout=timeout + _POLL_GRACE)
        if not done:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
            return []
        try:
            batches = fetch.result()
        except KafkaError as exc:
            raise map_error(
                exc,
                "poll failed",
                conf=self._kwargs,
                operation="READ",
                names={"topic": ", ".join(self._topics), "group": self._group_id or ""},
            ) from exc
        records: list[Record] = []
        for atp, messages in batches.items():
            tp = TopicPartition(atp.topic, atp.partition)
            records.extend(
                [
                    record_at(tp, m.offset, m.key, m.value, headers_of(m.headers), m.timestamp)
                    for m in messages
                ]
            )
        return records

    def _require_started(self) -> Any:
        if self._consumer is None or self._closed:
            raise EventLogError("the consumer is not started (or closed)")
        return self._consumer

    async def position(self, tp: TopicPartition) -> int | None:
        consumer = self._require_started()
        try:
            # aiokafka advances it as getmany hands records out, and past control batches.
            return int(await consumer.position(aio_tp(tp)))
        except IllegalStateError:
            return None
        except KafkaError as exc:
            raise map_error(exc, f"cannot read the position of {tp}") from exc

    def seek(self, tp: TopicPartition, offset: int) -> None:
        consumer = self._require_started()
        try:
            consumer.seek(aio_tp(tp), offset)
        except IllegalStateError as exc:
            raise EventLogError(f"cannot seek {tp}: not assigned to this consumer") from exc

    def pause(self, tps: Sequence[TopicPartition], paused: bool) -> None:
        consumer = self._require_started()
        assigned = {our_tp(tp) for tp in consumer.assignment()}
        if paused:
            chosen = [tp for tp in tps if tp in assigned]
            self._paused.update(chosen)
            consumer.pause(*(aio_tp(tp) for tp in chosen))
        else:
            self._paused.difference_update(tps)
            consumer.resume(*(aio_tp(tp) for tp in tps if tp in assigned))

    # -- committing -----------------------------------------------------------------------

    def check_owned(self, offsets: Mapping[TopicPartition, int]) -> str:
        """The group id, if this member may commit ``offsets``; else FencedError."""
        assigned: set[TopicPartition] = set()
        if self._group_id is not None:
            assigned = {our_tp(tp) for tp in self._require_started().assignment()}
        return check_owned(self._group_id, assigned, offsets)

    async def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        if self._group_id is None or not tps:
            return {}
        await self.start()
        try:
            found = await asyncio.gather(*(self._consumer.committed(aio_tp(tp)) for tp in tps))
        except KafkaError as exc:
            raise map_error(exc, f"cannot read the offsets of group {self._group_id!r}") from exc
        return {tp: offset for tp, offset in zip(tps, found, strict=True) if offset is not None}

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if not offsets:
            return
        if self._group_id is None:
            raise EventLogError(NO_GROUP)
        await self.start()
        try:
            await self._consumer.commit({aio_tp(tp): offset for tp, offset in offsets.items()})
        except IllegalStateError as exc:
            raise FencedError(
                f"cannot commit {dict(offsets)}: not assigned to this member of group "
                f"{self._group_id!r} any more"
            ) from exc
        except KafkaError as exc:
            raise map_error(exc, f"commit to group {self._group_id!r} failed") from exc
