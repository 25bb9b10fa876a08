"""Health check pages: a node's checks and magic-rollback deadline (node admins), a tag's checks
(inventory managers). The gate decides first; every change goes through ``inventory``, audited."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from .. import inventory
from ..access import gate
from ..errors import RequestError
from ..forms import ConfirmTimeoutForm, HealthCheckForm
from ..healthchecks import HealthCheck
from ..models import Tag


def _owner(request, name: str | None, tag: str | None):
    """(node, tag, page URL) of the checks page asked for; 404 for a node the user does not see."""
    if name is not None:
        node = gate.node_for(request.user, name, gate.VIEW)
        return node, None, reverse("deployments:node-health", args=[node.name])
    return None, get_object_or_404(Tag, name=tag), reverse("deployments:tag-health", args=[tag])


def _may_change(request, node, tag) -> bool:
    if node is not None:
        return gate.can_change_checks(request.user, node)
    return gate.may(request.user, gate.MANAGE_INVENTORY)


@login_required
@require_http_methods(["GET", "POST"])
def health_page(request, name=None, tag=None):
    """The checks of a node (its own and its tags') or of a tag; for a node also its confirmation deadline
    (POST: change it)."""
    node, tag_obj, url = _owner(request, name, tag)
    if tag_obj is not None:
        gate.require_global(request.user, gate.VIEW_INVENTORY, event="health_check.viewed", object_type="tag")
    timeout_form = None
    if node is not None:
        if request.method == "POST":
            gate.require(request.user, gate.ADMIN, node, event="node.changed")
            timeout_form = ConfirmTimeoutForm(request.POST)
            if timeout_form.is_valid():
                try:
                    inventory.set_confirm_timeout(node, timeout_form.cleaned_data["confirm_timeout"], user=request.user)
                except RequestError as exc:
                    messages.error(request, str(exc))
                else:
                    messages.success(request, "Saved the confirmation deadline.")
                    return redirect(url)
        else:
            timeout_form = ConfirmTimeoutForm(initial={"confirm_timeout": node.confirm_timeout})
    elif request.method == "POST":
        raise Http404("nothing to post here")
    checks = HealthCheck.for_node(node) if node is not None else HealthCheck.objects.filter(tag=tag_obj)
    return render(
        request,
        "deployments/healthcheck_list.html",
        {
            "node": node,
            "tag": tag_obj,
            "checks": checks,
            "timeout_form": timeout_form,
            "can_change": _may_change(request, node, tag_obj),
            "can_admin": node is not None and gate.can(request.user, gate.ADMIN, node),
        },
        status=400 if timeout_form is not None and timeout_form.is_bound else 200,
    )


@login_required
@require_http_methods(["GET", "POST"])
def check_edit(request, name=None, tag=None, pk=None):
    """Add (``pk`` None) or edit a check of a node or a tag."""
    node, tag_obj, url = _owner(request, name, tag)
    check = HealthCheck(node=node, tag=tag_obj)
    if pk is not None:
        check = get_object_or_404(HealthCheck, pk=pk, node=node, tag=tag_obj)
    # The gate before the input is read: node admins (or inventory managers, for a tag).
    gate.require_check_change(request.user, node=node, tag=tag_obj, event="health_check.change")
    form = HealthCheckForm(request.POST or None, instance=check)
    if request.method == "POST" and form.is_valid():
        try:
            inventory.save_health_check(form.save(commit=False), user=request.user)
        except RequestError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, f"Saved health check {check.name}.")
            return redirect(url)
    return render(
        request,
        "deployments/healthcheck_form.html",
        {"form": form, "node": node, "tag": tag_obj, "check": check, "back": url},
        status=400 if request.method == "POST" else 200,
    )


@login_required
@require_POST
def check_delete(request, pk, name=None, tag=None):
    node, tag_obj, url = _owner(request, name, tag)
    check = get_object_or_404(HealthCheck, pk=pk, node=node, tag=tag_obj)
    inventory.delete_health_check(check, user=request.user)
    messages.success(request, f"Deleted health check {check.name}.")
    return redirect(url)
