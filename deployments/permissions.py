"""The one permission gate: "may this user do ACTION to this node?".

Views, forms, the API, management commands acting for a user and the
WebSocket consumer all ask here.  What a user may not see does not exist for
them: lookups answer 404, not 403.  Only the inside of this module changes
when roles change.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404

from .models import Deployment, Node

VIEW = "view"  # see the node, its deployments and logs
DEPLOY = "deploy"  # request and cancel deployments
ADMIN = "admin"  # edit the node, pin host keys, assign credentials
ACTIONS = (VIEW, DEPLOY, ADMIN)

# Django permissions standing in for roles until teams exist.
_DJANGO_PERMS = {
    VIEW: "deployments.view_node",
    DEPLOY: "deployments.add_deployment",
    ADMIN: "deployments.change_node",
}


def can(user, action: str, node: Node | None = None) -> bool:
    """True if ``user`` may do ``action`` to ``node`` (or to some node, if None)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if user is None or not user.is_authenticated or not user.is_active:
        return False
    if user.is_superuser:
        return True
    return user.has_perm(_DJANGO_PERMS[action])


def can_audit(user) -> bool:
    """True if ``user`` may read and export the whole audit trail."""
    return bool(user and user.is_authenticated and user.is_active and (user.is_superuser or user.has_perm("audit.view_auditevent")))


def visible_nodes(user) -> QuerySet[Node]:
    """Nodes ``user`` may see."""
    if can(user, VIEW) or can_audit(user):
        return Node.objects.all()
    return Node.objects.none()


def visible_deployments(user) -> QuerySet[Deployment]:
    """Deployments of nodes ``user`` may see."""
    return Deployment.objects.filter(node__in=visible_nodes(user))


def node_for(user, name: str, action: str = VIEW) -> Node:
    """The node named ``name`` if ``user`` may do ``action``; 404 if unseen, 403 if seen but not allowed."""
    try:
        node = visible_nodes(user).get(name=name)
    except Node.DoesNotExist:
        raise Http404("No such node") from None
    if action != VIEW and not can(user, action, node):
        raise PermissionDenied(f"You may not {action} on {node.name}")
    return node


def deployment_for(user, pk: int, action: str = VIEW) -> Deployment:
    """The deployment ``pk`` if ``user`` may do ``action`` to its node; 404 if unseen, 403 if not allowed."""
    try:
        deployment = visible_deployments(user).select_related("node").get(pk=pk)
    except Deployment.DoesNotExist:
        raise Http404("No such deployment") from None
    if action != VIEW and not can(user, action, deployment.node):
        raise PermissionDenied(f"You may not {action} on {deployment.node.name}")
    return deployment
