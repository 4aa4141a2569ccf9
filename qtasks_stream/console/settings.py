"""What the console is told: where to listen, the token, what reads need, the trace link."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import quote

from qtasks_stream.errors import ConfigurationError

__all__ = ["DEFAULT_MAX_BODY", "ConsoleSettings"]

#: Largest request body the API reads (1 MiB); a longer one is refused with 413.
DEFAULT_MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """The console's settings (the CLI builds them; ``QTASKS_CONSOLE_TOKEN`` gives the token).

    Args:
        token: the bearer token every write needs, and every read unless ``public_reads``.
        public_reads: pages and read endpoints answer without the token.
        trace_url: a link to a task's trace, ``{trace_id}`` replaced (e.g. a Jaeger address).
        max_body: the largest request body read, in bytes.
        live_interval: seconds between two looks at the view for live updates.
        allowed_hosts: the only ``Host`` headers answered (None: any). A console on the
            loopback answers only its loopback names, so a web page whose name an attacker
            points at 127.0.0.1 (DNS rebinding) cannot read it.
    """

    token: str
    public_reads: bool = False
    trace_url: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    live_interval: float = 1.0
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise ConfigurationError("the console token must be at least 16 characters")
        if self.trace_url is not None and (
            "{trace_id}" not in self.trace_url
            or not self.trace_url.startswith(("http://", "https://"))
        ):
            raise ConfigurationError(
                f"the trace URL must be http(s) with a {{trace_id}} placeholder, "
                f"not {self.trace_url!r}"
            )
        if self.max_body < 1:
            raise ConfigurationError(f"max_body must be >= 1, not {self.max_body}")
        if not self.live_interval > 0:
            raise ConfigurationError(f"live_interval must be > 0, not {self.live_interval}")

    def token_matches(self, given: str | None) -> bool:
        # compare_digest: the time taken does not tell how much of a guess was right.
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    @property
    def csrf_token(self) -> str:
        """The value every form carries: derived from the token, so only a page served to
        someone holding the token can know it."""
        return hmac.new(self.token.encode(), b"qtasks-console-csrf", hashlib.sha256).hexdigest()

    def trace_link(self, trace_id: str | None) -> str | None:
        if self.trace_url is None or not trace_id:
            return None
        return self.trace_url.replace("{trace_id}", quote(trace_id, safe=""))
