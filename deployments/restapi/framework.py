"""What the REST API's views share: the JSON parser with the JSON API's limits, one error shape,
keyset pagination.  Named in ``settings.REST_FRAMEWORK``.

Errors are ``{"error": message}`` like the older JSON API's, plus ``"fields": {name: [messages]}``
for malformed input (400).  401 anonymous or refused token, 404 unseen, 403 seen but not allowed,
409 busy or already finished, 413 too large, 415 not JSON.
"""

from __future__ import annotations

import json

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions, pagination, parsers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from deployments.errors import NodeBusy, RequestError
from deployments.views.api import MAX_BODY_BYTES, MAX_JSON_DEPTH, json_depth


class TooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = f"the body may be at most {MAX_BODY_BYTES} bytes"


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "conflict"


class LimitedJSONParser(parsers.JSONParser):
    """JSON only, at most ``MAX_BODY_BYTES``, nested at most ``MAX_JSON_DEPTH`` deep (checked before
    parsing: deep nesting made ``json.loads`` recurse until it failed), UTF-8, an object."""

    def parse(self, stream, media_type=None, parser_context=None):
        raw = stream.read(MAX_BODY_BYTES + 1) if stream is not None else b""
        if len(raw) > MAX_BODY_BYTES:
            raise TooLarge()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise exceptions.ParseError("malformed JSON: the body is not UTF-8") from None
        if json_depth(text) > MAX_JSON_DEPTH:
            raise exceptions.ParseError(f"malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            data = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise exceptions.ParseError(f"malformed JSON: {exc}") from None
        if not isinstance(data, dict):
            raise exceptions.ParseError("malformed JSON: the body must be a JSON object")
        return data


def exception_handler(exc, context):
    """DRF's answers in the panel's error shape; the panel's own errors mapped to their statuses."""
    if isinstance(exc, NodeBusy):
        exc = Conflict(str(exc))
    elif isinstance(exc, RequestError):
        exc = _BadRequest(str(exc))
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "not found")
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or "forbidden")
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        response.data = {"error": "invalid input", "fields": _flat(response.data)}
    else:
        detail = response.data.get("detail", "") if isinstance(response.data, dict) else response.data
        response.data = {"error": str(detail)}
    return response


class _BadRequest(exceptions.APIException):
    status_code = status.HTTP_400_BAD_REQUEST


def _flat(data):
    """Field errors as ``{field: [message, ...]}`` (nested fields as ``a.b``); a list as ``non_field_errors``."""
    if isinstance(data, list):
        return {"non_field_errors": [str(m) for m in data]}
    out = {}
    for name, value in data.items():
        if isinstance(value, dict):
            for sub, messages in _flat(value).items():
                out[f"{name}.{sub}"] = messages
        elif isinstance(value, list) and value and isinstance(value[0], dict | list):
            for i, item in enumerate(value):
                for sub, messages in _flat(item if isinstance(item, dict) else {"": item}).items():
                    out[f"{name}.{i}{'.' + sub if sub else ''}"] = messages
        else:
            out[name] = [str(m) for m in (value if isinstance(value, list) else [value])]
    return out


class KeysetPagination(pagination.CursorPagination):
    """Newest first by id, ``?limit=`` (default 100, at most 500), ``next``/``previous`` cursors: every page
    costs the same however deep (no OFFSET, no COUNT)."""

    ordering = "-id"
    page_size = 100
    page_size_query_param = "limit"
    max_page_size = 500


class ByNamePagination(KeysetPagination):
    ordering = "name"


def conflict(message: str) -> Response:
    return Response({"error": message}, status=status.HTTP_409_CONFLICT)
