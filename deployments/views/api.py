"""The JSON API (session authentication; CSRF applies to POST).  Errors are JSON: 401 anonymous,
404 unseen, 403 not allowed, 400 bad input, 409 busy, 413 body too large, 415 not ``application/json``.

Order of checks on a state change: signed in, the node or deployment visible (404), the gate (403,
audited), and only then the body: its type, size, nesting and fields.  A refused user learns nothing
from how their input would have been judged.  ``deployments.middleware.ApiErrorMiddleware`` gives
every other 4xx under ``API_PREFIX`` (unknown URL, wrong method, CSRF failure) a JSON body too.
"""

from __future__ import annotations

import functools
import json

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404, JsonResponse
from django.views.csrf import csrf_failure as django_csrf_failure
from django.views.decorators.http import require_GET, require_POST

from .. import lifecycle, logstream
from ..access import gate
from ..access.gate import DEPLOY, VIEW
from ..errors import AwaitingApproval, NodeBusy, RequestError
from ..forms import DeployForm
from ..models import Deployment, Node

# Every API URL starts with this (the panel's URLs are mounted at the root).
API_PREFIX = "/api/"
# A deploy request is a few dozen bytes; anything near this is not one.
MAX_BODY_BYTES = 16 * 1024
# Nesting deeper than this is refused before parsing (deep nesting made json.loads recurse until it failed).
MAX_JSON_DEPTH = 8


class ApiError(Exception):
    """A request the API refuses with ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.extra = extra


def error_response(status: int, message: str, **extra) -> JsonResponse:
    """The API's one error shape: ``{"error": message, ...}``."""
    return JsonResponse({"error": message, **extra}, status=status)


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text`` (strings, which may hold brackets, skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:  # one pass, whatever the input (a regex over strings could backtrack)
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def json_object(request, fields: dict[str, type]) -> dict:
    """The request's body as a JSON object with only ``fields`` (name → type), or ApiError.

    415 unless the body is declared ``application/json``; 413 above ``MAX_BODY_BYTES``; 400 for
    anything that is not UTF-8, nests deeper than ``MAX_JSON_DEPTH``, is not an object, or holds
    unknown fields or values of the wrong type.  No body at all, or an empty one, is ``{}``.
    """
    if request.content_type != "application/json":
        # Checked before the body is read: a form or multipart body has been parsed already (CSRF).
        if request.META.get("CONTENT_LENGTH", "") in ("", "0") and "HTTP_TRANSFER_ENCODING" not in request.META:
            return {}  # no body: nothing that could be misread
        raise ApiError(415, "send the body as application/json")
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ApiError(400, "malformed Content-Length") from None
    if declared > MAX_BODY_BYTES:
        raise ApiError(413, f"the body may be at most {MAX_BODY_BYTES} bytes")
    try:
        raw = request.body
    except RequestDataTooBig:
        raise ApiError(413, f"the body may be at most {MAX_BODY_BYTES} bytes") from None
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body may be at most {MAX_BODY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "malformed JSON: the body is not UTF-8") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ApiError(400, f"malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "malformed JSON: the body must be a JSON object")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(repr(k[:50]) for k in unknown[:5])}")
    for name, kind in fields.items():
        if name in body and not isinstance(body[name], kind):
            raise ApiError(400, f"{name} must be a {kind.__name__ if kind is not str else 'string'}")
    return body


def csrf_failure(request, reason: str = ""):
    """``settings.CSRF_FAILURE_VIEW``: 403 for a missing or wrong CSRF token, as JSON on the API."""
    if request.path_info.startswith(API_PREFIX):
        return error_response(403, f"CSRF verification failed: {reason}")
    return django_csrf_failure(request, reason=reason)


def _api_login_required(view):
    """JSON errors instead of redirects: 401 anonymous, 404 unseen, 403 not allowed, ApiError's status."""

    @functools.wraps(view)
    def wrapped(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return JsonResponse({"error": "authentication required"}, status=401)
        try:
            return view(request, *args, **kwargs)
        except Http404 as exc:
            return JsonResponse({"error": str(exc) or "not found"}, status=404)
        except PermissionDenied as exc:
            return JsonResponse({"error": str(exc) or "forbidden"}, status=403)
        except ApiError as exc:
            return error_response(exc.status, str(exc), **exc.extra)

    return wrapped


def _node_json(node: Node) -> dict:
    return {
        "name": node.name,
        "host": node.host,
        "port": node.port,
        "flake_attr": node.flake_attr,
        "tags": [t.name for t in node.tags.all()],
        "host_key_fingerprint": node.host_key_fingerprint,
    }


@_api_login_required
@require_GET
def api_nodes(request):
    nodes = gate.visible_nodes(request.user).prefetch_related("tags")
    return JsonResponse({"nodes": [_node_json(n) for n in nodes]})


@_api_login_required
@require_POST
def api_deploy(request, name):
    """POST {"action": "switch", "revision": "", "diff": false} → 201 with the deployment, 409 if the node is
    busy. ``"diff": true`` builds and shows the difference first (confirm it: ``/api/deployments/<id>/confirm/``)."""
    node = gate.node_for(request.user, name, VIEW)
    gate.require(request.user, DEPLOY, node, event="deployment.requested")
    body = json_object(request, {"action": str, "revision": str, "diff": bool})
    form = DeployForm(
        {"action": body.get("action", "switch"), "revision": body.get("revision", ""), "diff": body.get("diff", False)}
    )
    if not form.is_valid():
        return JsonResponse({"error": "invalid input", "fields": form.errors.get_json_data()}, status=400)
    try:
        deployment = lifecycle.request_deployment(
            node,
            action=form.cleaned_data["action"],
            revision=form.cleaned_data["revision"],
            user=request.user,
            trigger=Deployment.Trigger.API,
            kind=Deployment.Kind.DIFF if form.cleaned_data["diff"] else Deployment.Kind.REBUILD,
        )
    except AwaitingApproval as exc:
        return JsonResponse({"error": str(exc), "approval": exc.approval.payload()}, status=202)
    except NodeBusy as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    except RequestError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"deployment": deployment.status_payload(), "url": deployment.get_absolute_url()}, status=201)


@_api_login_required
@require_GET
def api_deployment(request, pk):
    deployment = gate.deployment_for(request.user, pk, VIEW)
    return JsonResponse({"deployment": {**deployment.status_payload(), "node": deployment.node.name}})


@_api_login_required
@require_GET
def api_deployment_log(request, pk):
    """Lines after ``?after=N`` (default all), at most 5,000 per call."""
    deployment = gate.deployment_for(request.user, pk, VIEW)
    try:
        after = int(request.GET.get("after", "-1"))
    except ValueError:
        return JsonResponse({"error": "after must be an integer"}, status=400)
    lines = logstream.lines_after(deployment.pk, after, limit=5000)
    return JsonResponse({"lines": lines, "status": deployment.status})


@_api_login_required
@require_POST
def api_cancel(request, pk):
    """POST (an empty JSON body or ``{}``) → 200 with the deployment, 409 if it has already finished."""
    deployment = gate.deployment_for(request.user, pk, VIEW)
    gate.require(request.user, DEPLOY, deployment.node, event="deployment.cancel")
    json_object(request, {})
    try:
        deployment = lifecycle.cancel_deployment(deployment, user=request.user)
    except RequestError as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    return JsonResponse({"deployment": deployment.status_payload()})
