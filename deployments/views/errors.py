"""The 400 page: the reason a view gave, so a refused search or filter says what was wrong."""

from __future__ import annotations

from django.core.exceptions import BadRequest
from django.http import HttpResponseBadRequest
from django.shortcuts import render

from .api import API_PREFIX, error_response


def bad_request(request, exception=None):
    """``handler400``.  Only a ``BadRequest`` a panel view raised has a message meant for the user;
    Django's own refusals (a bad Host header, an unreadable body) may come before the session or
    user exist, so they get a plain answer that needs neither."""
    if not isinstance(exception, BadRequest):
        if request.path_info.startswith(API_PREFIX):
            return error_response(400, "bad request")
        return HttpResponseBadRequest("Bad request.\n", content_type="text/plain; charset=utf-8")
    message = str(exception) or "Bad request."
    if request.path_info.startswith(API_PREFIX):
        return error_response(400, message)
    return render(request, "400.html", {"message": message}, status=400)
