"""Kafka ACLs derived from an app's topology: what each role needs, granting it, checking it.

``roles`` holds the contract (the permissions of each role, as data: no Kafka client);
``kafka`` grants and lists them through confluent-kafka's admin API and checks, when an app
starts on a secured cluster, that its principal has what its stages need.
"""

from qtasks_stream.acl.roles import ROLES, Permission, permissions

__all__ = ["ROLES", "Permission", "permissions"]
