"""Topic administration shared by both Kafka event logs, on confluent-kafka's AdminClient.

One implementation for both clients keeps "create missing, leave matching, refuse
contradicting" identical whichever client a deployment picks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from confluent_kafka import IsolationLevel, KafkaError, KafkaException
from confluent_kafka import TopicPartition as CkTopicPartition

# These are public in confluent_kafka.admin (its docs import them from there) but missing
# from its __all__, which mypy --strict reads as "not exported".
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    OffsetSpec,
    ResourceType,
)

from qtasks_stream.errors import AuthorizationError, EventLogError, TopicConfigError
from qtasks_stream.eventlog.kafka_config import ConfValue, KafkaConfig
from qtasks_stream.records import TopicPartition, TopicSpec

__all__ = [
    "ListedOffsets",
    "OffsetLister",
    "RdkafkaLog",
    "describe_kafka_error",
    "ensure_topics",
    "is_retriable",
    "kafka_error_of",
    "refusal",
    "retry_retriable",
    "with_rdkafka_logger",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Codes Kafka itself calls retriable (a partition's leadership is moving or not loaded yet,
#: a request lost in transit) that librdkafka hands out as a bare code, so the KafkaError
#: says ``retriable()`` False: ListOffsets' per-partition errors, get_watermark_offsets'
#: exception. A partition created a moment ago answers NOT_LEADER_FOR_PARTITION until its
#: leader has loaded it, although the metadata already names that leader. Unknown topics
#: and partitions are left out: a missing topic must fail at once, not after the timeout.
_RETRIABLE_CODES = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.OFFSET_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.KAFKA_STORAGE_ERROR,
        KafkaError._TRANSPORT,
    }
)
#: First pause before retrying, doubled up to the cap: a new partition's leader is usually
#: ready within a few hundred milliseconds.
_RETRY_BACKOFF = 0.05
_RETRY_BACKOFF_MAX = 0.5
#: The least time one attempt gets, so the last one is not doomed by a sliver of deadline.
_MIN_ATTEMPT_TIMEOUT = 0.5


class RdkafkaLog:
    """Where one librdkafka client's log lines go: the ``qtasks_stream.rdkafka`` logger,
    each line once per :data:`REPEAT_WINDOW_S` at most.

    While a broker is down or restarting, librdkafka repeats the same ``FAIL`` line every
    few milliseconds per connection (hundreds a second with the short backoffs a
    transactional client uses): one line a window, then how many were held back, says the
    same without drowning a process's log. confluent-kafka calls ``log(level, fmt, fac,
    client, text)``; lines differing only in their numbers count as the same.
    """

    REPEAT_WINDOW_S = 10.0

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("qtasks_stream.rdkafka")
        # shape of a line -> (when it was last let through, lines held back since)
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()  # librdkafka may log from its own threads

    def log(self, level: int, msg: str, *args: object) -> None:
        text = msg % args if args else msg
        shape = _DIGITS.sub("#", text)
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(shape, (-self.REPEAT_WINDOW_S, 0))
            if now - last < self.REPEAT_WINDOW_S:
                self._seen[shape] = (last, held + 1)
                return
            if len(self._seen) > _MAX_SHAPES:
                self._seen.clear()
            self._seen[shape] = (now, 0)
        if held:
            text = f"{text} ({held} similar lines in the last {now - last:.0f} s not shown)"
        self._logger.log(level, "%s", text)


_DIGITS = re.compile(r"\d+")
#: Distinct shapes remembered before the memory starts afresh (bounded whatever happens).
_MAX_SHAPES = 1000


def with_rdkafka_logger(conf: dict[str, ConfValue]) -> dict[str, Any]:
    """``conf`` with librdkafka's log lines sent to Python logging instead of stderr.

    confluent-kafka then queues them on the client's main queue: a producer or consumer
    emits them as it polls; an admin client only when ``poll()`` is called (see
    :func:`_admin_client`). Lines logged while the handle is being destroyed are dropped,
    never printed. Repeats are thinned out per client (:class:`RdkafkaLog`).
    """
    return {**conf, "logger": RdkafkaLog()}


#: Kafka protocol error codes of a refusal by the cluster's authorizer (the same numbers in
#: librdkafka's KafkaError and aiokafka's errno), with the kind of resource each is about.
_REFUSED: dict[int, str] = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "topic",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "group",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "cluster",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "transactional id",
}
#: Refused at authentication: the broker's code, and librdkafka's own for a failed SASL
#: exchange (wrong user or password).
_UNAUTHENTICATED = frozenset({KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._AUTHENTICATION})
#: What each resource kind's refusal most likely lacks when the caller does not say.
_DEFAULT_OPERATION = {
    "topic": "access",
    "group": "READ",
    "cluster": "IDEMPOTENT_WRITE",
    "transactional id": "WRITE",
}


def refusal(
    code: int,
    detail: str,
    *,
    principal: str,
    operation: str = "",
    names: Mapping[str, str] | None = None,
) -> AuthorizationError | None:
    """Our error for a refusal by the cluster (an ACL missing, or authentication failed),
    naming the principal, the operation and the resource; None for any other error code.

    ``operation`` and ``names`` say what the caller was doing: ``WRITE``, and the name of
    each kind of resource it used (``{"topic": "qtasks.shop.events"}``); the code says
    which kind was refused.
    """
    if code in _UNAUTHENTICATED:
        return AuthorizationError.lacks(
            principal,
            "AUTHENTICATE",
            "the cluster",
            f"authentication failed: check the user name and password; {detail}",
        )
    kind = _REFUSED.get(code)
    if kind is None:
        return None
    name = (names or {}).get(kind)
    resource = f"{kind} {name}" if name else kind
    # A producer refused on the cluster lacks IDEMPOTENT_WRITE, not its WRITE; a group is
    # always READ (offsets committed, or read, by any client).
    if kind in ("cluster", "group") or not operation:
        operation = _DEFAULT_OPERATION[kind]
    return AuthorizationError.lacks(principal, operation, resource, f"refused: {detail}")


def is_retriable(exc: BaseException) -> bool:
    """Whether the librdkafka error inside ``exc`` may go away when the call is repeated."""
    err = kafka_error_of(exc)
    return err is not None and (err.retriable() or err.code() in _RETRIABLE_CODES)


def retry_retriable(call: Callable[[float], _T], timeout: float, what: str) -> _T:
    """``call(seconds left)``, repeated after a short backoff while it raises a retriable
    KafkaException, for up to about ``timeout`` seconds; then its last exception (blocking).
    """
    deadline = time.monotonic() + timeout
    backoff = _RETRY_BACKOFF
    while True:
        try:
            return call(max(deadline - time.monotonic(), _MIN_ATTEMPT_TIMEOUT))
        except KafkaException as exc:
            if not is_retriable(exc) or time.monotonic() + backoff >= deadline:
                raise
            log.debug("%s: %s; retrying in %.2fs", what, describe_kafka_error(exc), backoff)
        time.sleep(backoff)
        backoff = min(backoff * 2, _RETRY_BACKOFF_MAX)


def kafka_error_of(exc: BaseException) -> KafkaError | None:
    """The :class:`KafkaError` inside a ``KafkaException`` (or None)."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def describe_kafka_error(exc: BaseException) -> str:
    """``NAME (code): reason``, so the librdkafka error code survives the mapping."""
    err = kafka_error_of(exc)
    if err is None:
        return str(exc)
    return f"{err.name()} ({err.code()}): {err.str()}"


async def ensure_topics(config: KafkaConfig, specs: Sequence[TopicSpec]) -> None:
    """Create missing topics; leave matching ones alone; raise :class:`TopicConfigError`
    naming the topic and the difference for one that exists with other partitions or
    configs."""
    wanted = _dedupe(specs)
    if wanted:
        # AdminClient calls block; a worker thread keeps the event loop free.
        await asyncio.to_thread(_ensure_topics, config, wanted)


def _dedupe(specs: Iterable[TopicSpec]) -> list[TopicSpec]:
    by_name: dict[str, TopicSpec] = {}
    for spec in specs:
        seen = by_name.setdefault(spec.name, spec)
        if seen != spec:
            raise TopicConfigError(
                f"topic {spec.name!r} is asked for twice, differently: {seen} and {spec}"
            )
    return list(by_name.values())


def _ensure_topics(config: KafkaConfig, specs: list[TopicSpec]) -> None:
    errors: list[KafkaError] = []
    conf = {**with_rdkafka_logger(config.to_librdkafka()), "error_cb": errors.append}
    admin = AdminClient(conf)
    try:
        _ensure_with(admin, config.request_timeout_ms / 1000, specs, config.principal)
    except EventLogError as exc:
        admin.poll(0)  # runs error_cb for what the connections met meanwhile
        raise _unreachable(config, errors) or exc from exc
    finally:
        admin.poll(0)


def _unreachable(config: KafkaConfig, errors: list[KafkaError]) -> EventLogError | None:
    """Why the cluster could not be reached, when the client's errors say (the admin call
    itself reports only a timeout): authentication refused, TLS failed, or no answer to a
    plaintext client. This is the first call of every app, so its error is the one users see.
    """
    for err in errors:
        refused = refusal(err.code(), err.str(), principal=config.principal)
        if refused is not None:
            return refused
    for err in errors:
        if err.code() == KafkaError._SSL:
            return EventLogError(
                f"the TLS handshake with {config.bootstrap_servers} failed: check "
                f"QTASKS_SSL_CAFILE (the CA that signed the brokers' certificates; now "
                f"{config.ssl_cafile!r}): {err.str()}"
            )
    if config.security_protocol == "PLAINTEXT" and any(
        err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT) for err in errors
    ):
        return EventLogError(
            f"no broker at {config.bootstrap_servers} answered a PLAINTEXT client: it is down, "
            "or its listener wants TLS or SASL (set QTASKS_SECURITY_PROTOCOL, e.g. SASL_SSL)"
        )
    return None


def _ensure_with(
    admin: AdminClient, timeout: float, specs: list[TopicSpec], principal: str
) -> None:
    existing = _partition_counts(admin, [s.name for s in specs], timeout)
    missing = [s for s in specs if s.name not in existing]
    to_check = [s for s in specs if s.name in existing]
    created: list[TopicSpec] = []
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    s.name,
                    num_partitions=s.partitions,
                    replication_factor=s.replication,
                    config=dict(s.config),
                )
                for s in missing
            ],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for spec in missing:
            try:
                futures[spec.name].result(timeout=timeout * 2)
            except KafkaException as exc:
                err = kafka_error_of(exc)
                if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    to_check.append(spec)  # created concurrently by someone else: check it
                    continue
                refused = err and refusal(
                    err.code(),
                    describe_kafka_error(exc),
                    principal=principal,
                    operation="CREATE",
                    names={"topic": spec.name},
                )
                if refused:
                    raise refused from exc
                raise EventLogError(
                    f"cannot create topic {spec.name!r}: {describe_kafka_error(exc)}"
                ) from exc
            created.append(spec)
    if to_check:
        _check_existing(admin, to_check, timeout)
    if created:
        _wait_visible(admin, created, timeout)


def _partition_counts(admin: AdminClient, names: list[str], timeout: float) -> dict[str, int]:
    """Partition counts of those of ``names`` that exist."""
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise EventLogError(f"cannot list topics: {describe_kafka_error(exc)}") from exc
    counts: dict[str, int] = {}
    for name in names:
        topic = metadata.topics.get(name)
        if topic is not None and topic.error is None:
            counts[name] = len(topic.partitions)
    return counts


def _check_existing(admin: AdminClient, specs: list[TopicSpec], timeout: float) -> None:
    counts = _partition_counts(admin, [s.name for s in specs], timeout)
    resources = {s.name: ConfigResource(ResourceType.TOPIC, s.name) for s in specs if s.config}
    # describe_configs refuses an empty list (ValueError): topics without settings to check.
    described = (
        admin.describe_configs(list(resources.values()), request_timeout=timeout)
        if resources
        else {}
    )
    for spec in specs:
        problems: list[str] = []
        partitions = counts.get(spec.name)
        if partitions is not None and partitions != spec.partitions:
            problems.append(f"{partitions} partitions instead of {spec.partitions}")
        if spec.name in resources:
            try:
                entries = described[resources[spec.name]].result(timeout=timeout * 2)
            except KafkaException as exc:
                raise EventLogError(
                    f"cannot describe topic {spec.name!r}: {describe_kafka_error(exc)}"
                ) from exc
            for key, want in sorted(spec.config.items()):
                entry = entries.get(key)
                have = None if entry is None else entry.value
                if have != want:
                    problems.append(f"{key}={have!r} instead of {want!r}")
        if problems:
            raise TopicConfigError(
                f"topic {spec.name!r} exists with {'; '.join(problems)}: change the topic "
                "or the application's topic settings"
            )


def _wait_visible(admin: AdminClient, specs: list[TopicSpec], timeout: float) -> None:
    """Wait until every partition of the new topics has a leader.

    CreateTopics returns once the controller has the topic; the brokers learn it a moment
    later, and a client producing in that moment would see an unknown topic.
    """
    deadline = time.monotonic() + timeout
    pending = {s.name: s.partitions for s in specs}
    while pending:
        try:
            metadata = admin.list_topics(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException:
            metadata = None
        if metadata is not None:
            for name, count in list(pending.items()):
                topic = metadata.topics.get(name)
                if (
                    topic is not None
                    and topic.error is None
                    and len(topic.partitions) == count
                    and all(p.leader >= 0 for p in topic.partitions.values())
                ):
                    del pending[name]
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise EventLogError(f"topics {sorted(pending)} were created but have no leader yet")
        time.sleep(0.05)


class OffsetLister:
    """An event log's one admin client for listing offsets, made at first use and closed
    with the log. A client per call paid a connection and a teardown every time (15-50 ms
    idle, and now and then a second or more under load), twice per history read.

    Offsets are the high watermark, not the last stable offset a read_committed consumer
    reports: a reader that stops there misses records committed behind a transaction that
    is still open (say, one a killed producer left until its timeout). Reading up to the
    high watermark read_committed waits for such transactions to end, then skips what they
    aborted.
    """

    def __init__(self, config: KafkaConfig) -> None:
        self._config = config
        self.timeout = config.request_timeout_ms / 1000
        self._lock = threading.Lock()  # made and closed from worker threads
        self._admin: AdminClient | None = None

    def _client(self) -> AdminClient:
        with self._lock:
            if self._admin is None:
                self._admin = AdminClient(with_rdkafka_logger(self._config.to_librdkafka()))
            return self._admin

    def close(self) -> None:
        with self._lock:
            admin, self._admin = self._admin, None
        if admin is not None:
            admin.poll(0)  # its queued log lines reach the logger only when polled

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The high watermark of each partition: where its next record will go."""
        if not tps:
            return {}
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        return await asyncio.to_thread(self._list, list(tps), latest)

    async def offsets_for_time(
        self, tps: Sequence[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int]:
        """Per partition, the first offset whose timestamp is at or after ``timestamp_ms``,
        or the high watermark where there is none."""
        if not tps:
            return {}
        spec = OffsetSpec.for_timestamp(timestamp_ms)
        found = await asyncio.to_thread(self._list, list(tps), spec)
        missing = [tp for tp, offset in found.items() if offset < 0]  # -1: no such record
        if missing:
            found.update(await self.end_offsets(missing))
        return found

    def _list(self, tps: list[TopicPartition], spec: OffsetSpec) -> dict[TopicPartition, int]:
        request = {CkTopicPartition(tp.topic, tp.partition): spec for tp in tps}
        admin = self._client()

        def attempt(seconds: float) -> dict[TopicPartition, int]:
            futures = admin.list_offsets(
                request,
                isolation_level=IsolationLevel.READ_UNCOMMITTED,
                request_timeout=seconds,
            )
            # A little longer than the request, so librdkafka's own timeout error is the one
            # that surfaces (a KafkaException), not the future's.
            return {
                TopicPartition(ck_tp.topic, ck_tp.partition): future.result(seconds + 1).offset
                for ck_tp, future in futures.items()
            }

        try:
            return retry_retriable(attempt, self.timeout, "listing offsets")
        except KafkaException as exc:
            raise EventLogError(f"cannot list offsets: {describe_kafka_error(exc)}") from exc


class ListedOffsets:
    """A Kafka consumer's ``end_offsets`` and ``offsets_for_time``, answered by its event
    log's one :class:`OffsetLister` (both Kafka event logs' consumers mix this in)."""

    #: Set by the event log that builds the consumer.
    offsets: OffsetLister | None = None

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        assert self.offsets is not None, "set by the event log that built the consumer"
        return await self.offsets.end_offsets(tps)

    async def offsets_for_time(
        self, tps: Sequence[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int]:
        assert self.offsets is not None, "set by the event log that built the consumer"
        return await self.offsets.offsets_for_time(tps, timestamp_ms)
