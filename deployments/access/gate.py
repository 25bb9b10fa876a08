"""The one permission gate: "may this user have PERMISSION on this node?" and
"may this user do this panel-wide thing?".

Views, forms, the API, the Django admin, management commands acting for a
user, templates (through the context processor) and the WebSocket consumer all
ask here, and nowhere else decides: no other module reads ``is_superuser`` or
the grant rows.  What a user may not see does not exist for them: lookups
answer 404, not 403.  ``require`` and ``require_global`` also record each
refusal in the audit trail.  Only the inside of this module changes when roles
change.

Permissions come from team grants (``deployments.access``): a role (viewer <
deployer < admin, or the global auditor) over a scope (one node, a tag or tag
prefix, all nodes).  A user's permissions are the union over their teams;
superusers may do everything.

Credentials and repositories are *used* by a team only when granted
(``CredentialUse``, ``RepositoryUse``): a node admin may attach to a node, or
point a node that has them at another machine, only what one of their teams
may use, since the node then receives the secret or the source.

Cost: a user's grants are read once (one query) and memoised on the user
object, which Django loads afresh for every request, so a page costs a
constant number of queries and a revoked grant applies from the next request.
Querysets are filtered in SQL (node ids and tag subqueries built from the
grants), never by looping over nodes in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import BooleanField, Case, Exists, OuterRef, Q, QuerySet, Value, When
from django.http import Http404

from deployments.audit.writer import record
from deployments.models import Credential, Deployment, Node, Repository, Rollout

from .models import CredentialUse, Grant, RepositoryUse

# Permissions on a node, weakest first; each includes those before it.
VIEW = "view"  # see the node, its deployments and logs
DEPLOY = "deploy"  # request and cancel deployments
ADMIN = "admin"  # edit the node, pin host keys, assign credentials
PERMISSIONS = (VIEW, DEPLOY, ADMIN)

# Panel-wide capabilities, not tied to one node.
AUDIT = "audit"  # read and export the whole audit trail
MANAGE_TEAMS = "manage-teams"  # create teams, change members and grants
MANAGE_INVENTORY = "manage-inventory"  # add nodes; manage credentials and repositories
VIEW_INVENTORY = "view-inventory"  # list credentials (fingerprints only) and repositories, with who may use them
ADMIN_SITE = "admin-site"  # the Django admin, which bypasses the node gate
CAPABILITIES = (AUDIT, MANAGE_TEAMS, MANAGE_INVENTORY, VIEW_INVENTORY, ADMIN_SITE)

# The least rank a grant must have for a permission; roles include those below them.
_PERMISSION_RANK = {VIEW: 1, DEPLOY: 2, ADMIN: 3}
# The auditor sees everything and acts on nothing: rank 1, but only over all nodes.
ROLE_RANK = {Grant.Role.VIEWER: 1, Grant.Role.DEPLOYER: 2, Grant.Role.ADMIN: 3, Grant.Role.AUDITOR: 1}

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
    grants = _fold(
        Grant.objects.filter(team__members=user.pk)
        .order_by()  # no ordering: it would join the team and node tables into the DISTINCT
        .values_list("role", "scope", "node_id", "tag")
        .distinct()
    )
    setattr(user, _CACHE_ATTR, grants)
    return grants


def _fold(rows) -> _Grants:
    """(role, scope, node id, tag) rows folded into the highest rank per scope."""
    grants = _Grants()
    for role, scope, node_id, tag in rows:
        rank = ROLE_RANK[role]
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
    return grants


def forget(user) -> None:
    """Drop the grants memoised on ``user`` (after changing them within one request or test)."""
    if user is not None and hasattr(user, _CACHE_ATTR):
        delattr(user, _CACHE_ATTR)


def _rank(permission: str) -> int:
    try:
        return _PERMISSION_RANK[permission]
    except KeyError:
        raise ValueError(f"unknown permission {permission!r}") from None


def _tag_q(grants: _Grants, rank: int, prefix: str = "") -> Q | None:
    """Tags (on a Tag row, or through ``prefix``) that match a grant of at least ``rank``."""
    exact = sorted(t for t, r in grants.tags.items() if r >= rank)
    starts = sorted(p for p, r in grants.prefixes.items() if r >= rank)
    q = Q(**{f"{prefix}name__in": exact}) if exact else None
    for p in starts:
        # A LIKE 'p%' in SQL: the database matches tags, so nodes tagged later match too.
        q = Q(**{f"{prefix}name__startswith": p}) if q is None else q | Q(**{f"{prefix}name__startswith": p})
    return q


def _everywhere(user, rank: int) -> bool | _Grants:
    """True if ``user`` has ``rank`` on every node, False if on none; else their grants, to look closer."""
    if not _active(user):
        return False
    if user.is_superuser:
        return True
    grants = _grants(user)
    return True if grants.all_rank >= rank else grants


def _scope_q(user, permission: str, node_field: str = "pk") -> Q | bool:
    """A filter on ``node_field`` for the nodes where ``user`` has ``permission``; True for all, False for none."""
    rank = _rank(permission)
    grants = _everywhere(user, rank)
    if isinstance(grants, bool):
        return grants
    q = Q()
    node_ids = sorted(n for n, r in grants.nodes.items() if r >= rank)
    if node_ids:
        q |= Q(**{f"{node_field}__in": node_ids})
    tags = _tag_q(grants, rank, prefix="tag__")
    if tags is not None:
        q |= Q(**{f"{node_field}__in": Node.tags.through.objects.filter(tags).values("node_id")})
    return q if q else False


def nodes_for(user, permission: str) -> QuerySet[Node]:
    """Nodes where ``user`` has ``permission``, as one SQL query."""
    return _restrict(Node.objects.all(), _scope_q(user, permission))


def annotate_permissions(nodes: QuerySet[Node], user) -> QuerySet[Node]:
    """``nodes`` with boolean ``can_deploy`` and ``can_admin`` computed in the same query (for buttons)."""
    flags = {}
    for name, permission in (("can_deploy", DEPLOY), ("can_admin", ADMIN)):
        q = _scope_q(user, permission)
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


def can(user, permission: str, node: Node | None = None) -> bool:
    """True if ``user`` has ``permission`` on ``node`` (or on some node, if None)."""
    rank = _rank(permission)
    grants = _everywhere(user, rank)
    if isinstance(grants, bool):
        return grants
    if node is None:
        return grants.any_rank() >= rank
    if grants.nodes.get(node.pk, 0) >= rank:
        return True
    return _node_matches_tags(node, grants, rank)


def may(user, capability: str) -> bool:
    """True if ``user`` has the panel-wide ``capability``.

    Only superusers manage teams, the inventory outside one node's scope and the
    Django admin; auditors (and superusers) read the audit trail and the list of
    credentials and repositories.
    """
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    if not _active(user):
        return False
    if user.is_superuser:
        return True
    return capability in (AUDIT, VIEW_INVENTORY) and _grants(user).auditor


def _refuse(
    user,
    event: str,
    message: str,
    *,
    actor_kind: str | None,
    obj,
    object_type: str,
    required: str,
    node: Node | None = None,
    details: dict | None = None,
):
    with transaction.atomic():
        record(
            event,
            user=user,
            actor_kind=actor_kind,
            obj=obj,
            object_type=object_type,
            node=node,
            outcome="denied",
            details={"required": required, **(details or {})},
        )
    raise PermissionDenied(message)


def require(user, permission: str, node: Node, *, event: str, actor_kind: str | None = None) -> None:
    """Refuse with 403, and record the refusal as ``event``, unless ``user`` has ``permission`` on ``node``.

    ``user=None`` is the system or the command line itself, which may do anything.
    """
    if user is None or can(user, permission, node):
        return
    _refuse(
        user,
        event,
        f"You may not {permission} on {node.name}.",
        actor_kind=actor_kind,
        obj=node,
        object_type="",
        required=permission,
    )


def require_build_host(user, host: Node, *, event: str, obj=None, actor_kind: str | None = None) -> None:
    """Refuse with 403 (recorded as ``event``) unless ``user`` may build on ``host``.

    A build host receives the source of every system built on it and runs the build as its login
    user: choosing it is deploying to it, so it takes DEPLOY there. The refusal does not say whether
    a node the user cannot see exists.
    """
    if user is None or can(user, DEPLOY, host):
        return
    _refuse(
        user,
        event,
        "You may not build on that node: choosing a build host needs the deploy permission on it.",
        actor_kind=actor_kind,
        obj=obj,
        object_type="",
        required=DEPLOY,
        details={"build_host": host.pk},
    )


def require_global(
    user, capability: str, *, event: str, obj=None, object_type: str = "", actor_kind: str | None = None
) -> None:
    """Refuse with 403, and record the refusal as ``event``, unless ``user`` has ``capability``."""
    if user is None or may(user, capability):
        return
    _refuse(
        user,
        event,
        _REFUSALS[capability],
        actor_kind=actor_kind,
        obj=obj if obj is not None and obj.pk else None,
        object_type=object_type,
        required=capability,
    )


_REFUSALS = {
    AUDIT: "Only auditors read the audit trail.",
    MANAGE_TEAMS: "Only superusers manage teams and grants.",
    MANAGE_INVENTORY: "Only superusers add nodes and manage credentials and repositories.",
    VIEW_INVENTORY: "Only superusers and auditors see the credentials and repositories.",
    ADMIN_SITE: "Only superusers use the Django admin.",
}


# --- the use of credentials and repositories ------------------------------------

USE = "use"  # attach a credential or repository to a node (the node then receives the secret or the source)
_USE_MODELS = {Credential: (CredentialUse, "credential_id"), Repository: (RepositoryUse, "repository_id")}


def _usable(user, model):
    use_model, column = _USE_MODELS[model]
    if not _active(user):
        return model.objects.none()
    if user.is_superuser:
        return model.objects.all()
    # One query with a subquery; no DISTINCT needed however many of the user's teams hold the grant.
    return model.objects.filter(pk__in=use_model.objects.filter(team__members=user.pk).values(column))


def usable_credentials(user) -> QuerySet[Credential]:
    """Credentials ``user`` may attach to nodes: granted to one of their teams (all, for superusers)."""
    return _usable(user, Credential)


def usable_repositories(user) -> QuerySet[Repository]:
    """Repositories ``user`` may deploy nodes from: granted to one of their teams (all, for superusers)."""
    return _usable(user, Repository)


def can_use(user, obj: Credential | Repository) -> bool:
    """True if ``user`` may use the credential or repository ``obj`` (False for an unsaved one)."""
    if obj is None or obj.pk is None:
        return False
    return _usable(user, type(obj)).filter(pk=obj.pk).exists()


def require_use(user, obj: Credential | Repository, *, node: Node | None = None, actor_kind: str | None = None) -> None:
    """Refuse with 403 unless ``user`` may use ``obj``; the refusal is recorded as ``credential.use`` or
    ``repository.use`` (outcome denied), with the node it was meant for.

    ``obj`` may be an instance standing for an id that does not exist (a forged form value): it is
    refused like any other, so the answer does not tell which ids exist.  ``user=None`` is the system.
    """
    if user is None or can_use(user, obj):
        return
    kind = obj._meta.model_name
    stored = type(obj).objects.filter(pk=obj.pk).first() if obj.pk else None
    _refuse(
        user,
        f"{kind}.use",
        f"Your teams may not use this {kind}: ask a team manager to grant its use.",
        actor_kind=actor_kind,
        obj=stored,
        object_type=kind,
        required=USE,
        node=node if node is not None and node.pk else None,
        details={"id": obj.pk, **({"node": node.name} if node is not None else {})},
    )


# --- jump hosts (bastions) -----------------------------------------------------------

JUMP = "jump through"  # route a node through a bastion: DEPLOY on it and the use of its credential


def can_jump_through(user, bastion: Node) -> bool:
    """True if ``user`` may route nodes through ``bastion``: they may deploy on it and use its credential
    (the panel logs in to it with that credential for every connection to the nodes behind it)."""
    if bastion.pk is None or bastion.credential_id is None:
        return False  # a stand-in for an id that does not exist (a forged form value)
    return can(user, DEPLOY, bastion) and can_use(user, bastion.credential)


def jump_hosts_for(user) -> QuerySet[Node]:
    """The nodes ``user`` may choose as a jump host: DEPLOY on them and their credential usable."""
    return nodes_for(user, DEPLOY).filter(credential__in=usable_credentials(user))


def require_jump_through(user, bastions: list[Node], *, node: Node, actor_kind: str | None = None) -> None:
    """Refuse with 403 unless ``user`` may route ``node`` through every one of ``bastions`` (the whole way);
    one ``jump_host.use`` event (outcome denied) naming the first bastion refused.

    A node admin who routes their node through a bastion they may not reach would otherwise get the
    panel to log in there with its credential on their behalf.  ``user=None`` is the system.
    """
    if user is None:
        return
    for bastion in bastions:
        if can_jump_through(user, bastion):
            continue
        seen = can(user, VIEW, bastion)
        _refuse(
            user,
            "jump_host.use",
            f"You may not route nodes through {bastion.name if seen else 'this node'}: "
            "it needs deploy on it and the use of its credential.",
            actor_kind=actor_kind,
            obj=bastion if seen else None,
            object_type="node",
            required=JUMP,
            node=node if node.pk else None,
            details={"id": bastion.pk, "node": node.name},
        )


def visible_nodes(user) -> QuerySet[Node]:
    """Nodes ``user`` may see."""
    return nodes_for(user, VIEW)


def visible_deployments(user) -> QuerySet[Deployment]:
    """Deployments of nodes ``user`` may see."""
    return _restrict(Deployment.objects.all(), _scope_q(user, VIEW, node_field="node_id"))


def _restrict(queryset: QuerySet, q: Q | bool) -> QuerySet:
    """``queryset`` narrowed by a ``_scope_q`` answer (True: all of it, False: none)."""
    if q is True:
        return queryset
    if q is False:
        return queryset.none()
    return queryset.filter(q)


def node_for(user, name: str, permission: str = VIEW) -> Node:
    """The node named ``name`` if ``user`` has ``permission``; 404 if unseen, 403 if seen but not allowed."""
    try:
        node = visible_nodes(user).get(name=name)
    except Node.DoesNotExist:
        raise Http404("No such node") from None
    if permission != VIEW and not can(user, permission, node):
        raise PermissionDenied(f"You may not {permission} on {node.name}")
    return node


def deployment_for(user, pk: int, permission: str = VIEW) -> Deployment:
    """The deployment ``pk`` if ``user`` has ``permission`` on its node; 404 if unseen, 403 if not allowed."""
    try:
        deployment = visible_deployments(user).select_related("node").get(pk=pk)
    except Deployment.DoesNotExist:
        raise Http404("No such deployment") from None
    if permission != VIEW and not can(user, permission, deployment.node):
        raise PermissionDenied(f"You may not {permission} on {deployment.node.name}")
    return deployment


# --- rollouts: many nodes at once --------------------------------------------------


def require_somewhere(user, permission: str, *, event: str, actor_kind: str | None = None) -> None:
    """Refuse with 403 (one audit event) unless ``user`` has ``permission`` on at least one node.

    What a rollout request asks first, before its body is read: whoever may deploy nowhere learns
    nothing from how their selection would have been judged.
    """
    if user is None or can(user, permission):
        return
    _refuse(
        user,
        event,
        f"You may not {permission} on any node.",
        actor_kind=actor_kind,
        obj=None,
        object_type="rollout",
        required=permission,
    )


def lacking(user, permission: str, nodes: QuerySet[Node]) -> QuerySet[Node]:
    """The nodes of ``nodes`` on which ``user`` lacks ``permission``, as one SQL query (none for the system)."""
    if user is None:
        return nodes.none()
    q = _scope_q(user, permission)
    if q is True:
        return nodes.none()
    if q is False:
        return nodes
    return nodes.exclude(q)


def can_every(user, permission: str, nodes: QuerySet[Node]) -> bool:
    """True if ``user`` has ``permission`` on every node of ``nodes`` (one query)."""
    return not lacking(user, permission, nodes).exists()


def require_every(
    user,
    permission: str,
    nodes: QuerySet[Node],
    *,
    event: str,
    actor_kind: str | None = None,
    obj=None,
    object_type: str = "rollout",
) -> None:
    """Refuse with 403, recorded once as ``event``, unless ``user`` has ``permission`` on every node of ``nodes``.

    The refusal names (up to 20 of) the nodes that failed among those ``user`` may see, never an
    unseen one.  A rollout is refused whole, never trimmed.
    """
    missing = lacking(user, permission, nodes)
    if not missing.exists():
        return
    seen = list(
        missing.filter(pk__in=visible_nodes(user).values("pk")).order_by("name").values_list("name", flat=True)[:21]
    )
    if seen:
        where = ", ".join(seen[:20]) + (", …" if len(seen) > 20 else "")
    else:
        where = "every node of it"
    _refuse(
        user,
        event,
        f"You may not {permission} on {where}.",
        actor_kind=actor_kind,
        obj=obj,
        object_type=object_type,
        required=permission,
        details={"nodes": seen[:20]},
    )


def visible_rollouts(user) -> QuerySet[Rollout]:
    """Rollouts with at least one node ``user`` may see (they see only those nodes' rows)."""
    q = _scope_q(user, VIEW, node_field="node_id")
    if isinstance(q, bool):
        return _restrict(Rollout.objects.all(), q)
    return Rollout.objects.filter(Exists(Deployment.objects.filter(q, rollout=OuterRef("pk"))))


def rollout_deployments(user, rollout: Rollout) -> QuerySet[Deployment]:
    """The deployments of ``rollout`` whose nodes ``user`` may see."""
    return visible_deployments(user).filter(rollout=rollout)


def rollout_nodes(rollout: Rollout) -> QuerySet[Node]:
    """Every node of ``rollout`` (seen or not: for ``require_every``)."""
    return Node.objects.filter(pk__in=Deployment.objects.filter(rollout=rollout).values("node_id"))


def rollout_for(user, pk: int) -> Rollout:
    """Rollout ``pk`` if ``user`` sees one of its nodes; 404 otherwise.  Acting on it needs
    ``require_every`` over ``rollout_nodes``."""
    try:
        return visible_rollouts(user).get(pk=pk)
    except Rollout.DoesNotExist:
        raise Http404("No such rollout") from None


# --- approvals (deployments/gitops/approvals.py) -----------------------------------


def with_every_node(user, permission: str, queryset: QuerySet, nodes_field: str = "nodes") -> QuerySet:
    """The rows of ``queryset`` all of whose nodes (the many-to-many ``nodes_field``) ``user`` has
    ``permission`` on, as one SQL query."""
    q = _scope_q(user, permission)
    if q is True:
        return queryset
    if q is False:
        return queryset.none()
    return queryset.exclude(**{f"{nodes_field}__in": Node.objects.exclude(q)})


def require_approver(
    user, nodes: QuerySet[Node], *, requested_by_id: int | None, event: str, obj, actor_kind: str | None = None
) -> None:
    """Refuse with 403 (audited as ``event``, outcome denied) unless ``user`` may approve a held request
    over ``nodes``: a second person, not its requester, with DEPLOY on every one of them."""
    if _active(user) and requested_by_id is not None and user.pk == requested_by_id:
        _refuse(
            user,
            event,
            "You requested this yourself: a second person with deploy rights must decide.",
            actor_kind=actor_kind,
            obj=obj,
            object_type="",
            required="second-person",
        )
    if not _active(user):
        raise PermissionDenied("Sign in to decide on approvals.")
    require_every(user, DEPLOY, nodes, event=event, actor_kind=actor_kind, obj=obj, object_type="")


# -- health checks (deployments/healthchecks.py) ----------------------------------------------------


def can_change_checks(user, node: Node) -> bool:
    """May ``user`` add, change or delete ``node``'s own health checks? Node admins only: a command check
    runs a shell command on the node as its SSH user, which is an admin's power."""
    return can(user, ADMIN, node)


def require_check_change(user, *, node: Node | None = None, tag=None, command: bool = False,
                         event: str, actor_kind: str | None = None) -> None:  # fmt: skip
    """Refuse (403, audited as ``event``) a change to a node's health checks unless ``user`` is admin of
    the node; to a tag's unless they manage the inventory, and for a command check also admin of every
    node that carries the tag (it would run there)."""
    if node is not None:
        require(user, ADMIN, node, event=event, actor_kind=actor_kind)
        return
    require_global(user, MANAGE_INVENTORY, event=event, actor_kind=actor_kind)
    if command and tag is not None:
        require_every(user, ADMIN, tag.nodes.all(), event=event, actor_kind=actor_kind, object_type="tag")


# --- a team's own view (notifications: deployments/sync/notify.py) -------------------------


def team_can_view(team, node: Node | None) -> bool:
    """True if ``team``'s own grants let it view ``node`` (not its members' other teams: a team hears only
    about what the team itself sees).  An event about no node: only a team that views every node."""
    grants = _fold(Grant.objects.filter(team=team).values_list("role", "scope", "node_id", "tag"))
    rank = _rank(VIEW)
    if grants.all_rank >= rank:
        return True
    if node is None:
        return False
    return grants.nodes.get(node.pk, 0) >= rank or _node_matches_tags(node, grants, rank)


def subscription_teams(user) -> QuerySet:
    """Teams whose notification subscriptions ``user`` may manage: every team with ``MANAGE_TEAMS``, else the
    teams ``user`` belongs to that hold an admin grant (the team's admins)."""
    from .models import Team

    if may(user, MANAGE_TEAMS):
        return Team.objects.all()
    if not _active(user):
        return Team.objects.none()
    return Team.objects.filter(members=user.pk, grants__role=Grant.Role.ADMIN).distinct()


def require_subscriptions(user, team, *, event: str) -> None:
    """Refuse with 403 (audited as ``event``, outcome denied) unless ``user`` may manage ``team``'s subscriptions."""
    if subscription_teams(user).filter(pk=team.pk).exists():
        return
    _refuse(
        user,
        event,
        f"You may not manage the notifications of team {team.name}.",
        actor_kind=None,
        obj=team,
        object_type="",
        required="team admin or " + MANAGE_TEAMS,
    )
