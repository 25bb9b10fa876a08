"""The deployment state machine: every change of a deployment's status, one function each.

    (request) ──> queued ──claim──> running ──finish──> succeeded | failed | error | cancelled | interrupted
                    │                  │                 | unhealthy | rolled_back  (health checks, magic rollback)
                    └──cancel──> cancelled   └──reap (no heartbeat)──> interrupted
    interrupted ──reconcile (what the node says)──> succeeded | failed | error | rolled_back

Each transition is the same three steps: a conditional UPDATE that only
succeeds from the expected status (so two workers, a cancel and a reaper can
race safely), the audit event in the same transaction, then a notify so open
log pages refresh.  No other module writes ``Deployment.status``.

A deployment of a rollout is written here too (``queue_in_rollout``: queued, or
``cancelled`` at once when its node is busy); whenever one ends, its rollout is
told after commit (``_rollout_node_ended``) so it starts its next nodes or finishes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import logstream, repos
from .access import gate
from .audit.writer import record
from .dbretry import retrying
from .errors import NodeBusy, RequestError
from .health import rolled_back_message
from .models import Deployment, Node, Rollout
from .remote import RemoteError, RunReport, resolve_path
from .remote import reconcile_run as remote_reconcile_run
from .remote.build import ACTIVATE_ACTIONS
from .remote.confirm import parse_magic
from .validators import validate_revision

Status = Deployment.Status


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@retrying  # a database blip must not lose a deployment's end (or claim): the UPDATE is conditional
def _transition(
    deployment_id: int,
    *,
    expect: dict,
    event: str,
    set_fields: dict,
    details=None,
    actor_kind: str = "system",
    user=None,
    outcome: str = "success",
    also: Callable[[Deployment], tuple[str, ...]] | None = None,
) -> Deployment | None:
    """UPDATE the row if it still matches ``expect``; if it did, record ``event`` (and the events ``also``
    names for the changed row, with the same details).  The row, or None if not."""
    with transaction.atomic():
        if not Deployment.objects.filter(pk=deployment_id, **expect).update(**set_fields):
            return None
        deployment = Deployment.objects.select_related("node").get(pk=deployment_id)
        record(
            event,
            user=user,
            actor_kind=None if user else actor_kind,
            obj=deployment,
            node=deployment.node,
            outcome=outcome,
            details=details(deployment) if callable(details) else (details or {}),
        )
        for extra in also(deployment) if also else ():
            record(
                extra,
                user=user,
                actor_kind=None if user else actor_kind,
                obj=deployment,
                node=deployment.node,
                outcome="failure",
                details=_finished_details(deployment),
            )
    return deployment


def request_deployment(
    node: Node,
    *,
    action: str,
    revision: str = "",
    user=None,
    trigger: str = Deployment.Trigger.WEB,
    timeout_seconds: int | None = None,
    approval=None,
    kind: str = Deployment.Kind.REBUILD,
    diff_of: Deployment | None = None,
) -> Deployment:
    """Resolve ``revision`` to a commit and queue ``nixos-rebuild <action>`` on ``node``.

    ``kind`` "diff" builds and compares without switching; "activate" switches to the system ``diff_of``
    built (``change.confirm_diff``).

    ``timeout_seconds``: how long the run may take on the node (None: the panel's default).
    A node carrying a protected tag is not deployed: the request is held as an approval request
    (``AwaitingApproval`` is raised, nothing queued); ``approval`` is that request once a second
    person approved it, whose pinned commit is then deployed.

    ``user=None`` means the system acts (only management commands do that).
    The gate decides first (403, audited).  Raises ``NodeBusy`` if the node
    already has an active deployment, ``RequestError`` for an unknown action or
    revision or an unpinned host key.
    """
    actor_kind = "cli" if trigger == Deployment.Trigger.CLI else None
    gate.require(user, gate.DEPLOY, node, event="deployment.requested", actor_kind=actor_kind)
    if action not in Deployment.Action.values:
        raise RequestError(f"Unknown action {action!r}: use one of {', '.join(Deployment.Action.values)}.")
    if kind not in Deployment.Kind.values or (kind == Deployment.Kind.ACTIVATE) != (diff_of is not None):
        raise RequestError(f"Unknown kind of deployment {kind!r}.")
    if kind == Deployment.Kind.DIFF and action not in ACTIVATE_ACTIONS:
        raise RequestError(f"The difference is shown before {', '.join(ACTIVATE_ACTIONS)}, not before {action}.")
    if revision:
        try:
            validate_revision(revision)
        except ValidationError as exc:
            raise RequestError(exc.messages[0]) from None
    if not node.host_key:
        raise RequestError(f"Node {node.name} has no pinned host key: scan and pin it first.")
    for hop in node.jump_path() if node.jump_host_id else ():
        if not hop.host_key:
            raise RequestError(f"Jump host {hop.name} of {node.name} has no pinned host key: scan and pin it first.")
    if Deployment.objects.filter(node=node, status__in=Deployment.ACTIVE).exists():
        raise NodeBusy(f"Node {node.name} already has a deployment in progress.")
    try:
        sha = repos.resolve(node.repository, revision)
    except repos.RepositoryError as exc:
        raise RequestError(str(exc)) from None
    # Imported here: the GitOps app builds on this module, not the other way round.
    from .gitops import approvals

    if approval is None and kind != Deployment.Kind.DIFF:  # a diff changes nothing on the node: never held
        approvals.hold_deployment(
            node,
            action=action,
            revision=revision,
            commit=sha,
            user=user,
            trigger=trigger,
            timeout=timeout_seconds,
            kind=kind,
            diff_of=diff_of,
        )
    elif approval is not None:
        sha = approvals.pinned_commit(approval, node.repository)
    acting = user if user is not None and user.is_authenticated else None
    try:
        with transaction.atomic():
            deployment = Deployment.objects.create(
                node=node,
                action=action,
                requested_revision=revision or node.repository.branch,
                commit_sha=sha,
                flake_attr=node.flake_attr,
                requested_by=acting,
                requested_by_name=acting.get_username() if acting else trigger,
                trigger=trigger,
                timeout_seconds=timeout_seconds,
                kind=kind,
                diff_of=diff_of,
            )
            _record_requested(deployment, user=user, actor_kind=actor_kind)
            transaction.on_commit(lambda: enqueue(deployment.pk))
    except IntegrityError:
        if diff_of is not None and Deployment.objects.filter(diff_of=diff_of).exists():
            raise RequestError(f"Deployment #{diff_of.pk} was confirmed already.") from None
        # The database's one-active-deployment constraint caught a race the check above missed.
        raise NodeBusy(f"Node {node.name} already has a deployment in progress.") from None
    return deployment


def _record_requested(deployment: Deployment, *, user, actor_kind: str | None) -> None:
    """The ``deployment.requested`` event of a new row, alone or in a rollout."""
    details = {
        "action": deployment.action,
        "revision": deployment.requested_revision,
        "commit": deployment.commit_sha,
        "flake_attr": deployment.flake_attr,
        "trigger": deployment.trigger,
    }
    if deployment.rollout_id:
        details["rollout"] = deployment.rollout_id
    if deployment.kind != Deployment.Kind.REBUILD:
        details["kind"] = deployment.kind
    if deployment.diff_of_id:
        details["diff_of"] = deployment.diff_of_id
    if deployment.rollout_id or deployment.timeout_seconds:
        details["timeout_seconds"] = deployment.timeout_seconds
    record(
        "deployment.requested", user=user, actor_kind=actor_kind, obj=deployment, node=deployment.node, details=details
    )


def enqueue(deployment_id: int) -> None:
    """Hand the deployment id (only the id) to django-q2."""
    from django_q.tasks import async_task

    async_task(
        "deployments.tasks.run_deployment", deployment_id, task_name=f"deployment-{deployment_id}", ack_failure=True
    )


def cancel_deployment(
    deployment: Deployment, *, user=None, actor_kind: str | None = None, reason: str = ""
) -> Deployment:
    """Cancel a queued deployment now, or ask the worker to stop a running one (it kills the remote tree).

    ``actor_kind="cli"``: the command line asks (the recorded actor when there is no ``user``).
    ``reason`` (a rollout that stopped) becomes a queued one's error message.
    """
    gate.require(user, gate.DEPLOY, deployment.node, event="deployment.cancel", actor_kind=actor_kind)
    cancelled = _transition(
        deployment.pk,
        expect={"status": Status.QUEUED},
        event="deployment.cancelled",
        user=user,
        actor_kind=actor_kind or "system",
        set_fields={
            "status": Status.CANCELLED,
            "finished_at": timezone.now(),
            "cancel_requested": True,
            "error_message": reason,
        },
        details={"was": "queued", **({"reason": reason} if reason else {})},
    )
    _rollout_node_ended(cancelled)
    done = cancelled or _transition(
        deployment.pk,
        expect={"status": Status.RUNNING, "cancel_requested": False},
        event="deployment.cancel_requested",
        user=user,
        actor_kind=actor_kind or "system",
        set_fields={"cancel_requested": True},
    )
    deployment.refresh_from_db()
    if done is None and not deployment.is_active:
        raise RequestError(f"Deployment #{deployment.pk} has already finished.")
    logstream.notify(deployment.pk, {"type": "deployment.status"})
    return deployment


def claim(deployment_id: int) -> bool:
    """queued → running for this worker; False if someone else has it or it was cancelled."""
    now = timezone.now()
    return (
        _transition(
            deployment_id,
            expect={"status": Status.QUEUED},
            event="deployment.started",
            set_fields={"status": Status.RUNNING, "started_at": now, "heartbeat_at": now, "worker": worker_name()},
            details=lambda d: {"worker": d.worker, "commit": d.commit_sha, "action": d.action},
        )
        is not None
    )


def _finished_details(d: Deployment) -> dict:
    return {
        "status": d.status,
        "kind": d.kind,
        **({"target_generation": d.target_generation} if d.kind == Deployment.Kind.ROLLBACK else {}),
        "exit_code": d.exit_code,
        "commit": d.commit_sha,
        "flake_attr": d.flake_attr,
        "action": d.action,
        "toplevel": d.toplevel,
        "generation_before": d.generation_before,
        "generation_after": d.generation_after,
        "system_before": d.system_before,
        "system_after": d.system_after,
        "log_sha256": d.log_sha256,
        "archive_sha256": d.archive_sha256,
        "error": d.error_message[:500],
    }


def _health_events(d: Deployment) -> tuple[str, ...]:
    """The events of an ended deployment's health (``deployments/health.py``): unhealthy and rolled back
    are audited on their own, beside ``deployment.finished``/``deployment.reconciled``."""
    if d.status == Status.UNHEALTHY:
        return ("deployment.unhealthy",)
    if d.status == Status.ROLLED_BACK:
        return (
            ("deployment.unhealthy", "deployment.rolled_back")
            if "health check" in d.error_message
            else ("deployment.rolled_back",)
        )
    return ()


def finish(deployment_id: int, status: str, **fields) -> Deployment:
    """running → a terminal status, with its audit event; a row no longer running is left as it is."""
    if status not in Deployment.TERMINAL:
        raise ValueError(f"finish() needs a terminal status, not {status!r}")
    finished = _transition(
        deployment_id,
        expect={"status": Status.RUNNING},
        event="deployment.finished",
        set_fields={"status": status, "finished_at": timezone.now(), **fields},
        outcome="success" if status == Status.SUCCEEDED else "failure",
        details=_finished_details,
        also=_health_events,
    )
    logstream.notify(deployment_id, {"type": "deployment.status"})
    _rollout_node_ended(finished)
    return Deployment.objects.select_related("node").get(pk=deployment_id)


def reap_stale(stale_after: float | None = None) -> int:
    """Mark running deployments whose worker stopped beating as interrupted (never re-run them)."""
    stale_after = settings.HEARTBEAT_STALE_AFTER if stale_after is None else stale_after
    cutoff = timezone.now() - timedelta(seconds=stale_after)
    count = 0
    for pk in Deployment.objects.filter(status=Status.RUNNING, heartbeat_at__lt=cutoff).values_list("pk", flat=True):
        reaped = _transition(
            pk,
            expect={"status": Status.RUNNING, "heartbeat_at__lt": cutoff},
            event="deployment.interrupted",
            outcome="failure",
            set_fields={
                "status": Status.INTERRUPTED,
                "finished_at": timezone.now(),
                "error_message": f"the worker stopped responding (no heartbeat for {stale_after:.0f} s); "
                "the node may be mid-change: check it and deploy again",
            },
            details=lambda d: {"worker": d.worker, "last_heartbeat": d.heartbeat_at.isoformat()},
        )
        if reaped is not None:
            count += 1
            logstream.notify(pk, {"type": "deployment.status"})
            _rollout_node_ended(reaped)
    return count


# --- reconcile: what became of an interrupted deployment, from the node ---------------------


@dataclass
class Reconciled:
    """What ``reconcile_deployment`` found and recorded."""

    deployment: Deployment
    report: RunReport
    summary: str  # one sentence for people
    final: bool  # the outcome is known now (the run's folder on the node may go)
    running: bool  # the run is still going on the node


def _reconcile_fields(d: Deployment, r: RunReport) -> tuple[dict, str, bool]:
    """(fields to set, summary, final) for what the node says about interrupted ``d``."""
    node_state = f"the node runs generation {r.generation if r.generation is not None else 'none'}" + (
        f" ({r.current_system})" if r.current_system else ""
    )
    now = timezone.now()
    after = {"generation_after": r.generation, "system_after": r.current_system}
    if not r.exists:
        return (
            {"reconciled_at": now},
            f"the node no longer holds the run's folder (rebooted, or cleaned up): what the run did is unknown; "
            f"{node_state}",
            True,
        )
    if r.exit_status is not None:
        ended = f" at {datetime.fromtimestamp(r.ended_at, UTC):%Y-%m-%d %H:%M:%S} UTC" if r.ended_at else ""
        if r.exit_status == 0 and (magic := parse_magic(r.magic)) is not None and magic.rolled_back:
            message = rolled_back_message(magic, d.node.confirm_timeout, r.generation, r.current_system)
            return (
                {
                    "status": Status.ROLLED_BACK if magic.exit_code == 0 else Status.FAILED,
                    "exit_code": 0,
                    "error_message": message + " (recorded by reconcile: the panel had lost sight of the run)",
                    "reconciled_at": now,
                    **after,
                },
                f"the run ended on the node{ended} with exit code 0, then the node {message}",
                True,
            )
        if r.exit_status == 0:
            return (
                {
                    "status": Status.SUCCEEDED,
                    "exit_code": 0,
                    "error_message": "",
                    "toplevel": r.toplevel,
                    "reconciled_at": now,
                    **after,
                },
                f"the run ended on the node{ended} with exit code 0: succeeded; {node_state}",
                True,
            )
        return (
            {
                "status": Status.FAILED,
                "exit_code": r.exit_status,
                "error_message": f"{'rollback' if d.kind == Deployment.Kind.ROLLBACK else 'nixos-rebuild'} "
                f"{d.action} exited with code {r.exit_status} "
                "(recorded by reconcile: the panel had lost sight of the run)",
                "reconciled_at": now,
                **after,
            },
            f"the run ended on the node{ended} with exit code {r.exit_status}: failed; {node_state}",
            True,
        )
    if r.running:
        return {}, f"still running on the node (process group {r.pgid}); {node_state}", False
    if r.pgid is None:
        return (
            {"status": Status.ERROR, "error_message": "nixos-rebuild never started on the node", "reconciled_at": now},
            f"nixos-rebuild never started on the node (the source was still being shipped); {node_state}",
            True,
        )
    return (
        {
            "status": Status.FAILED,
            "error_message": "the run ended on the node without an exit status: it was killed before it finished; "
            "the node may be half-switched: check it and deploy again",
            "reconciled_at": now,
            **after,
        },
        f"the run was killed on the node before it finished (no exit status): failed; {node_state}",
        True,
    )


def reconcile_deployment(
    deployment: Deployment, *, user=None, actor_kind: str | None = None, reconcile_run=None
) -> Reconciled:
    """Ask the node what became of interrupted ``deployment`` and record it: the outcome from the run's
    exit-status file (``succeeded``/``failed``; ``failed`` when it was killed; ``error`` when it never
    started), the generation and ``/run/current-system`` the node now has, and a
    ``deployment.reconciled`` event with before and after.  A run still going is said and left
    interrupted; a folder the node no longer has leaves the outcome unknown.  Once an outcome is
    recorded the run's folder is removed from the node.

    The gate decides first (DEPLOY on the node; refusals audited as ``deployment.reconcile``).  Raises
    ``RequestError`` when the deployment is not interrupted, has no run folder recorded, or the node
    cannot be reached.  ``reconcile_run`` stands in for ``remote.reconcile_run`` in tests.
    """
    from .tasks import target_for  # tasks imports this module

    node = deployment.node
    gate.require(user, gate.DEPLOY, node, event="deployment.reconcile", actor_kind=actor_kind)
    deployment = Deployment.objects.select_related("node__credential").get(pk=deployment.pk)
    if deployment.status != Status.INTERRUPTED:
        raise RequestError(
            f"Deployment #{deployment.pk} is {deployment.status}: only an interrupted deployment is reconciled."
        )
    if not deployment.remote_dir:
        raise RequestError(
            f"Deployment #{deployment.pk} has no run folder on the node recorded: it never reached the node."
        )
    found: dict = {}

    def record_it(report: RunReport) -> bool:
        fields, summary, final = _reconcile_fields(deployment, report)
        before = {k: getattr(deployment, k) for k in ("status", "exit_code", "generation_after", "system_after")}
        done = _transition(
            deployment.pk,
            expect={"status": Status.INTERRUPTED},
            event="deployment.reconciled",
            also=_health_events,
            user=user,
            actor_kind=actor_kind or "system",
            set_fields=fields or {"reconciled_at": deployment.reconciled_at},
            details=lambda d: {
                "summary": summary,
                "before": before,
                "after": {k: getattr(d, k) for k in before},
                "node": {
                    "generation": report.generation,
                    "current_system": report.current_system,
                    "system_profile": report.profile_path,
                },
                "run": {
                    "folder": deployment.remote_dir,
                    "exists": report.exists,
                    "running": report.running,
                    "exit_status": report.exit_status,
                    "ended_at": report.ended_at,
                    "process_group": report.pgid,
                    "unit": report.unit,
                    "stdout_bytes": report.out_size,
                    "stderr_bytes": report.err_size,
                },
            },
        )
        if done is None:
            raise RequestError(f"Deployment #{deployment.pk} was reconciled meanwhile.")
        found.update(deployment=done, summary=summary, final=final, running=report.running and not final)
        return final

    run = reconcile_run or remote_reconcile_run
    try:
        report = run(
            target_for(deployment.node),
            deployment.remote_dir,
            record_it,
            resolve_path(deployment.action, deployment.remote_dir),
        )
    except RemoteError as exc:
        raise RequestError(f"Could not ask {node.name} about deployment #{deployment.pk}: {exc.message}") from None
    logstream.notify(deployment.pk, {"type": "deployment.status"})
    return Reconciled(report=report, **found)


# --- rollouts: their nodes' deployments ----------------------------------------------------


def queue_in_rollout(
    rollout: Rollout, nodes: list[Node], *, timeouts: dict[int, int | None], user=None, actor_kind=None
) -> list[Deployment]:
    """Write the deployments of ``rollout``, one per node of ``nodes`` in that order: ``queued`` at the next
    ``rollout_position`` with its ``deployment.requested`` event, handed to the worker later by the rollout
    (``rollouts.advance_rollout``); or, for a node that already has an active deployment, ``cancelled`` at
    once with the reason and no position (``deployment.skipped``).  ``timeouts``: node id -> seconds.

    Runs inside the rollout's transaction; the gate, the host keys and the commits were checked for the
    whole rollout before.  The rows go in as one bulk insert; a node that became busy since the check
    (the one-active index refuses it) refuses the whole rollout with ``NodeBusy``: try again.
    """
    acting = user if user is not None and user.is_authenticated else None
    busy = dict(
        Deployment.objects.filter(node_id__in=[n.pk for n in nodes], status__in=Deployment.ACTIVE).values_list(
            "node_id", "pk"
        )
    )
    now = timezone.now()
    rows, position = [], 0
    for node in nodes:
        fields = dict(
            node=node,
            action=rollout.action,
            requested_revision=rollout.requested_revision or node.repository.branch,
            commit_sha=rollout.commits[node.repository.name],
            flake_attr=node.flake_attr,
            requested_by=acting,
            requested_by_name=rollout.requested_by_name,
            trigger=rollout.trigger,
            rollout=rollout,
            timeout_seconds=timeouts.get(node.pk),
            created_at=now,
        )
        if node.pk in busy:
            reason = f"not deployed: the node was busy with deployment #{busy[node.pk]}"
            rows.append(Deployment(status=Status.CANCELLED, finished_at=now, error_message=reason, **fields))
        else:
            rows.append(Deployment(rollout_position=position, **fields))
            position += 1
    try:
        with transaction.atomic():  # a savepoint: the one-active index refuses a node that became busy
            created = Deployment.objects.bulk_create(rows, batch_size=500)
    except IntegrityError:
        raise NodeBusy("A node of this rollout became busy while it was being written: try again.") from None
    for d in created:
        if d.status == Status.QUEUED:
            _record_requested(d, user=user, actor_kind=actor_kind)
        else:
            record(
                "deployment.skipped",
                user=user,
                actor_kind=actor_kind,
                obj=d,
                node=d.node,
                outcome="failure",
                details={"rollout": rollout.pk, "busy_with": busy[d.node_id], "commit": d.commit_sha},
            )
    return created


def _rollout_node_ended(deployment: Deployment | None) -> None:
    """A rollout's deployment has ended: after commit, its rollout starts its next nodes or finishes."""
    if deployment is None or not deployment.rollout_id:
        return
    from . import rollouts

    rollout_id = deployment.rollout_id
    transaction.on_commit(lambda: rollouts.node_ended(rollout_id))
