"""Safe change on the pages and the JSON API: a node's build location, and the confirmation of a diff."""

from __future__ import annotations

import re

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from .. import change
from ..access import gate
from ..access.gate import ADMIN, DEPLOY, VIEW
from ..errors import RequestError
from ..forms import BuildLocationForm
from ..models import Deployment, Node
from .api import _api_login_required, error_response, json_object

_ID_RE = re.compile(r"\A[0-9]{1,18}\Z")


def build_hosts_for(user, node: Node):
    """The nodes ``user`` may choose as ``node``'s build host: those they may deploy, pinned, not itself."""
    return gate.nodes_for(user, DEPLOY).exclude(pk=node.pk).exclude(host_key="").order_by("name")


def node_context(user, node: Node) -> dict:
    """What the node page shows of its build location (and the form, for its admins)."""
    can_admin = gate.can(user, ADMIN, node)
    initial = {"location": node.build_location, "build_host": node.build_host_id}
    return {
        "build_location": change.effective_location(node),
        "build_location_form": BuildLocationForm(initial=initial, build_hosts=build_hosts_for(user, node))
        if can_admin
        else None,
    }


def deployment_context(user, deployment: Deployment) -> dict:
    """What the deployment page shows of a diff: its summary lines, and whether the viewer may confirm it."""
    if deployment.kind != Deployment.Kind.DIFF or not deployment.diff:
        return {"diff_lines": None, "can_confirm": False}
    confirmable = (
        deployment.status == Deployment.Status.SUCCEEDED
        and not Deployment.objects.filter(diff_of=deployment).exists()
        and gate.can(user, DEPLOY, deployment.node)
    )
    return {"diff_lines": change.describe_diff(deployment.diff), "can_confirm": confirmable}


@login_required
@require_POST
def node_build_location(request, name):
    """Node admins: where the node builds. A build host the editor may not deploy is 403 (audited), even
    forged into the POST: it would receive the source of everything built there."""
    node = gate.node_for(request.user, name, VIEW)
    gate.require(request.user, ADMIN, node, event="build_location.changed")
    raw = request.POST.get("build_host", "")
    if _ID_RE.match(raw):
        host = Node.objects.filter(pk=int(raw)).first()
        if host is None or not gate.can(request.user, VIEW, host):
            host = Node(pk=int(raw), name="?")  # unseen: refused as any node they may not deploy
        gate.require_build_host(request.user, host, event="build_location.changed", obj=node)
    form = BuildLocationForm(request.POST, build_hosts=build_hosts_for(request.user, node))
    if not form.is_valid():
        messages.error(request, "Choose a build location (and, for a build host, one of the nodes offered).")
        return redirect(node)
    try:
        change.set_build_location(
            node, form.cleaned_data["location"], form.cleaned_data["build_host"], user=request.user
        )
    except RequestError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{node.name} builds {change.effective_location(node).describe()}.")
    return redirect(node)


@login_required
@require_POST
def deployment_confirm(request, pk):
    """Deployers of the node: switch to exactly the system a diff built."""
    diff = gate.deployment_for(request.user, pk, VIEW)
    gate.require(request.user, DEPLOY, diff.node, event="deployment.requested")
    try:
        activation = change.confirm_diff(diff, user=request.user)
    except RequestError as exc:
        messages.error(request, str(exc))
        return redirect(diff)
    return redirect(activation)


@_api_login_required
@require_POST
def api_confirm(request, pk):
    """``POST /api/deployments/<id>/confirm/`` (an empty body or ``{}``): 201 with the activation; 409 when
    the diff cannot be confirmed (not a diff, not succeeded, expired, confirmed already)."""
    diff = gate.deployment_for(request.user, pk, VIEW)
    gate.require(request.user, DEPLOY, diff.node, event="deployment.requested")
    json_object(request, {})
    try:
        activation = change.confirm_diff(diff, user=request.user, trigger=Deployment.Trigger.API)
    except RequestError as exc:
        return error_response(409, str(exc))
    return JsonResponse({"deployment": activation.status_payload(), "url": activation.get_absolute_url()}, status=201)
