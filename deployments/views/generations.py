"""A node's generations and rolling back to one: the node page's two forms and their JSON API.

Gate first, as everywhere: reading needs VIEW (404 for an unseen node), a rollback DEPLOY (403 and a
``deployment.requested`` event with outcome denied) before the input is read.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from .. import generations, rollbacks
from ..access import gate
from ..access.gate import DEPLOY, VIEW
from ..errors import AwaitingApproval, NodeBusy, RequestError
from ..forms import DeployForm, RollbackForm
from ..models import Deployment
from .api import ApiError, _api_login_required, json_object
from .pages import _node_page


def _to_generations(node):
    return redirect(f"{node.get_absolute_url()}#generations")


@login_required
@require_POST
def node_generations_read(request, name):
    """Read the node's generations now (SSH, a few seconds at most), keep them, show the node page."""
    node = gate.node_for(request.user, name, VIEW)
    read = generations.read_node_generations(node, user=request.user)
    if read.error:
        messages.error(request, f"Could not read the generations of {node.name}: {read.error}")
    return _to_generations(node)


@login_required
@require_POST
def node_rollback(request, name):
    node = gate.node_for(request.user, name, VIEW)
    gate.require(request.user, DEPLOY, node, event="deployment.requested")
    form = RollbackForm(request.POST)
    if not form.is_valid():
        for field, errors in form.errors.items():
            messages.error(request, f"Rollback refused: {field}: {' '.join(errors)}")
        return _node_page(request, node, DeployForm(), status=400)
    try:
        deployment = rollbacks.request_rollback(
            node, generation=form.cleaned_data["generation"], action=form.cleaned_data["action"], user=request.user
        )
    except AwaitingApproval as exc:
        messages.info(request, str(exc))
        return redirect(exc.approval)
    except RequestError as exc:
        messages.error(request, str(exc))
        return _to_generations(node)
    return redirect(deployment)


@_api_login_required
@require_http_methods(["GET", "POST"])
def api_node_generations(request, name):
    """GET: the last read (no SSH).  POST (empty body or ``{}``): read now, then the same answer; a node
    that cannot be read is 502 with the reason (the last good read still in the body)."""
    node = gate.node_for(request.user, name, VIEW)
    if request.method == "POST":
        json_object(request, {})
        read = generations.read_node_generations(node, user=request.user)
        body = {"node": node.name, **generations.shown(node).as_json()}
        return JsonResponse(body, status=502 if read.error else 200)
    return JsonResponse({"node": node.name, **generations.shown(node).as_json()})


@_api_login_required
@require_POST
def api_rollback(request, name):
    """POST {"generation": 3 | null, "action": "switch" | "boot"} → 201 with the deployment; 409 busy."""
    node = gate.node_for(request.user, name, VIEW)
    gate.require(request.user, DEPLOY, node, event="deployment.requested")
    body = json_object(request, {"generation": object, "action": str})
    generation = body.get("generation")
    if isinstance(generation, bool) or not isinstance(generation, (int, str, type(None))):
        raise ApiError(400, "generation must be a number, or null for the previous one")
    form = RollbackForm(
        {"generation": "" if generation is None else str(generation), "action": body.get("action", "switch")}
    )
    if not form.is_valid():
        return JsonResponse({"error": "invalid input", "fields": form.errors.get_json_data()}, status=400)
    try:
        deployment = rollbacks.request_rollback(
            node,
            generation=form.cleaned_data["generation"],
            action=form.cleaned_data["action"],
            user=request.user,
            trigger=Deployment.Trigger.API,
        )
    except AwaitingApproval as exc:
        return JsonResponse({"error": str(exc), "approval": exc.approval.payload()}, status=202)
    except NodeBusy as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    except RequestError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"deployment": deployment.status_payload(), "url": deployment.get_absolute_url()}, status=201)
