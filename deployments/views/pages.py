"""Node and deployment pages.  Thin: ask the gate first, then validate, then call one state change."""

from __future__ import annotations

import re

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import BadRequest, ValidationError
from django.core.paginator import Paginator
from django.db.models import OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpResponseBadRequest, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from .. import generations, inventory, lifecycle, logstream
from ..access import gate
from ..access.gate import ADMIN, DEPLOY, VIEW
from ..errors import AwaitingApproval, RequestError
from ..forms import DeployForm, NodeForm, PinHostKeyForm, RollbackForm
from ..models import RUNNING_SYSTEM_ACTIONS, Credential, Deployment, Node, Repository
from ..sync.models import NodeSync
from ..validators import validate_node_name, validate_search_text, validate_tag
from . import change as change_views


def _fleet(nodes):
    """``nodes`` with what each runs and its last outcome, in the same query (correlated subqueries on
    indexes: ``deployment_node_finished``, ``deployment_node_recent``): the fleet view costs one query
    per page of nodes, whatever their number or history.

    What a node runs: its latest ``switch`` or ``test`` that left the node on what it built
    (``Deployment.DEPLOYED``: succeeded, or unhealthy and kept; ``run_*``: commit, generation, when, by
    whom), as sync status counts it.  Its last outcome: its latest deployment, whatever it was (``last_*``).
    """
    running = Deployment.objects.filter(
        node=OuterRef("pk"), status__in=Deployment.DEPLOYED, action__in=RUNNING_SYSTEM_ACTIONS
    ).order_by("-finished_at")
    last = Deployment.objects.filter(node=OuterRef("pk")).order_by("-created_at", "-id")
    return nodes.annotate(
        run_id=Subquery(running.values("id")[:1]),
        run_commit=Subquery(running.values("commit_sha")[:1]),
        run_generation=Subquery(running.values("generation_after")[:1]),
        run_at=Subquery(running.values("finished_at")[:1]),
        run_by=Subquery(running.values("requested_by_name")[:1]),
        last_id=Subquery(last.values("id")[:1]),
        last_status=Subquery(last.values("status")[:1]),
        last_action=Subquery(last.values("action")[:1]),
        last_exit_code=Subquery(last.values("exit_code")[:1]),
        last_at=Subquery(last.annotate(at=Coalesce("finished_at", "created_at")).values("at")[:1]),
    )


# The fleet view's outcome filter: a last status, or never deployed.
NEVER = "never"


def _validate_outcome(value: str) -> None:
    if value != NEVER and value not in Deployment.Status.values:
        raise ValidationError(f"use one of {', '.join([*Deployment.Status.values, NEVER])}")


def _validate_sync(value: str) -> None:
    if value not in NodeSync.Status.values:
        raise ValidationError(f"use one of {', '.join(NodeSync.Status.values)}")


def _filters(request, **validators) -> dict[str, str]:
    """The GET fields ``validators`` names, each checked (free text first, then its own rule).

    A bad value is a 400 with the reason (``BadRequest``, shown by ``views.errors.bad_request``),
    never a query: a NUL made PostgreSQL fail, and nothing is gained by searching for a 10 kB name.
    """
    values = {}
    for name, validate in validators.items():
        value = request.GET.get(name, "").strip()
        if value:
            try:
                validate_search_text(value)
                if validate is not None:
                    validate(value)
            except ValidationError as exc:
                raise BadRequest(f"{name}: {exc.messages[0]}") from None
        values[name] = value
    return values


@login_required
@require_GET
def dashboard(request):
    nodes = gate.visible_nodes(request.user)
    filters = _filters(request, tag=validate_tag, q=None, outcome=_validate_outcome, sync=_validate_sync)
    tag = filters["tag"]
    if tag:
        nodes = nodes.filter(tags__name=tag)
    query = filters["q"]
    if query:
        nodes = nodes.filter(name__icontains=query)
    outcome = filters["outcome"]
    if outcome:
        last = Deployment.objects.filter(node=OuterRef("pk")).order_by("-created_at", "-id").values("status")[:1]
        nodes = nodes.annotate(last_status=Subquery(last))
        nodes = nodes.filter(last_status__isnull=True) if outcome == NEVER else nodes.filter(last_status=outcome)
    sync = filters["sync"]
    if sync:
        # A node never checked counts as unknown (nodesync_status index; the join is on the primary key).
        unchecked = Q(sync__isnull=True) if sync == NodeSync.Status.UNKNOWN else Q(pk__in=[])
        nodes = nodes.filter(Q(sync__status=sync) | unchecked)
    page = Paginator(nodes.order_by("name"), 100).get_page(request.GET.get("page"))
    # The fleet's columns for this page's nodes only: PostgreSQL would otherwise compute every subquery
    # for each row an OFFSET skips (a deep page of 10,000 nodes took 0.5 s).  Still one query.
    shown = gate.annotate_permissions(Node.objects.filter(pk__in=page.object_list.values("pk")), request.user)
    page.object_list = _fleet(shown.prefetch_related("tags").select_related("repository", "sync")).order_by("name")
    active = gate.visible_deployments(request.user).filter(status__in=Deployment.ACTIVE).count()
    return render(
        request,
        "deployments/dashboard.html",
        {
            "page": page,
            "nodes": page.object_list,
            "tag": tag,
            "q": query,
            "outcome": outcome,
            "outcomes": [*Deployment.Status.choices, (NEVER, "Never deployed")],
            "sync": sync,
            "sync_statuses": NodeSync.Status.choices,
            "active_count": active,
            "can_roll_out": gate.can(request.user, DEPLOY),
            "can_add_node": gate.may(request.user, gate.MANAGE_INVENTORY),
        },
    )


@login_required
@require_GET
def node_detail(request, name):
    return _node_page(request, gate.node_for(request.user, name, VIEW), DeployForm())


def _node_page(request, node: Node, form: DeployForm, *, status: int = 200):
    deployments = Paginator(node.deployments.all(), 25).get_page(request.GET.get("page"))
    # The bastions on the way, by name where the viewer sees them (what they may not see does not exist).
    path = node.jump_path() if node.jump_host_id else []
    seen = set(gate.visible_nodes(request.user).filter(pk__in=[h.pk for h in path]).values_list("pk", flat=True))
    jump_path = [hop if hop.pk in seen else None for hop in path]
    return render(
        request,
        "deployments/node_detail.html",
        {
            "node": node,
            "jump_path": jump_path,
            "deployments": deployments,
            "form": form,
            "can_deploy": gate.can(request.user, DEPLOY, node),
            "can_admin": gate.can(request.user, ADMIN, node),
            "active": node.deployments.filter(status__in=Deployment.ACTIVE).first(),
            "generations": generations.shown(node),  # the last read; reading is a button (views/generations.py)
            "rollback_form": RollbackForm(auto_id="rollback_%s"),
            "sync": NodeSync.objects.filter(node=node).first(),
            "sync_refresh_url": reverse("sync:node-refresh", args=[node.name]),
            **change_views.node_context(request.user, node),
        },
        status=status,
    )


@login_required
@require_POST
def node_deploy(request, name):
    node = gate.node_for(request.user, name, VIEW)
    # The gate decides before the input is read: a refusal is 403 and one audit event, valid input or not.
    gate.require(request.user, DEPLOY, node, event="deployment.requested")
    form = DeployForm(request.POST)
    if not form.is_valid():
        return _node_page(request, node, form, status=400)
    try:
        deployment = lifecycle.request_deployment(
            node,
            action=form.cleaned_data["action"],
            revision=form.cleaned_data["revision"],
            user=request.user,
            kind=Deployment.Kind.DIFF if form.cleaned_data["diff"] else Deployment.Kind.REBUILD,
        )
    except AwaitingApproval as exc:
        messages.info(request, str(exc))
        return redirect(exc.approval)
    except RequestError as exc:
        messages.error(request, str(exc))
        return redirect(node)
    return redirect(deployment)


@login_required
def node_edit(request, name=None):
    if name is None:
        gate.require_global(request.user, gate.MANAGE_INVENTORY, event="node.created", object_type="node")
        node = Node()
    else:
        node = gate.node_for(request.user, name, VIEW)
        gate.require(request.user, ADMIN, node, event="node.changed")
    if request.method == "POST":
        _refuse_unusable_choices(request, node)
    # Validating the form writes the typed values into ``node``: the page names and links the node as saved.
    saved = {"saved_name": node.name, "node_url": node.get_absolute_url() if node.pk else None}
    form = NodeForm(request.POST or None, instance=node, user=request.user)
    if request.method == "POST" and form.is_valid():
        node = inventory.save_object(form.save(commit=False), user=request.user, tags=form.cleaned_data["tag_names"])
        messages.success(request, f"Saved {node.name}.")
        return redirect(node)
    # A refused form is a 400 (with the form and its errors), so a client never takes it for a saved one.
    status = 400 if request.method == "POST" else 200
    build = change_views.node_context(request.user, node) if node.pk else {}
    return render(request, "deployments/node_form.html", {"form": form, "node": node, **saved, **build}, status=status)


_ID_RE = re.compile(r"\A[0-9]{1,18}\Z")


def _refuse_unusable_choices(request, node: Node) -> None:
    """A credential or repository the user's teams may not use, or a jump host they may not route
    through, chosen in a POST (the form never offers one): 403 and one audit event, before the form is
    validated.  The node's current ones pass here;
    ``inventory.save_object`` decides whether they may go with the node to another machine."""
    for field, model in (("credential", Credential), ("repository", Repository)):
        raw = request.POST.get(field, "")
        if _ID_RE.match(raw) and int(raw) != getattr(node, f"{field}_id"):
            gate.require_use(request.user, model(pk=int(raw)), node=node)
    raw = request.POST.get("jump_host", "")
    if _ID_RE.match(raw) and int(raw) != node.jump_host_id:
        bastion = Node.objects.select_related("credential").filter(pk=int(raw)).first()
        if bastion is None:
            # No such node: refused like one the user may not see, so the answer does not tell which ids exist.
            gate.require_jump_through(request.user, [Node(pk=int(raw), name="")], node=node)
        else:
            gate.require_jump_through(request.user, [bastion], node=node)


@login_required
def node_hostkey(request, name):
    """Scan shows the key the node presents now; pinning needs an explicit confirm of that fingerprint."""
    node = gate.node_for(request.user, name, VIEW)
    gate.require(request.user, ADMIN, node, event="hostkey.viewed")
    scanned = None
    if request.method == "POST":
        try:
            if request.POST.get("op") == "scan":
                scanned = inventory.scan_host_key(node, user=request.user)
            elif request.POST.get("op") == "pin":
                form = PinHostKeyForm(request.POST)
                if not form.is_valid():
                    return HttpResponseBadRequest("Missing key or fingerprint.")
                inventory.pin_host_key(
                    node,
                    form.cleaned_data["key"],
                    user=request.user,
                    expected_fingerprint=form.cleaned_data["fingerprint"],
                )
                messages.success(request, f"Pinned host key {node.host_key_fingerprint} for {node.name}.")
                return redirect(node)
            else:
                return HttpResponseBadRequest("Unknown operation.")
        except RequestError as exc:
            messages.error(request, str(exc))
    return render(
        request,
        "deployments/node_hostkey.html",
        {
            "node": node,
            "scanned": scanned,
            "changed": bool(scanned and node.host_key and scanned.openssh != node.host_key),
        },
    )


@login_required
@require_GET
def deployment_list(request):
    qs = gate.visible_deployments(request.user).select_related("node")
    filters = _filters(request, status=_validate_status, node=validate_node_name)
    status = filters["status"]
    if status:
        qs = qs.filter(status=status)
    node = filters["node"]
    if node:
        qs = qs.filter(node__name=node)
    page = Paginator(qs, 50).get_page(request.GET.get("page"))
    return render(
        request,
        "deployments/deployment_list.html",
        {
            "page": page,
            "status": status,
            "node": node,
            "statuses": Deployment.Status.choices,
        },
    )


@login_required
@require_GET
def deployment_detail(request, pk):
    deployment = gate.deployment_for(request.user, pk, VIEW)
    return render(
        request,
        "deployments/deployment_detail.html",
        {
            "deployment": deployment,
            "node": deployment.node,
            "can_cancel": deployment.is_active and gate.can(request.user, DEPLOY, deployment.node),
            "can_deploy": gate.can(request.user, DEPLOY, deployment.node),
            "status_json": deployment.status_payload(),
            "terminal_statuses": [str(s) for s in Deployment.TERMINAL],
            **change_views.deployment_context(request.user, deployment),
        },
    )


def _validate_status(value: str) -> None:
    if value not in Deployment.Status.values:
        raise ValidationError(f"use one of {', '.join(Deployment.Status.values)}")


@login_required
@require_POST
def deployment_cancel(request, pk):
    deployment = gate.deployment_for(request.user, pk, VIEW)
    gate.require(request.user, DEPLOY, deployment.node, event="deployment.cancel")
    try:
        lifecycle.cancel_deployment(deployment, user=request.user)
        messages.info(request, f"Cancellation of #{deployment.pk} requested.")
    except RequestError as exc:
        messages.error(request, str(exc))
    return redirect(deployment)


@login_required
@require_GET
def deployment_log(request, pk):
    """The full log as plain text; its SHA-256 equals the deployment's log_sha256 once finished."""
    deployment = gate.deployment_for(request.user, pk, VIEW)
    response = StreamingHttpResponse(logstream.iter_log_text(deployment.pk), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="deployment-{deployment.pk}-{deployment.node.name}.log"'
    return response
