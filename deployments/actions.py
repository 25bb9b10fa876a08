"""Every state change of the panel, one function each.

Each is atomic, writes its audit event inside the same transaction, and
queues work only after commit.  Views and commands stay thin: they check
permission, validate input, and call one of these.
"""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import repos
from .audit.writer import record
from .models import Credential, Deployment, Node, host_key_fingerprint
from .permissions import ADMIN, DEPLOY, can
from .remote.ssh import HostKey, RemoteError
from .remote.ssh import scan_host_key as _scan
from .validators import validate_revision

log = logging.getLogger(__name__)


class ActionError(Exception):
    """A request that cannot be carried out; the message is shown to the user as is."""


class NodeBusy(ActionError):
    pass


def require_permission(user, action: str, node: Node, *, audit_action: str, actor_kind: str | None = None) -> None:
    """Refuse (and audit the refusal) when ``user`` may not do ``action`` to ``node``."""
    if user is None or can(user, action, node):
        return
    with transaction.atomic():
        record(audit_action, user=user, actor_kind=actor_kind, obj=node, outcome="denied",
               details={"required": action})
    raise PermissionDenied(f"You may not {action} on {node.name}.")


def request_deployment(
    node: Node, *, action: str, revision: str = "", user=None, trigger: str = Deployment.Trigger.WEB
) -> Deployment:
    """Resolve ``revision`` to a commit and queue ``nixos-rebuild <action>`` on ``node``.

    ``user=None`` means the system acts (only management commands do that).
    Raises ``NodeBusy`` if the node already has an active deployment,
    ``ActionError`` for an unknown revision or unpinned host key.
    """
    actor_kind = "cli" if trigger == Deployment.Trigger.CLI else None
    require_permission(user, DEPLOY, node, audit_action="deployment.requested", actor_kind=actor_kind)
    if action not in Deployment.Action.values:
        raise ActionError(f"Unknown action {action!r}: use one of {', '.join(Deployment.Action.values)}.")
    if revision:
        try:
            validate_revision(revision)
        except ValidationError as exc:
            raise ActionError(exc.messages[0]) from None
    if not node.host_key:
        raise ActionError(f"Node {node.name} has no pinned host key: scan and pin it first.")
    if Deployment.objects.filter(node=node, status__in=Deployment.ACTIVE).exists():
        raise NodeBusy(f"Node {node.name} already has a deployment in progress.")
    try:
        sha = repos.resolve(node.repository, revision)
    except repos.RepositoryError as exc:
        raise ActionError(str(exc)) from None
    try:
        with transaction.atomic():
            deployment = Deployment.objects.create(
                node=node,
                action=action,
                requested_revision=revision or node.repository.branch,
                commit_sha=sha,
                flake_attr=node.flake_attr,
                requested_by=user if user is not None and user.is_authenticated else None,
                requested_by_name=user.get_username() if user is not None and user.is_authenticated else trigger,
                trigger=trigger,
            )
            record(
                "deployment.requested", user=user, actor_kind=actor_kind, obj=deployment, node=node,
                details={"action": action, "revision": deployment.requested_revision, "commit": sha,
                         "flake_attr": node.flake_attr, "trigger": trigger},
            )
            transaction.on_commit(lambda: enqueue(deployment.pk))
    except IntegrityError:
        # The database's one-active-deployment constraint caught a race the check above missed.
        raise NodeBusy(f"Node {node.name} already has a deployment in progress.") from None
    return deployment


def enqueue(deployment_id: int) -> None:
    """Hand the deployment id (only the id) to django-q2."""
    from django_q.tasks import async_task

    async_task(
        "deployments.tasks.run_deployment", deployment_id,
        task_name=f"deployment-{deployment_id}", ack_failure=True,
    )


def cancel_deployment(deployment: Deployment, *, user=None) -> Deployment:
    """Cancel a queued deployment now, or ask the worker to stop a running one."""
    require_permission(user, DEPLOY, deployment.node, audit_action="deployment.cancel")
    with transaction.atomic():
        now = timezone.now()
        if Deployment.objects.filter(pk=deployment.pk, status=Deployment.Status.QUEUED).update(
            status=Deployment.Status.CANCELLED, finished_at=now, cancel_requested=True
        ):
            record("deployment.cancelled", user=user, obj=deployment, node=deployment.node,
                   details={"was": "queued"})
        elif Deployment.objects.filter(pk=deployment.pk, status=Deployment.Status.RUNNING).update(
            cancel_requested=True
        ):
            record("deployment.cancel_requested", user=user, obj=deployment, node=deployment.node)
        else:
            raise ActionError(f"Deployment #{deployment.pk} has already finished.")
    deployment.refresh_from_db()
    return deployment


def scan_host_key(node: Node, *, user=None) -> HostKey:
    """Fetch the key ``node`` presents now (nothing is pinned)."""
    require_permission(user, ADMIN, node, audit_action="hostkey.scanned")
    try:
        key = _scan(node.host, node.port)
    except RemoteError as exc:
        with transaction.atomic():
            record("hostkey.scanned", user=user, obj=node, outcome="failure", details={"error": exc.message})
        raise ActionError(exc.message) from None
    with transaction.atomic():
        record("hostkey.scanned", user=user, obj=node,
               details={"fingerprint": key.fingerprint, "key_type": key.key_type,
                        "matches_pinned": node.host_key == key.openssh})
    return key


def pin_host_key(node: Node, key_text: str, *, user=None, expected_fingerprint: str | None = None) -> Node:
    """Pin ``key_text`` as the only host key accepted for ``node``.

    With ``expected_fingerprint`` the pin is refused unless the key matches what
    the admin confirmed, so a key swapped between scan and confirm is not pinned.
    """
    require_permission(user, ADMIN, node, audit_action="hostkey.pinned")
    try:
        key = HostKey.parse(key_text)
    except ValueError as exc:
        raise ActionError(f"Not an SSH public key: {exc}") from None
    if expected_fingerprint and key.fingerprint != expected_fingerprint:
        raise ActionError(
            f"The key is {key.fingerprint}, not the {expected_fingerprint} you confirmed; scan again."
        )
    with transaction.atomic():
        before = node.host_key_fingerprint
        node.host_key = key.openssh
        node.host_key_fingerprint = host_key_fingerprint(key.openssh)
        node.host_key_pinned_at = timezone.now()
        node.host_key_pinned_by = user if user is not None and user.is_authenticated else None
        node.save(update_fields=["host_key", "host_key_fingerprint", "host_key_pinned_at", "host_key_pinned_by"])
        record("hostkey.pinned", user=user, actor_kind=None if user else "cli", obj=node,
               details={"before": before, "after": node.host_key_fingerprint})
    return node


# --- inventory changes -------------------------------------------------------

SECRET_FIELDS = {"secret_encrypted", "passphrase_encrypted", "sudo_password_encrypted"}


def snapshot(obj) -> dict:
    """Non-secret field values of ``obj`` for before/after in the audit trail."""
    data = {}
    for field in obj._meta.concrete_fields:
        if field.name in SECRET_FIELDS or field.name in ("created_at", "updated_at"):
            continue
        value = getattr(obj, field.attname)
        data[field.attname] = value.isoformat() if hasattr(value, "isoformat") else value
    if obj.pk and obj._meta.model_name == "node":
        data["tags"] = sorted(obj.tags.values_list("name", flat=True))
    return data


def diff(before: dict, after: dict) -> dict:
    return {k: {"before": before.get(k), "after": after.get(k)} for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)}


def record_saved(obj, *, user=None, created: bool, before: dict | None = None, actor_kind: str | None = None) -> None:
    """Audit a create/change of an inventory object (call inside its transaction)."""
    after = snapshot(obj)
    kind = obj._meta.model_name
    details = {"after": after} if created else {"changes": diff(before or {}, after)}
    if kind == "credential":
        details["secret"] = "set" if created else "unchanged-or-replaced"
    record(f"{kind}.{'created' if created else 'changed'}", user=user, actor_kind=actor_kind, obj=obj,
           node=obj if kind == "node" else None, details=details)


def record_deleted(obj, *, user=None, actor_kind: str | None = None) -> None:
    kind = obj._meta.model_name
    record(f"{kind}.deleted", user=user, actor_kind=actor_kind, obj=obj,
           node=obj if kind == "node" else None, details={"before": snapshot(obj)})


def save_credential(credential: Credential, *, secret: str | None, passphrase: str = "", sudo_password: str | None = None,
                    user=None, actor_kind: str | None = None) -> Credential:
    """Create or update a credential; ``secret=None`` keeps the stored one."""
    created = credential.pk is None
    before = {} if created else snapshot(Credential.objects.get(pk=credential.pk))
    if secret:
        credential.set_secret(secret, passphrase)
    elif created:
        raise ActionError("A new credential needs its secret.")
    if sudo_password is not None:
        credential.set_sudo_password(sudo_password)
    with transaction.atomic():
        credential.save()
        record_saved(credential, user=user, created=created, before=before, actor_kind=actor_kind)
    return credential


def save_object(obj, *, user=None, actor_kind: str | None = None, tags: list[str] | None = None):
    """Create or update a node or repository (already validated) with its audit event."""
    from .models import Tag

    created = obj.pk is None
    before = {} if created else snapshot(type(obj).objects.get(pk=obj.pk))
    with transaction.atomic():
        if not created and isinstance(obj, Node):
            old = Node.objects.get(pk=obj.pk)
            if (old.host, old.port) != (obj.host, obj.port):
                # A different address is a different machine: its key must be pinned again.
                obj.host_key = obj.host_key_fingerprint = ""
                obj.host_key_pinned_at = None
        obj.save()
        if tags is not None:
            obj.tags.set([Tag.objects.get_or_create(name=t)[0] for t in tags])
        record_saved(obj, user=user, created=created, before=before, actor_kind=actor_kind)
    return obj


def delete_object(obj, *, user=None, actor_kind: str | None = None) -> None:
    with transaction.atomic():
        record_deleted(obj, user=user, actor_kind=actor_kind)
        obj.delete()


