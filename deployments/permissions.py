"""The one permission gate: "may this user do ACTION to this node?".

Views, forms, the API, management commands acting for a user and the
WebSocket consumer all ask here.  What a user may not see does not exist for
them: lookups answer 404, not 403.  Only the inside of this module changes
when roles change.

Permissions come from team grants (``deployments.access``): a role (viewer <
deployer < admin, or the global auditor) over a scope (one node, a tag or tag
prefix, all nodes).  A user's permissions are the union over their teams;
superusers may do everything.

Cost: a user's grants are read once (one query) and memoised on the user
object, which Django loads afresh for every request, so a page costs a
constant number of queries and a revoked grant applies from the next request.
Querysets are filtered in SQL (node ids and tag subqueries built from the
grants), never by looping over nodes in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.core.exceptions import PermissionDenied
from django.db.models import BooleanField, Case, Q, QuerySet, Value, When
from django.http import Http404

from .models import Deployment, Node

VIEW = "view"  # see the node, its deployments and logs
DEPLOY = "deploy"  # request and cancel deployments
ADMIN = "admin"  # edit the node, pin host keys, assign credentials
ACTIONS = (VIEW, DEPLOY, ADMIN)

# The least rank a role must have to do an action; roles include those below them.
_ACTION_RANK = {VIEW: 1, DEPLOY: 2, ADMIN: 3}
# The auditor sees everything and acts on nothing: rank 1, but only over all nodes.
_ROLE_RANK = {"viewer": 1, "deployer": 2, "admin": 3, "auditor": 1}

_CACHE_ATTR = "_access_grants"


@dataclass
class _Grants:
    """A user's grants folded into the highest rank per scope."""

    all_rank: int = 0
    auditor: bool = False
    nodes: dict[int, int] = field(default_factory=dict)  # node id -> rank
    tags: dict[str, int] = field(default_factory=dict)  # exact tag -> rank
    prefixes: dict[str, int] = field(default_factory=dict)  # tag prefix (pattern without "*") -> rank

    def any_rank(self) -> int:
        return max([self.all_rank, *self.nodes.values(), *self.tags.values(), *self.prefixes.values()])


def _active(user) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active)


def _grants(user) -> _Grants:
    """The user's grants, read once per user object (one query)."""
    cached = getattr(user, _CACHE_ATTR, None)
    if cached is not None:
        return cached
    from .access.models import Grant

    grants = _Grants()
    for role, scope, node_id, tag in (
        Grant.objects.filter(team__members=user.pk)
        .order_by()  # no ordering: it would join the team and node tables into the DISTINCT
        .values_list("role", "scope", "node_id", "tag")
        .distinct()
    ):
        rank = _ROLE_RANK[role]
        if role == Grant.Role.AUDITOR:
            grants.auditor = True
        if scope == Grant.Scope.ALL:
            grants.all_rank = max(grants.all_rank, rank)
        elif scope == Grant.Scope.NODE:
            grants.nodes[node_id] = max(grants.nodes.get(node_id, 0), rank)
        elif tag.endswith("*"):
            grants.prefixes[tag[:-1]] = max(grants.prefixes.get(tag[:-1], 0), rank)
        else:
            grants.tags[tag] = max(grants.tags.get(tag, 0), rank)
    setattr(user, _CACHE_ATTR, grants)
    return grants


def forget(user) -> None:
    """Drop the grants memoised on ``user`` (after changing them within one request or test)."""
    if user is not None and hasattr(user, _CACHE_ATTR):
        delattr(user, _CACHE_ATTR)


def _check_action(action: str) -> int:
    try:
        return _ACTION_RANK[action]
    except KeyError:
        raise ValueError(f"unknown action {action!r}") from None


def _tag_q(grants: _Grants, rank: int, prefix: str = "") -> Q | None:
    """Tags (on a Tag row, or through ``prefix``) that match a grant of at least ``rank``."""
    exact = sorted(t for t, r in grants.tags.items() if r >= rank)
    starts = sorted(p for p, r in grants.prefixes.items() if r >= rank)
    q = Q(**{f"{prefix}name__in": exact}) if exact else None
    for p in starts:
        # A LIKE 'p%' in SQL: the database matches tags, so nodes tagged later match too.
        q = Q(**{f"{prefix}name__startswith": p}) if q is None else q | Q(**{f"{prefix}name__startswith": p})
    return q


def _scope_q(user, action: str, node_field: str = "pk") -> Q | bool:
    """A filter on ``node_field`` for the nodes ``user`` may ``action``; True for all, False for none."""
    rank = _check_action(action)
    if not _active(user):
        return False
    if user.is_superuser:
        return True
    grants = _grants(user)
    if grants.all_rank >= rank:
        return True
    q = Q()
    node_ids = sorted(n for n, r in grants.nodes.items() if r >= rank)
    if node_ids:
        q |= Q(**{f"{node_field}__in": node_ids})
    tags = _tag_q(grants, rank, prefix="tag__")
    if tags is not None:
        q |= Q(**{f"{node_field}__in": Node.tags.through.objects.filter(tags).values("node_id")})
    return q if q else False


def nodes_for(user, action: str) -> QuerySet[Node]:
    """Nodes where ``user`` may do ``action``, as one SQL query."""
    q = _scope_q(user, action)
    if q is True:
        return Node.objects.all()
    if q is False:
        return Node.objects.none()
    return Node.objects.filter(q)


def annotate_permissions(nodes: QuerySet[Node], user) -> QuerySet[Node]:
    """``nodes`` with boolean ``can_deploy`` and ``can_admin`` computed in the same query (for buttons)."""
    flags = {}
    for name, action in (("can_deploy", DEPLOY), ("can_admin", ADMIN)):
        q = _scope_q(user, action)
        if isinstance(q, bool):
            flags[name] = Value(q, output_field=BooleanField())
        else:
            flags[name] = Case(When(q, then=Value(True)), default=Value(False), output_field=BooleanField())
    return nodes.annotate(**flags)


def _node_matches_tags(node: Node, grants: _Grants, rank: int) -> bool:
    tags = _tag_q(grants, rank)
    if tags is None:
        return False
    prefetched = getattr(node, "_prefetched_objects_cache", {}).get("tags")
    if prefetched is not None:
        names = [t.name for t in prefetched]
        return any(grants.tags.get(n, 0) >= rank for n in names) or any(
            n.startswith(p) for p, r in grants.prefixes.items() if r >= rank for n in names
        )
    return node.tags.filter(tags).exists()


def can(user, action: str, node: Node | None = None) -> bool:
    """True if ``user`` may do ``action`` to ``node`` (or to some node, if None)."""
    rank = _check_action(action)
    if not _active(user):
        return False
    if user.is_superuser:
        return True
    grants = _grants(user)
    if node is None:
        return grants.any_rank() >= rank
    if grants.all_rank >= rank or grants.nodes.get(node.pk, 0) >= rank:
        return True
    return _node_matches_tags(node, grants, rank)


def can_audit(user) -> bool:
    """True if ``user`` may read and export the whole audit trail."""
    return _active(user) and (user.is_superuser or _grants(user).auditor)


def can_manage_teams(user) -> bool:
    """True if ``user`` may create teams and change their members and grants (superusers only)."""
    return _active(user) and user.is_superuser


def visible_nodes(user) -> QuerySet[Node]:
    """Nodes ``user`` may see."""
    return nodes_for(user, VIEW)


def visible_deployments(user) -> QuerySet[Deployment]:
    """Deployments of nodes ``user`` may see."""
    q = _scope_q(user, VIEW, node_field="node_id")
    if q is True:
        return Deployment.objects.all()
    if q is False:
        return Deployment.objects.none()
    return Deployment.objects.filter(q)


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
