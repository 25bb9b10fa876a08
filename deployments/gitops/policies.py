"""Sync policies and maintenance windows, and what a moved branch does to the nodes that track it.

A node's own policy beats its tags'; among its tags' policies the most careful one wins (manual, then
notify, then auto; then the first tag by name), so tagging a node never makes it deploy by itself
against a stricter tag.  No policy is ``manual``: nothing happens, as before GitOps.

``act_on_move`` runs in the worker (``tasks.handle_push`` / ``tasks.poll_repository``), never on the
webhook's request path.  Auto-deploys are one rollout per action over the nodes whose window is open,
requested by the system itself (``user=None``, trigger ``gitops``): nodes carrying a protected tag go to
a rollout of their own, which is held for approval instead of starting.  Nodes outside their window wait
as ``PendingSync`` rows; the minute schedule starts them when the window opens (``start_due``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from django.db import transaction
from django.utils import timezone

from deployments.audit.writer import record
from deployments.errors import AwaitingApproval, RequestError
from deployments.models import Deployment, Node, Repository

from . import approvals
from .models import PendingSync, SyncPolicy

log = logging.getLogger(__name__)
Mode = SyncPolicy.Mode
_CARE = {Mode.MANUAL: 0, Mode.NOTIFY: 1, Mode.AUTO: 2}


def window_open(policy: SyncPolicy, now: datetime) -> bool:
    """True if ``now`` is inside ``policy``'s maintenance window (always, without one).

    Times are UTC; a window whose end is not after its start runs past midnight, and belongs to the
    day it starts on (Friday 22:00–02:00 is open at 01:00 on Saturday).
    """
    if not policy.has_window:
        return True
    now = now.astimezone(UTC)
    t, day = now.time().replace(tzinfo=None), now.isoweekday()
    start, end, days = policy.window_start, policy.window_end, policy.days
    if start < end:
        return day in days and start <= t < end
    if t >= start:
        return day in days
    yesterday = (now - timedelta(days=1)).isoweekday()
    return t < end and yesterday in days


def effective(nodes: list[Node]) -> dict[int, SyncPolicy | None]:
    """Node id -> the policy that applies to it (None: manual), in two queries."""
    ids = [n.pk for n in nodes]
    own = {p.node_id: p for p in SyncPolicy.objects.filter(node_id__in=ids)}
    by_tag: dict[int, list[tuple[str, SyncPolicy]]] = {}
    tag_policies = {p.tag_id: p for p in SyncPolicy.objects.filter(tag__nodes__in=ids).select_related("tag")}
    for node_id, tag_id in Node.tags.through.objects.filter(node_id__in=ids, tag_id__in=list(tag_policies)).values_list(
        "node_id", "tag_id"
    ):
        policy = tag_policies[tag_id]
        by_tag.setdefault(node_id, []).append((policy.tag.name, policy))
    result = {}
    for node_id in ids:
        if node_id in own:
            result[node_id] = own[node_id]
        elif node_id in by_tag:
            result[node_id] = min(by_tag[node_id], key=lambda tp: (_CARE[tp[1].mode], tp[0]))[1]
        else:
            result[node_id] = None
    return result


def act_on_move(repository: Repository, head: str, *, before: str = "", now: datetime | None = None) -> dict:
    """The tracked branch of ``repository`` moved to ``head``: expire stale approvals, then apply each
    tracking node's policy.  Returns what was done (for the caller's event and tests)."""
    now = now or timezone.now()
    approvals.expire_moved(repository, head)
    nodes = list(repository.nodes.order_by("name"))
    policies = effective(nodes)
    notify, due, waiting = [], [], []
    for node in nodes:
        policy = policies[node.pk]
        if policy is None or policy.mode == Mode.MANUAL:
            continue
        if policy.mode == Mode.NOTIFY:
            notify.append(node)
        elif window_open(policy, now):
            due.append(node)
        else:
            waiting.append(node)
    if notify:
        with transaction.atomic():
            for node in notify:
                record(
                    "gitops.node_behind",
                    obj=node,
                    details={
                        "repository": repository.name,
                        "branch": repository.branch,
                        "before": before,
                        "commit": head,
                    },
                )
    if waiting:
        with transaction.atomic():
            for node in waiting:
                PendingSync.objects.update_or_create(node=node, defaults={"commit_sha": head, "queued_at": now})
            record(
                "gitops.auto_deploy",
                obj=repository,
                details={"commit": head, "waiting_for_window": [n.name for n in waiting]},
            )
    started = start_auto(due, policies, commit=head) if due else []
    return {"notify": [n.name for n in notify], "waiting": [n.name for n in waiting], "started": started}


def start_auto(nodes: list[Node], policies: dict[int, SyncPolicy | None], *, commit: str) -> list[dict]:
    """Request the auto-deploy rollouts of ``nodes`` (their windows are open), by the system.

    One rollout per action; protected nodes apart, so a held approval does not keep the others from
    their deploy.  Nodes without a pinned host key are left out (a rollout would refuse them all).
    Each outcome is a ``gitops.auto_deploy`` event."""
    from deployments import rollouts

    PendingSync.objects.filter(node__in=nodes).delete()
    unpinned = sorted(n.name for n in nodes if not n.host_key)
    protected = set(approvals.protected_nodes(nodes).values_list("pk", flat=True))
    groups: dict[tuple[str, bool], list[Node]] = {}
    for node in nodes:
        if node.host_key:
            groups.setdefault((policies[node.pk].action, node.pk in protected), []).append(node)
    results = []
    for (action, held), members in sorted(groups.items()):
        names = [n.name for n in members]
        result = {"action": action, "nodes": names, "commit": commit}
        outcome = "success"
        try:
            rollout = rollouts.request_rollout(
                rollouts.Options(action=action, nodes=names), user=None, trigger=Deployment.Trigger.GITOPS
            )
            result["rollout"] = rollout.pk
        except AwaitingApproval as exc:
            result["approval"] = exc.approval.pk
        except RequestError as exc:
            result["error"] = str(exc)
            outcome = "failure"
        with transaction.atomic():
            record("gitops.auto_deploy", outcome=outcome, details={**result, "protected": held})
        results.append(result)
    if unpinned:
        with transaction.atomic():
            record(
                "gitops.auto_deploy",
                outcome="failure",
                details={"commit": commit, "nodes": unpinned, "error": "no pinned host key: not deployed"},
            )
        results.append({"nodes": unpinned, "error": "no pinned host key"})
    return results


def start_due(now: datetime | None = None) -> list[dict]:
    """Start the waiting auto-deploys whose window is open now (the minute schedule); drop those whose
    node no longer has the auto policy."""
    now = now or timezone.now()
    pending = list(PendingSync.objects.select_related("node"))
    if not pending:
        return []
    nodes = [p.node for p in pending]
    policies = effective(nodes)
    gone = [n.pk for n in nodes if policies[n.pk] is None or policies[n.pk].mode != Mode.AUTO]
    PendingSync.objects.filter(node_id__in=gone).delete()
    due = [n for n in nodes if n.pk not in gone and window_open(policies[n.pk], now)]
    return start_auto(due, policies, commit="") if due else []
