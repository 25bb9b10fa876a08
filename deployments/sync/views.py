"""Sync status buttons of the node page, and the teams' notification subscriptions.  Gate first."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from deployments import lifecycle
from deployments.access import gate
from deployments.access.gate import DEPLOY
from deployments.errors import RequestError

from . import notify, status
from .models import Delivery, NodeSync, Subscription


@login_required
@require_POST
def node_refresh(request, name):
    """Read the node and recompute its sync status now (its deployers and admins)."""
    node = gate.node_for(request.user, name)
    gate.require(request.user, DEPLOY, node, event="node.sync_changed")
    sync = status.refresh_node(node, user=request.user)
    if sync is None:
        messages.info(request, f"{node.name} is being deployed: its sync status is read after the deployment.")
    else:
        messages.success(request, f"{node.name} is {sync.get_status_display().lower()}.")
    return redirect(node.get_absolute_url() + "#sync")


@login_required
@require_POST
def node_redeploy(request, name):
    """Deploy (switch) the branch head the sync status was computed against, to a drifted or behind node."""
    node = gate.node_for(request.user, name)
    gate.require(request.user, DEPLOY, node, event="deployment.requested")
    sync = NodeSync.objects.filter(node=node).first()
    if sync is None or not sync.redeployable:
        messages.error(request, f"{node.name} is not drifted or behind: nothing to redeploy.")
        return redirect(node.get_absolute_url() + "#sync")
    try:
        deployment = lifecycle.request_deployment(node, action="switch", revision=sync.commit_sha, user=request.user)
    except RequestError as exc:
        messages.error(request, str(exc))
        return redirect(node.get_absolute_url() + "#sync")
    return redirect(deployment.get_absolute_url())


class SubscriptionForm(forms.ModelForm):
    """A team's subscription; the target is write-only (blank on edit keeps it)."""

    target = forms.CharField(
        max_length=2000,
        required=False,
        help_text="Webhook URL or e-mail address. Stored encrypted; shown masked. Leave blank to keep it.",
    )
    events = forms.MultipleChoiceField(
        choices=list(notify.KINDS.items()), widget=forms.CheckboxSelectMultiple, label="Notify on"
    )

    class Meta:
        model = Subscription
        fields = ["team", "name", "kind", "events", "enabled"]

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = gate.subscription_teams(user)
        if self.instance.pk is None:
            self.fields["target"].required = True
            self.fields["target"].help_text = "Webhook URL or e-mail address. Stored encrypted; shown masked."

    def clean(self):
        data = super().clean()
        target = (data.get("target") or "").strip()
        kind = data.get("kind") or self.instance.kind
        if target and kind:
            try:
                data["target"] = notify.validate_target(kind, target)
            except ValidationError as exc:
                self.add_error("target", exc)
        elif self.instance.pk and kind != self.instance.kind:
            self.add_error("target", "A new kind needs its target again.")
        return data


@login_required
def subscription_list(request):
    teams = gate.subscription_teams(request.user)
    subscriptions = Subscription.objects.filter(team__in=teams).select_related("team")
    deliveries = Delivery.objects.filter(subscription__in=subscriptions).select_related("subscription__team")[:50]
    return render(
        request,
        "sync/subscription_list.html",
        {"subscriptions": subscriptions, "deliveries": deliveries, "can_add": teams.exists(), "kinds": notify.KINDS},
    )


@login_required
@require_http_methods(["GET", "POST"])
def subscription_edit(request, pk=None):
    if pk is None:
        subscription = Subscription()
        if not gate.subscription_teams(request.user).exists():
            gate.require_global(request.user, gate.MANAGE_TEAMS, event="subscription.changed")
    else:
        subscription = get_object_or_404(Subscription.objects.select_related("team"), pk=pk)
        gate.require_subscriptions(request.user, subscription.team, event="subscription.changed")
    form = SubscriptionForm(request.POST or None, instance=subscription, user=request.user)
    if request.method == "POST" and form.is_valid():
        sub = form.save(commit=False)
        gate.require_subscriptions(request.user, sub.team, event="subscription.changed")
        try:
            notify.save_subscription(sub, target=form.cleaned_data.get("target") or None, user=request.user)
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, f"Subscription {sub.name} saved.")
            return redirect("sync:subscription-list")
    return render(
        request,
        "sync/subscription_form.html",
        {"form": form, "subscription": subscription},
        status=400 if request.method == "POST" else 200,
    )


@login_required
@require_POST
def subscription_delete(request, pk):
    subscription = get_object_or_404(Subscription.objects.select_related("team"), pk=pk)
    gate.require_subscriptions(request.user, subscription.team, event="subscription.changed")
    notify.delete_subscription(subscription, user=request.user)
    messages.success(request, f"Subscription {subscription.name} deleted.")
    return redirect("sync:subscription-list")
