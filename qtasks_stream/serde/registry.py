"""A schema registry's refusal of our credentials, said plainly.

confluent-kafka's ``SchemaRegistryClient`` raises ``SchemaRegistryError`` with the HTTP status
and the body's message; a 401 from a registry behind basic auth has no body, so its text is
"Unknown Schema Registry Error: b''". :func:`raise_if_refused` turns a 401 or 403 into a
:class:`RegistryRefusedError` naming the registry's URL (without any userinfo), the user (or
"an anonymous client") and what to set, never the password.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from qtasks_stream.errors import RegistryRefusedError

__all__ = ["raise_if_refused"]

_AUTH_HINT = (
    "set QTASKS_SCHEMA_REGISTRY_AUTH_FILE (or QTASKS_SCHEMA_REGISTRY_AUTH) to user:password"
)
_WHY = {
    401: ("401 Unauthorized", f"wrong user name or password; {_AUTH_HINT}"),
    403: (
        "403 Forbidden",
        "the user's role does not allow it (a read-only user cannot register schemas or set "
        "compatibility); use a user whose role does",
    ),
}


def raise_if_refused(registry: SchemaRegistryClient, exc: SchemaRegistryError, doing: str) -> None:
    """Raise a :class:`RegistryRefusedError` from ``exc`` if it is a 401 or 403.

    A refusal is about who we are, not about the schema or the record. ``doing`` says what
    was refused ("registering the schema of subject 'x-value'").
    """
    why = _WHY.get(exc.http_status_code)
    if why is None:
        return
    url, user = _who(registry)
    status, advice = why
    who = f"user {user!r}" if user else "an anonymous client (no credentials)"
    if not user and exc.http_status_code == 401:
        advice = f"the registry requires a login; {_AUTH_HINT}"
    raise RegistryRefusedError(
        f"schema registry at {url} refused {who}: {status} ({doing}): {advice}",
        url=url,
        user=user,
        status=exc.http_status_code,
    ) from exc


def _who(registry: SchemaRegistryClient) -> tuple[str, str]:
    """The registry's URL without userinfo, and the user name the client sends ("" if none).

    Read from the client's REST client, which confluent-kafka keeps private; a client without
    it (another implementation) is described as "the configured URL".
    """
    rest = getattr(registry, "_rest_client", None)
    urls = getattr(rest, "base_urls", None) or []
    auth = getattr(rest, "auth", None)
    user = str(auth[0]) if isinstance(auth, tuple) and auth and auth[0] else ""
    url = ", ".join(_without_userinfo(str(u)) for u in urls) or "the configured URL"
    return url, user


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))
