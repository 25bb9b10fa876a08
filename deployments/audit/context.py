"""Per-request context for audit events (request id, source IP, user agent, the request itself)."""

import contextvars
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestContext:
    request_id: str = ""
    source_ip: str | None = None
    user_agent: str = ""
    # The request, for handlers that learn of a change only by signal (accounts.py): its user is read
    # when the event is written, after authentication has run.
    request: Any = field(default=None, compare=False, repr=False)


# RequestContext is frozen, so sharing the default instance is safe.
current = contextvars.ContextVar("audit_request_context", default=RequestContext())  # noqa: B039
