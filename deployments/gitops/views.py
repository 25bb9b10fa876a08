"""The webhook endpoint (CSRF-exempt: forges sign instead) and the GitOps pages: repositories' secrets and
polling, tag and node policies, approvals.  The gate decides first in every view."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_POST

from deployments.access import gate
from deployments.errors import RequestError
from deployments.models import Repository, Tag

from . import approvals, changes, webhooks
from .forms import DecisionForm, PolicyForm, PollForm, TagForm
from .models import PendingSync, ProtectedTag, SyncPolicy


@csrf_exempt
def webhook(request, provider):
    """``POST /hooks/<provider>/``: a forge's push.  The only CSRF-exempt view: forges cannot hold a
    session token; the signature (per-repository secret) is what proves the sender."""
    if request.method != "POST":
        return JsonResponse({"error": "POST a webhook delivery here."}, status=405, headers={"Allow": "POST"})
    limit = settings.WEBHOOK_MAX_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        return JsonResponse({"error": f"The body is larger than {limit} bytes."}, status=413)
    body = request.read(limit + 1)
    answer = webhooks.receive(provider, request.headers, body, source=request.META.get("REMOTE_ADDR"))
    return JsonResponse(answer.body, status=answer.status)


# --- settings: repositories, tags ------------------------------------------------


@login_required
def overview(request):
    """Repositories (webhook URL, secret set, polling), tags (policy, protection), waiting auto-deploys."""
    gate.require_global(request.user, gate.VIEW_INVENTORY, event="repository.viewed", object_type="repository")
    watches = {w.repository_id: w for w in changes.RepositoryWatch.objects.all()}
    repositories = [(r, watches.get(r.pk)) for r in Repository.objects.all()]
    tag_policies = {p.tag_id: p for p in SyncPolicy.objects.filter(tag__isnull=False)}
    protected = set(ProtectedTag.objects.values_list("tag_id", flat=True))
    tags = [(t, tag_policies.get(t.pk), t.pk in protected) for t in Tag.objects.all()]
    return render(
        request,
        "gitops/overview.html",
        {
            "repositories": repositories,
            "tags": tags,
            "pending": PendingSync.objects.filter(node__in=gate.visible_nodes(request.user)).select_related("node"),
            "can_manage": gate.may(request.user, gate.MANAGE_INVENTORY),
            "hook_base": request.build_absolute_uri("/hooks/"),
        },
    )


@login_required
@require_POST
def repository_secret(request, pk):
    repository = get_object_or_404(Repository, pk=pk)
    secret = changes.rotate_webhook_secret(repository, user=request.user)
    # Shown once, on this answer only (no-store, like every page): never stored in clear or shown again.
    return render(request, "gitops/secret.html", {"repository": repository, "secret": secret})


@login_required
@require_POST
def repository_poll(request, pk):
    repository = get_object_or_404(Repository, pk=pk)
    gate.require_global(request.user, gate.MANAGE_INVENTORY, event="repository.changed", obj=repository)
    form = PollForm(request.POST)
    if not form.is_valid():
        messages.error(request, "; ".join(e for errs in form.errors.values() for e in errs))
        return redirect("gitops:overview")
    try:
        changes.set_poll_interval(repository, form.cleaned_data["poll_interval"], user=request.user)
    except RequestError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Polling of {repository.name} saved.")
    return redirect("gitops:overview")


def _policy_initial(policy: SyncPolicy | None) -> dict:
    if policy is None:
        return {"mode": "manual", "action": "switch"}
    return {
        "mode": policy.mode,
        "action": policy.action,
        "days": policy.days,
        "start": policy.window_start,
        "end": policy.window_end,
    }


def _save_policy(request, target, form) -> bool:
    data = form.cleaned_data
    try:
        changes.set_policy(
            target,
            mode=data["mode"],
            action=data["action"],
            days=data["days"],
            start=data["start"],
            end=data["end"],
            user=request.user,
        )
    except RequestError as exc:
        form.add_error(None, str(exc))
        return False
    return True


@login_required
@require_http_methods(["GET", "POST"])
def tag_policy(request, name):
    gate.require_global(request.user, gate.MANAGE_INVENTORY, event="sync_policy.changed", object_type="tag")
    tag = get_object_or_404(Tag, name=name)
    policy = SyncPolicy.objects.filter(tag=tag).first()
    initial = {**_policy_initial(policy), "protected": ProtectedTag.objects.filter(tag=tag).exists()}
    form = TagForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid() and _save_policy(request, tag, form):
        changes.set_protected(tag, form.cleaned_data["protected"], user=request.user)
        messages.success(request, f"Policy of tag {tag.name} saved.")
        return redirect("gitops:overview")
    status = 400 if request.method == "POST" else 200
    return render(request, "gitops/policy_form.html", {"form": form, "target": f"tag {tag.name}"}, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def node_policy(request, name):
    node = gate.node_for(request.user, name, gate.VIEW)
    gate.require(request.user, gate.ADMIN, node, event="sync_policy.changed")
    policy = SyncPolicy.objects.filter(node=node).first()
    form = PolicyForm(request.POST or None, initial=_policy_initial(policy))
    if request.method == "POST" and form.is_valid() and _save_policy(request, node, form):
        messages.success(request, f"Sync policy of {node.name} saved.")
        return redirect(node)
    status = 400 if request.method == "POST" else 200
    return render(
        request, "gitops/policy_form.html", {"form": form, "target": f"node {node.name}", "node": node}, status=status
    )


# --- approvals -----------------------------------------------------------------


@login_required
def approval_list(request):
    """Pending requests the user may decide, then the requests they see (newest first)."""
    return render(
        request,
        "gitops/approval_list.html",
        {
            "decidable": approvals.decidable(request.user).prefetch_related("nodes")[:200],
            "recent": approvals.visible(request.user).prefetch_related("nodes")[:100],
        },
    )


@login_required
def approval_detail(request, pk):
    approval = approvals.approval_for(request.user, pk)
    may_decide = approvals.decidable(request.user).filter(pk=approval.pk).exists()
    return render(
        request,
        "gitops/approval_detail.html",
        {"approval": approval, "form": DecisionForm(), "may_decide": may_decide, "nodes": approval.nodes.all()},
    )


@login_required
@require_POST
def approval_decide(request, pk, decision):
    approval = approvals.approval_for(request.user, pk)
    # The gate first: a refused person learns that, not what was wrong with the comment.
    approvals.require_decider(approval, request.user, f"approval.{decision}")
    form = DecisionForm(request.POST)
    if not form.is_valid():
        messages.error(request, "; ".join(e for errs in form.errors.values() for e in errs))
        return redirect(approval)
    try:
        if decision == "approved":
            result = approvals.approve(approval, user=request.user, comment=form.cleaned_data["comment"])
            messages.success(request, f"Approved: {result} requested as {approval.requested_by_name}.")
            return redirect(result)
        approvals.reject(approval, user=request.user, comment=form.cleaned_data["comment"])
        messages.success(request, f"Rejected approval #{approval.pk}.")
    except RequestError as exc:
        messages.error(request, str(exc))
    return redirect(approval)


def awaiting_response(request, exc) -> HttpResponse:
    """How pages answer a request that was held for approval: to the approval's page, saying so."""
    messages.info(request, str(exc))
    return redirect(exc.approval)
