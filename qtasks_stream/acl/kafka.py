"""Granting, listing and checking a role's ACLs on a Kafka cluster (confluent-kafka's admin API).

``grant`` and ``list_acls`` need a principal allowed to ALTER / DESCRIBE the cluster (a
super user). ``check_access`` runs as the app's own principal: it asks the cluster which
operations that principal may perform on each topic and consumer group of the app (the
``include_authorized_operations`` of DescribeTopics and DescribeGroups), so a missing ACL is
named at start-up instead of surfacing as a stage failing over and over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection

# Public in confluent_kafka.admin, but missing from its __all__ (as in eventlog.kafka_admin).
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from qtasks_stream.acl.roles import Permission, ResourceKind, permissions
from qtasks_stream.errors import AuthorizationError, ConfigurationError, EventLogError
from qtasks_stream.eventlog.kafka_admin import (
    describe_kafka_error,
    kafka_error_of,
    refusal,
    with_rdkafka_logger,
)
from qtasks_stream.eventlog.kafka_config import KafkaConfig
from qtasks_stream.topology import Topology

__all__ = ["acl_lines", "check_access", "grant", "list_acls"]

_RESOURCE_TYPES: dict[ResourceKind, Any] = {
    "topic": ResourceType.TOPIC,
    "group": ResourceType.GROUP,
    "transactional id": ResourceType.TRANSACTIONAL_ID,
    "cluster": ResourceType.BROKER,  # librdkafka's name for Kafka's CLUSTER resource
}
_KINDS = {value: kind for kind, value in _RESOURCE_TYPES.items()}


def _principal(principal: str) -> str:
    if not principal.startswith("User:") or len(principal) == len("User:"):
        raise ConfigurationError(f"a principal looks like User:NAME, not {principal!r}")
    return principal


def _binding(principal: str, rule: Permission) -> AclBinding:
    return AclBinding(
        _RESOURCE_TYPES[rule.resource],
        rule.name,
        ResourcePatternType.PREFIXED if rule.pattern == "prefixed" else ResourcePatternType.LITERAL,
        principal,
        "*",
        AclOperation[rule.operation],
        AclPermissionType.ALLOW,
    )


def _admin(config: KafkaConfig) -> AdminClient:
    return AdminClient(with_rdkafka_logger(config.to_librdkafka()))


def _timeout(config: KafkaConfig) -> float:
    return config.request_timeout_ms / 1000


def grant(
    config: KafkaConfig,
    topology: Topology,
    principal: str,
    role: str,
    *,
    reader_groups: str | None = None,
) -> list[Permission]:
    """Write the ACLs ``role`` needs for ``principal`` (blocking); returns them.

    Creating an ACL that exists already is a no-op on the broker, so granting twice is safe.
    """
    principal = _principal(principal)
    rules = permissions(topology, role, reader_groups=reader_groups)
    admin = _admin(config)
    futures = admin.create_acls(
        [_binding(principal, rule) for rule in rules], request_timeout=_timeout(config)
    )
    for binding, future in futures.items():
        try:
            future.result(timeout=_timeout(config) * 2)
        except KafkaException as exc:
            raise _admin_error(config, exc, "ALTER", f"cannot grant {binding}") from exc
    return rules


def list_acls(config: KafkaConfig, principal: str | None = None) -> list[str]:
    """Every ALLOW and DENY rule of the cluster (of ``principal`` only, if given), one line
    each: ``User:x ALLOW READ on topic qtasks.shop.events``, ``*`` marking a prefix."""
    admin = _admin(config)
    anything: Any = None  # the stubs want str; None matches any name, principal and host
    query = AclBindingFilter(
        ResourceType.ANY,
        anything,
        ResourcePatternType.ANY,
        _principal(principal) if principal else anything,
        anything,
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    try:
        bindings = admin.describe_acls(query, request_timeout=_timeout(config)).result(
            timeout=_timeout(config) * 2
        )
    except KafkaException as exc:
        raise _admin_error(config, exc, "DESCRIBE", "cannot list the ACLs") from exc
    return acl_lines(bindings)


def acl_lines(bindings: Iterable[Any]) -> list[str]:
    """``bindings`` (confluent-kafka's AclBinding) as ``list_acls`` writes them."""
    lines = []
    for b in bindings:
        kind = _KINDS.get(b.restype, str(b.restype.name).lower())
        star = "*" if b.resource_pattern_type == ResourcePatternType.PREFIXED else ""
        where = "the cluster" if kind == "cluster" else f"{kind} {b.name}{star}"
        lines.append(f"{b.principal} {b.permission_type.name} {b.operation.name} on {where}")
    return sorted(lines)


def _admin_error(
    config: KafkaConfig, exc: KafkaException, operation: str, what: str
) -> EventLogError:
    err = kafka_error_of(exc)
    refused = err and refusal(
        err.code(), describe_kafka_error(exc), principal=config.principal, operation=operation
    )
    return refused or EventLogError(f"{what}: {describe_kafka_error(exc)}")


async def check_access(
    config: KafkaConfig, topology: Topology, role: str, groups: Sequence[str] = ()
) -> None:
    """Raise :class:`AuthorizationError` naming the first operation ``role`` needs that the
    configured principal lacks on a topic of the app or on one of ``groups``.

    Transactional ids and the cluster's IDEMPOTENT_WRITE have no describe call to ask: a
    refusal there is named when the producer starts (see ``eventlog.kafka_admin.refusal``).
    """
    await asyncio.to_thread(_check_access, config, topology, role, list(groups))


#: Tries of the check while the broker answers "try again" (a coordinator still loading
#: on a fresh broker), and the pause between them: 30 tries span about 15 s.
_CHECK_TRIES = 30
_CHECK_PAUSE_S = 0.5


#: Answers of a broker whose group coordinator is not ready (librdkafka may not flag them
#: retriable on an admin result).
_NOT_READY_CODES = frozenset(
    {
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
    }
)


class _NotReady(Exception):
    """The broker cannot answer yet (a retriable error): ask again."""


def _check_access(config: KafkaConfig, topology: Topology, role: str, groups: list[str]) -> None:
    for attempt in range(_CHECK_TRIES):
        try:
            _check_access_once(config, topology, role, groups)
            return
        except _NotReady as exc:
            if attempt == _CHECK_TRIES - 1:
                raise EventLogError(f"{exc} (still after {_CHECK_TRIES} tries)") from exc
            time.sleep(_CHECK_PAUSE_S)


def _check_access_once(
    config: KafkaConfig, topology: Topology, role: str, groups: list[str]
) -> None:
    rules = permissions(topology, role)
    topics = [spec.name for spec in topology.specs()]
    admin = _admin(config)
    timeout = _timeout(config)
    allowed: dict[tuple[ResourceKind, str], set[str]] = {}
    described = admin.describe_topics(
        TopicCollection(topics), include_authorized_operations=True, request_timeout=timeout
    )
    for name, future in described.items():
        operations = _operations(config, future, timeout, "topic", name)
        if operations is not None:
            allowed[("topic", name)] = operations
    if groups:
        described = admin.describe_consumer_groups(
            list(groups), include_authorized_operations=True, request_timeout=timeout
        )
        for name, future in described.items():
            operations = _operations(config, future, timeout, "group", name)
            if operations is not None:
                allowed[("group", name)] = operations
    for (kind, name), operations in sorted(allowed.items()):
        if "ALL" in operations:
            continue
        for rule in rules:
            if rule.covers(kind, name) and rule.operation not in operations:
                raise AuthorizationError.lacks(
                    config.principal,
                    rule.operation,
                    f"{kind} {name}",
                    f"the {role} role needs it: qtasks-stream acl grant --role {role}",
                )


def _operations(
    config: KafkaConfig, future: Any, timeout: float, kind: ResourceKind, name: str
) -> set[str] | None:
    """The operations the principal may perform on the resource; None if it does not exist."""
    try:
        description = future.result(timeout=timeout * 2)
    except KafkaException as exc:
        err = kafka_error_of(exc)
        if err is not None and refusal(err.code(), "", principal=config.principal):
            # Not even DESCRIBE: the caller names the first operation the role needs.
            return set()
        if err is not None and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return None  # nothing to check yet: the app's first start creates it
        if err is not None and (err.retriable() or err.code() in _NOT_READY_CODES):
            raise _NotReady(
                f"cannot describe {kind} {name} yet: {describe_kafka_error(exc)}"
            ) from exc
        raise EventLogError(f"cannot describe {kind} {name}: {describe_kafka_error(exc)}") from exc
    if description.authorized_operations is None:
        return None  # the cluster did not say (no authorizer): nothing to check
    return {op.name for op in description.authorized_operations}
