"""Approvals for protected tags: a deployment or rollout touching a node that carries a protected tag is
held as an ``ApprovalRequest`` (``awaiting approval``) until a second person decides.

    (request) ──hold──> pending ──approve (not the requester; DEPLOY on every node)──> approved ──> requested
                           ├──reject──> rejected
                           └──(the branch moved | older than PANEL_APPROVAL_MAX_AGE)──> expired

``lifecycle.request_deployment`` and ``rollouts.request_rollout`` call ``hold_deployment`` /
``hold_rollout`` after their own checks (gate, options, host keys, the commit resolved): a held request
raises ``AwaitingApproval`` and writes nothing else.  An approval then requests it again *as the
requester*, through the same functions, with ``approval=`` so it is not held twice and deploys the commits
pinned when it was asked (``pinned_commit``).  Each decision is a conditional UPDATE from ``pending`` with
its audit event, in one transaction with the deployment or rollout it starts: if that cannot start
(busy node, the requester lost their rights), nothing is decided and the request stays pending.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from deployments import repos
from deployments.access import gate
from deployments.audit.writer import record
from deployments.errors import AwaitingApproval, RequestError
from deployments.models import Deployment, Node, Repository
from deployments.validators import validate_comment

from .models import ApprovalRequest

Status = ApprovalRequest.Status


def protected_nodes(nodes: list[Node]) -> QuerySet[Node]:
    """Those of ``nodes`` that carry a protected tag (one query)."""
    return Node.objects.filter(pk__in=[n.pk for n in nodes], tags__protection__isnull=False).distinct()


def _actor_kind(trigger: str) -> str | None:
    return "cli" if trigger == Deployment.Trigger.CLI else None


def _hold(*, kind: str, nodes: list[Node], action: str, revision: str, commits: dict, params: dict, user, trigger):
    acting = user if user is not None and user.is_authenticated else None
    protected = sorted(
        Node.tags.through.objects.filter(node_id__in=[n.pk for n in nodes], tag__protection__isnull=False)
        .values_list("tag__name", flat=True)
        .distinct()
    )
    with transaction.atomic():
        approval = ApprovalRequest.objects.create(
            kind=kind,
            action=action,
            revision=revision,
            commits=commits,
            params=params,
            requested_by=acting,
            requested_by_name=acting.get_username() if acting else trigger,
            trigger=trigger,
        )
        approval.nodes.set(nodes)
        names = sorted(n.name for n in nodes)
        record(
            "approval.requested",
            user=user,
            actor_kind=_actor_kind(trigger),
            obj=approval,
            node=nodes[0] if len(nodes) == 1 else None,
            details={
                "kind": kind,
                "action": action,
                "revision": revision,
                "commits": commits,
                "nodes": names[:50],
                "node_count": len(names),
                "protected_tags": protected,
                "trigger": trigger,
            },
        )
    return approval


def hold_deployment(
    node: Node, *, action: str, revision: str, commit: str, user, trigger: str, timeout, kind: str = "", diff_of=None
) -> None:
    """Raise ``AwaitingApproval`` (after writing the request) if ``node`` carries a protected tag.

    The deployment's kind is kept (an activation of a confirmed diff stays one: the approver approves
    exactly the system that diff built, not a new evaluation)."""
    if not protected_nodes([node]).exists():
        return
    params = {"timeout_seconds": timeout}
    if kind and kind != "rebuild":
        params["kind"] = kind
    if diff_of is not None:
        params["diff_of"] = diff_of.pk
    approval = _hold(
        kind=ApprovalRequest.Kind.DEPLOYMENT,
        nodes=[node],
        action=action,
        revision=revision,
        commits={node.repository.name: commit},
        params=params,
        user=user,
        trigger=trigger,
    )
    raise AwaitingApproval(approval)


def hold_rollback(node: Node, *, generation: int | None, action: str, commit: str, user, trigger: str, timeout) -> None:
    """Raise ``AwaitingApproval`` (after writing the request) if ``node`` carries a protected tag.

    Going back changes the node's system as a deploy does, so a protected node needs the same second
    person. The request keeps the generation (None: the one before the current) and, when a panel
    deployment made it, its commit: the approver sees where the node would go."""
    if not protected_nodes([node]).exists():
        return
    approval = _hold(
        kind=ApprovalRequest.Kind.DEPLOYMENT,
        nodes=[node],
        action=action,
        revision="",
        commits={node.repository.name: commit} if commit else {},
        params={"kind": "rollback", "generation": generation, "timeout_seconds": timeout},
        user=user,
        trigger=trigger,
    )
    raise AwaitingApproval(approval)


def hold_rollout(options, nodes: list[Node], *, commits: dict, user, trigger: str) -> None:
    """Raise ``AwaitingApproval`` (after writing the request) if one of ``nodes`` carries a protected tag.

    The request keeps the nodes themselves, not the selection: an approval deploys what was shown to
    the approver, whatever was tagged since."""
    if not protected_nodes(nodes).exists():
        return
    approval = _hold(
        kind=ApprovalRequest.Kind.ROLLOUT,
        nodes=nodes,
        action=options.action,
        revision=options.revision,
        commits=commits,
        params={
            "selection": options.selection(),
            "parallelism": options.parallelism,
            "max_failures": options.max_failures,
            "canary": options.canary,
            "canary_tag": options.canary_tag,
            "timeout": options.timeout,
            "node_timeouts": options.node_timeouts,
        },
        user=user,
        trigger=trigger,
    )
    raise AwaitingApproval(approval)


def pinned_commit(approval: ApprovalRequest, repository: Repository) -> str:
    """The commit of ``repository`` the approved request pinned; RequestError if it has none."""
    try:
        return approval.commits[repository.name]
    except KeyError:
        raise RequestError(
            f"Approval #{approval.pk} pinned no commit of repository {repository.name}: a node was moved to "
            "another repository since; request it again."
        ) from None


def _comment(comment: str) -> str:
    try:
        validate_comment(comment)
    except ValidationError as exc:
        raise RequestError(exc.messages[0]) from None
    return comment.strip()


def require_decider(approval: ApprovalRequest, user, event: str) -> None:
    gate.require_approver(
        user, approval.nodes.all(), requested_by_id=approval.requested_by_id, event=event, obj=approval
    )


def approve(approval: ApprovalRequest, *, user, comment: str = ""):
    """Approve a pending request and request its deployment or rollout as the requester, pinned to its
    commits.  Returns the Deployment or Rollout.

    The gate first: ``user`` must be a second person with DEPLOY on every node of it (403, audited
    ``approval.approved`` denied).  RequestError when it is no longer pending, the branch moved (it is
    expired then), the requester may no longer deploy there, or the deployment cannot start (busy node).
    """
    require_decider(approval, user, "approval.approved")
    comment = _comment(comment)
    if approval.status != Status.PENDING:
        raise RequestError(f"Approval #{approval.pk} is already {approval.get_status_display().lower()}.")
    if expire_if_stale(approval):
        raise RequestError(f"Approval #{approval.pk} expired: {approval.comment}")
    nodes = approval.nodes.all()
    # Loaded afresh: the gate memoises grants on a user object, and the requester's may have changed.
    requester = get_user_model().objects.filter(pk=approval.requested_by_id).first()
    if requester is None and approval.trigger not in (Deployment.Trigger.CLI, Deployment.Trigger.GITOPS):
        raise RequestError(f"The requester of approval #{approval.pk} no longer exists: request it again.")
    if requester is not None and not gate.can_every(requester, gate.DEPLOY, nodes):
        raise RequestError(f"{approval.requested_by_name} may no longer deploy every node of it: request it again.")
    with transaction.atomic():
        if not ApprovalRequest.objects.filter(pk=approval.pk, status=Status.PENDING).update(
            status=Status.APPROVED,
            decided_by=user,
            decided_by_name=user.get_username(),
            decided_at=timezone.now(),
            comment=comment,
        ):
            raise RequestError(f"Approval #{approval.pk} was decided meanwhile.")
        approval.refresh_from_db()
        record(
            "approval.approved",
            user=user,
            obj=approval,
            node=nodes[0] if approval.kind == ApprovalRequest.Kind.DEPLOYMENT else None,
            details={"comment": comment, "requested_by": approval.requested_by_name, "commits": approval.commits},
        )
        result = _request(approval, requester)
    return result


def _request(approval: ApprovalRequest, requester):
    # Imported here: lifecycle and rollouts import this module at call time too.
    from deployments import lifecycle, rollouts

    if approval.kind == ApprovalRequest.Kind.DEPLOYMENT and approval.is_rollback:
        from deployments import rollbacks

        deployment = rollbacks.request_rollback(
            approval.nodes.get(),
            generation=approval.params.get("generation"),
            action=approval.action,
            user=requester,
            trigger=approval.trigger,
            timeout_seconds=approval.params.get("timeout_seconds"),
            approval=approval,
        )
        ApprovalRequest.objects.filter(pk=approval.pk).update(deployment=deployment)
        return deployment
    if approval.kind == ApprovalRequest.Kind.DEPLOYMENT:
        from deployments.models import Deployment

        diff_of = approval.params.get("diff_of")
        deployment = lifecycle.request_deployment(
            approval.nodes.get(),
            action=approval.action,
            revision=approval.revision,
            user=requester,
            trigger=approval.trigger,
            timeout_seconds=approval.params.get("timeout_seconds"),
            approval=approval,
            kind=approval.params.get("kind", Deployment.Kind.REBUILD),
            diff_of=Deployment.objects.get(pk=diff_of) if diff_of else None,
        )
        ApprovalRequest.objects.filter(pk=approval.pk).update(deployment=deployment)
        return deployment
    p = approval.params
    options = rollouts.Options(
        action=approval.action,
        revision=approval.revision,
        nodes=sorted(approval.nodes.values_list("name", flat=True)),
        parallelism=p.get("parallelism", rollouts.DEFAULT_PARALLELISM),
        max_failures=p.get("max_failures"),
        canary=p.get("canary", 0),
        canary_tag=p.get("canary_tag", ""),
        timeout=p.get("timeout"),
        node_timeouts=p.get("node_timeouts", {}),
    )
    rollout = rollouts.request_rollout(options, user=requester, trigger=approval.trigger, approval=approval)
    ApprovalRequest.objects.filter(pk=approval.pk).update(rollout=rollout)
    return rollout


def reject(approval: ApprovalRequest, *, user, comment: str = "") -> ApprovalRequest:
    """Reject a pending request (the same second person as ``approve``); nothing starts."""
    require_decider(approval, user, "approval.rejected")
    comment = _comment(comment)
    with transaction.atomic():
        if not ApprovalRequest.objects.filter(pk=approval.pk, status=Status.PENDING).update(
            status=Status.REJECTED,
            decided_by=user,
            decided_by_name=user.get_username(),
            decided_at=timezone.now(),
            comment=comment,
        ):
            raise RequestError(f"Approval #{approval.pk} is no longer pending.")
        approval.refresh_from_db()
        record("approval.rejected", user=user, obj=approval, details={"comment": comment})
    return approval


def expire(approval: ApprovalRequest, reason: str) -> bool:
    """pending → expired (the system acts), audited with the reason; False if it was no longer pending."""
    with transaction.atomic():
        if not ApprovalRequest.objects.filter(pk=approval.pk, status=Status.PENDING).update(
            status=Status.EXPIRED, decided_at=timezone.now(), comment=reason
        ):
            return False
        approval.refresh_from_db()
        record("approval.expired", obj=approval, details={"reason": reason, "commits": approval.commits})
    return True


def expire_if_stale(approval: ApprovalRequest, now: datetime | None = None) -> bool:
    """Expire ``approval`` if it is too old or, pinned to branch heads, one of its branches moved (the
    mirror is fetched).  True if it expired now."""
    now = now or timezone.now()
    if approval.created_at < now - timedelta(seconds=settings.APPROVAL_MAX_AGE):
        return expire(approval, f"waited longer than {settings.APPROVAL_MAX_AGE} s")
    if not approval.pinned_to_branch:
        return False
    for repository in Repository.objects.filter(name__in=list(approval.commits)):
        try:
            head = repos.resolve(repository)
        except repos.RepositoryError as exc:
            raise RequestError(f"{repository.name}: {exc}") from None
        if head != approval.commits[repository.name]:
            return expire(approval, _moved(repository, approval.commits[repository.name], head))
    return False


def _moved(repository: Repository, pinned: str, head: str) -> str:
    return f"branch {repository.branch} of {repository.name} moved from {pinned[:12]} to {head[:12]}"


def expire_moved(repository: Repository, head: str) -> int:
    """Expire the pending branch-head requests that pinned another commit of ``repository``; how many."""
    expired = 0
    for approval in ApprovalRequest.objects.filter(status=Status.PENDING, revision=""):
        if approval.is_rollback:
            continue  # its commit is where the node goes back to, not the branch head
        pinned = approval.commits.get(repository.name)
        if pinned and pinned != head:
            expired += expire(approval, _moved(repository, pinned, head))
    return expired


def expire_old(now: datetime | None = None) -> int:
    """Expire the pending requests older than PANEL_APPROVAL_MAX_AGE; how many."""
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.APPROVAL_MAX_AGE)
    return sum(
        expire(a, f"waited longer than {settings.APPROVAL_MAX_AGE} s")
        for a in ApprovalRequest.objects.filter(status=Status.PENDING, created_at__lt=cutoff)
    )


def decidable(user) -> QuerySet[ApprovalRequest]:
    """Pending requests ``user`` may decide: not their own, DEPLOY on every node (one query)."""
    pending = ApprovalRequest.objects.filter(status=Status.PENDING)
    if user is None or not user.is_authenticated:
        return pending.none()
    return gate.with_every_node(user, gate.DEPLOY, pending.exclude(requested_by=user))


def visible(user) -> QuerySet[ApprovalRequest]:
    """Requests ``user`` may see: those with a node they see (a request is about its nodes)."""
    return ApprovalRequest.objects.filter(nodes__in=gate.visible_nodes(user)).distinct()


def approval_for(user, pk: int) -> ApprovalRequest:
    """The request, or 404 if ``user`` sees none of its nodes."""
    from django.http import Http404

    approval = visible(user).filter(pk=pk).first()
    if approval is None:
        raise Http404("No such approval request.")
    return approval
