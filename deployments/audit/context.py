"""Per-request context for audit events (request id, source IP, user agent)."""

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestContext:
    request_id: str = ""
    source_ip: str | None = None
    user_agent: str = ""


# RequestContext is frozen, so sharing the default instance is safe.
current = contextvars.ContextVar("audit_request_context", default=RequestContext())  # noqa: B039
