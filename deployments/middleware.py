"""Response hardening that applies to every page and API answer alike.

- ``NoStoreMiddleware``: pages, API answers and log downloads hold what only the signed-in user
  may see, so no browser or proxy cache keeps them (``Cache-Control: no-store``).  Static files are
  answered by whitenoise before this runs and stay cacheable.
- ``ApiErrorMiddleware``: every 4xx under the API's prefix has a JSON body, including those Django
  answers before a view runs (an unknown URL, a wrong method, a body too large to read).
  (A CSRF refusal is JSON there too: ``settings.CSRF_FAILURE_VIEW`` is ``views.api.csrf_failure``.)
"""

from __future__ import annotations

from django.http import HttpResponse
from django.utils.cache import add_never_cache_headers

from .views.api import API_PREFIX, error_response


class NoStoreMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        # Also "no-cache, must-revalidate, private" and an Expires in the past, for old caches.
        add_never_cache_headers(response)
        return response


def _is_json(response: HttpResponse) -> bool:
    return response.get("Content-Type", "").split(";")[0].strip() == "application/json"


class ApiErrorMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if (
            request.path_info.startswith(API_PREFIX)
            and 400 <= response.status_code < 500
            and not getattr(response, "streaming", False)
            and not _is_json(response)
        ):
            json_response = error_response(response.status_code, response.reason_phrase.lower())
            for header in ("Allow", "X-Request-ID"):
                if header in response:
                    json_response[header] = response[header]
            return json_response
        return response
