"""Going back to an earlier generation, as a deployment of its own (``Deployment.kind == "rollback"``).

A rollback is an ordinary deployment in every way the panel cares about: the gate (DEPLOY on the node),
the node's one-active lock, the queue, claim, log, cancel, timeout, reap and reconcile are the same
(``lifecycle``, ``tasks``).  What differs is what runs on the node (``remote.generations.run_rollback``:
``nix-env --rollback`` or ``--switch-generation N``, then ``switch-to-configuration switch|boot``; no
source, no build) and what is recorded: ``target_generation`` (as asked, then the one the node went to)
and ``commit_sha``, the commit of the deployment that made that generation ('' when no panel deployment
did: the node was changed outside the panel, or before it).
"""

from __future__ import annotations

from django.db import IntegrityError, transaction

from . import generations
from .access import gate
from .audit.writer import record
from .errors import NodeBusy, RequestError
from .models import Deployment, Node, NodeGenerations
from .remote.connection import Target
from .remote.generations import ROLLBACK_ACTIONS, Generations, RollbackResult, check_generation, run_rollback

Kind = Deployment.Kind


def request_rollback(
    node: Node,
    *,
    generation: int | None = None,
    action: str = "switch",
    user=None,
    trigger: str = Deployment.Trigger.WEB,
    timeout_seconds: int | None = None,
    approval=None,
) -> Deployment:
    """Queue going back to ``generation`` (None: the previous one) on ``node``, then ``action``
    (``switch``: run it now and boot it; ``boot``: boot it next time, the running system unchanged).

    The gate decides first (DEPLOY; a refusal is 403 and ``deployment.requested`` with outcome denied).
    On a node with a protected tag the request is held for approval (``AwaitingApproval``, nothing
    queued) unless ``approval`` is the approved request coming back.
    ``RequestError`` for a bad generation or action or an unpinned host key, ``NodeBusy`` when the node has
    an active deployment.  The row (``queued``, the model's default) and its event are one transaction;
    only the id goes to the queue, after commit.  Whether the generation exists is the node's to say, when
    the rollback runs (nothing changes if it does not).
    """
    from .lifecycle import enqueue

    actor_kind = "cli" if trigger == Deployment.Trigger.CLI else None
    gate.require(user, gate.DEPLOY, node, event="deployment.requested", actor_kind=actor_kind)
    if action not in ROLLBACK_ACTIONS:
        raise RequestError(f"Unknown rollback action {action!r}: use one of {', '.join(ROLLBACK_ACTIONS)}.")
    try:
        check_generation(generation)
    except ValueError:
        raise RequestError(f"Invalid generation {generation!r}: give a generation number (1 or more).") from None
    if not node.host_key:
        raise RequestError(f"Node {node.name} has no pinned host key: scan and pin it first.")
    commit = generations.commit_of(node, generation, _last_read_path(node, generation)) if generation else ""
    if approval is None:
        # Going back changes the node as a deploy does: a protected node holds it for a second person
        # (AwaitingApproval, nothing queued); the approval comes back here with ``approval``.
        from .gitops import approvals

        approvals.hold_rollback(
            node,
            generation=generation,
            action=action,
            commit=commit,
            user=user,
            trigger=trigger,
            timeout=timeout_seconds,
        )
    if Deployment.objects.filter(node=node, status__in=Deployment.ACTIVE).exists():
        raise NodeBusy(f"Node {node.name} already has a deployment in progress.")
    acting = user if user is not None and user.is_authenticated else None
    try:
        with transaction.atomic():
            deployment = Deployment.objects.create(
                node=node,
                kind=Kind.ROLLBACK,
                action=action,
                target_generation=generation,
                commit_sha=commit,
                flake_attr=node.flake_attr,
                requested_by=acting,
                requested_by_name=acting.get_username() if acting else trigger,
                trigger=trigger,
                timeout_seconds=timeout_seconds,
            )
            record(
                "deployment.requested",
                user=user,
                actor_kind=actor_kind,
                obj=deployment,
                node=node,
                details={
                    "kind": Kind.ROLLBACK,
                    "action": action,
                    "generation": generation if generation is not None else "previous",
                    "commit": commit,
                    "trigger": trigger,
                    **({"timeout_seconds": timeout_seconds} if timeout_seconds else {}),
                    **({"approval": approval.pk} if approval is not None else {}),
                },
            )
            transaction.on_commit(lambda: enqueue(deployment.pk))
    except IntegrityError:
        # The one-active-deployment constraint caught a race the check above missed.
        raise NodeBusy(f"Node {node.name} already has a deployment in progress.") from None
    return deployment


def _last_read_path(node: Node, number: int) -> str:
    """The store path of generation ``number`` in the node's last read ('' if not known)."""
    read = NodeGenerations.objects.filter(node=node, read_at__isnull=False).first()
    found = Generations.from_dict(read.data).get(number) if read else None
    return found.path if found else ""


def describe(deployment: Deployment) -> str:
    """``rollback to generation N (switch)`` / ``rollback to the previous generation (boot)``."""
    n = deployment.target_generation
    return f"rollback to {'the previous generation' if n is None else f'generation {n}'} ({deployment.action})"


def run_on_node(
    deployment: Deployment, target: Target, *, on_output, runner=run_rollback, **kwargs
) -> tuple[RollbackResult, dict]:
    """Run the rollback on the node (``runner``'s other keyword arguments: should_cancel, on_workdir);
    return its result and what ``lifecycle.finish`` records beside a rebuild's fields: the generation it
    went to and the commit of the deployment that made it."""
    result = runner(
        target,
        deployment_id=deployment.pk,
        generation=deployment.target_generation,
        action=deployment.action,
        on_output=on_output,
        **kwargs,
    )
    number = result.generation or deployment.target_generation
    commit = (
        generations.commit_of(deployment.node, result.generation, result.generation_path)
        if result.generation
        else deployment.commit_sha
    )
    on_output(
        "sys",
        f"generation {number} was made by "
        + (f"a panel deployment of commit {commit}" if commit else "no panel deployment (its commit is unknown)"),
    )
    return result, {"target_generation": number, "commit_sha": commit}
