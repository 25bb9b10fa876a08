"""Give every HTTP request one id, shared by every audit event it causes."""

import uuid

from .context import RequestContext, current


class RequestIdMiddleware:
    header = "X-Request-ID"

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.request_id = uuid.uuid4().hex
        token = current.set(
            RequestContext(
                request_id=request.request_id,
                source_ip=request.META.get("REMOTE_ADDR") or None,
                user_agent=request.META.get("HTTP_USER_AGENT", "")[:500],
                request=request,
            )
        )
        try:
            response = self.get_response(request)
        finally:
            current.reset(token)
        response[self.header] = request.request_id
        return response
