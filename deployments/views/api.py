"""The JSON API (session authentication; CSRF applies to POST).  Errors are JSON: 401 anonymous,
404 unseen, 403 not allowed, 400 bad input, 409 busy."""

from __future__ import annotations

import functools
import json

from django.core.exceptions import PermissionDenied
from django.http import Http404, JsonResponse
from django.views.decorators.http import require_GET, require_POST

from .. import lifecycle, logstream
from ..access import gate
from ..access.gate import VIEW
from ..errors import NodeBusy, RequestError
from ..forms import DeployForm
from ..models import Deployment, Node


def _api_login_required(view):
    """JSON errors instead of redirects: 401 anonymous, 404 unseen, 403 not allowed."""

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
    """POST {"action": "switch", "revision": ""} → 201 with the deployment, 409 if the node is busy."""
    node = gate.node_for(request.user, name, VIEW)
    try:
        body = json.loads(request.body or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        return JsonResponse({"error": f"malformed JSON: {exc}"}, status=400)
    form = DeployForm({"action": body.get("action", "switch"), "revision": body.get("revision", "")})
    if not form.is_valid():
        return JsonResponse({"error": "invalid input", "fields": form.errors.get_json_data()}, status=400)
    try:
        deployment = lifecycle.request_deployment(
            node,
            action=form.cleaned_data["action"],
            revision=form.cleaned_data["revision"],
            user=request.user,
            trigger=Deployment.Trigger.API,
        )
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
    deployment = gate.deployment_for(request.user, pk, VIEW)
    try:
        deployment = lifecycle.cancel_deployment(deployment, user=request.user)
    except RequestError as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    return JsonResponse({"deployment": deployment.status_payload()})
