"""What each role of a deployment may do on the cluster, derived from the app's topology.

For app ``shop`` with prefix ``qtasks.`` every topic, consumer group and transactional id
starts with ``qtasks.shop.``, so a role's grants are a few prefixed ACLs that stay right when
lanes are added. The roles (see docs/security.md):

- ``client``: submits tasks and reads their outcome: READ and WRITE on the events topic,
  WRITE on the lanes (a task due now goes to its lane in the submit's transaction),
  WRITE and DESCRIBE on the transactional ids ``<prefix><app>.client.*``,
  DESCRIBE and DESCRIBE_CONFIGS on the app's topics (the start-up check of their settings),
  IDEMPOTENT_WRITE on the cluster, DESCRIBE on the groups
  ``qtasks-unmanaged-*`` (the random group ids of its readers without a group).
- ``worker``: runs the stages: READ and WRITE on every topic of the app, READ on its
  consumer groups, DESCRIBE on ``qtasks-unmanaged-*`` (as the client), WRITE and DESCRIBE
  on its transactional ids (exactly-once), DESCRIBE and DESCRIBE_CONFIGS on its topics,
  IDEMPOTENT_WRITE on the cluster.
- ``app``: both, and CREATE on the app's topics (the first start creates them).
- ``reader``: another team reading the events topic: READ and DESCRIBE on it, READ on the
  consumer groups starting with ``<prefix><app>.reader.`` (or the prefix given). It cannot
  write anywhere, nor read the lanes, the control topic or the dead letters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.kafka_config import UNMANAGED_GROUP_PREFIX
from qtasks_stream.topology import Topology

__all__ = ["ROLES", "Permission", "permissions"]

ROLES: Final = ("app", "worker", "client", "reader")

ResourceKind = Literal["topic", "group", "transactional id", "cluster"]
Pattern = Literal["literal", "prefixed"]


@dataclass(frozen=True, order=True, slots=True)
class Permission:
    """One ALLOW rule: ``operation`` (Kafka's AclOperation name) on a resource."""

    resource: ResourceKind
    name: str
    pattern: Pattern
    operation: str

    def __str__(self) -> str:
        star = "*" if self.pattern == "prefixed" else ""
        where = "the cluster" if self.resource == "cluster" else f"{self.resource} {self.name}"
        return f"{self.operation} on {where}{star}"

    def covers(self, resource: ResourceKind, name: str) -> bool:
        """Whether this rule's resource pattern matches ``name``."""
        if resource != self.resource:
            return False
        return name.startswith(self.name) if self.pattern == "prefixed" else name == self.name


def permissions(
    topology: Topology, role: str, *, reader_groups: str | None = None
) -> list[Permission]:
    """The rules ``role`` needs on ``topology``'s app, sorted; ``reader_groups`` is the
    consumer-group prefix a ``reader`` may use (default ``<prefix><app>.reader.``)."""
    base = f"{topology.base}."
    describe = [_prefixed("topic", base, op) for op in ("DESCRIBE", "DESCRIBE_CONFIGS")]
    idempotent = Permission("cluster", "kafka-cluster", "literal", "IDEMPOTENT_WRITE")
    # The readers without a group (wait, history, the control topic) still look up the
    # coordinator of their random group id.
    unmanaged = _prefixed("group", UNMANAGED_GROUP_PREFIX, "DESCRIBE")
    client = [
        unmanaged,
        _literal("topic", topology.events, "READ"),
        _literal("topic", topology.events, "WRITE"),
        # A task due now goes from the client to its lane, in the submit's transaction.
        _prefixed("topic", f"{base}lane.", "WRITE"),
        _prefixed("topic", f"{base}queue.", "WRITE"),
        _prefixed("transactional id", f"{topology.group('client')}.", "WRITE"),
        _prefixed("transactional id", f"{topology.group('client')}.", "DESCRIBE"),
        *describe,
        idempotent,
    ]
    worker = [
        unmanaged,
        _prefixed("topic", base, "READ"),
        _prefixed("topic", base, "WRITE"),
        *describe,
        _prefixed("group", base, "READ"),
        _prefixed("transactional id", base, "WRITE"),
        _prefixed("transactional id", base, "DESCRIBE"),
        idempotent,
    ]
    if role == "client":
        rules = client
    elif role == "worker":
        rules = worker
    elif role == "app":
        rules = [*worker, *client, _prefixed("topic", base, "CREATE")]
    elif role == "reader":
        rules = [
            _literal("topic", topology.events, "READ"),
            _literal("topic", topology.events, "DESCRIBE"),
            _prefixed("group", reader_groups or f"{base}reader.", "READ"),
        ]
    else:
        raise ConfigurationError(f"unknown role {role!r}; choose from {', '.join(ROLES)}")
    # A rule another prefixed one already covers (the app's events topic, the client's lanes
    # within the worker's topics) is left out.
    return sorted(
        {
            rule
            for rule in rules
            if not any(
                other != rule
                and other.pattern == "prefixed"
                and other.operation == rule.operation
                and other.covers(rule.resource, rule.name)
                for other in rules
            )
        }
    )


def _literal(resource: ResourceKind, name: str, operation: str) -> Permission:
    return Permission(resource, name, "literal", operation)


def _prefixed(resource: ResourceKind, prefix: str, operation: str) -> Permission:
    return Permission(resource, prefix, "prefixed", operation)
