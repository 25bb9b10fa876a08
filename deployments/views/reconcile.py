"""Reconcile from the deployment page: ask the node what became of an interrupted deployment."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from .. import lifecycle
from ..access import gate
from ..access.gate import DEPLOY, VIEW
from ..errors import RequestError


@login_required
@require_POST
def deployment_reconcile(request, pk):
    """Deployers of the node: reads the node over SSH (a few seconds at most) and records what it says."""
    deployment = gate.deployment_for(request.user, pk, VIEW)
    gate.require(request.user, DEPLOY, deployment.node, event="deployment.reconcile")
    try:
        done = lifecycle.reconcile_deployment(deployment, user=request.user)
    except RequestError as exc:
        messages.error(request, str(exc))
    else:
        (messages.success if done.final else messages.info)(request, f"Reconciled #{deployment.pk}: {done.summary}.")
    return redirect(deployment)
