"""Every change to the inventory (nodes, credentials, repositories, host keys, who may use
credentials and repositories), one function each.

Each is atomic and writes its audit event, with what changed, inside the same
transaction.  Views and commands stay thin: they ask the gate, validate input,
and call one of these.  Deployment state changes live in ``lifecycle``.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from .access import gate
from .access.models import CredentialUse, RepositoryUse, Team
from .audit.writer import record
from .errors import RequestError
from .models import Credential, Node, Repository, Tag
from .remote import HostKey, RemoteError
from .remote import scan_host_key as _scan
from .tasks import target_for


def scan_host_key(node: Node, *, user=None) -> HostKey:
    """Fetch the key ``node`` presents now (nothing is pinned); through its jump hosts, if it has any."""
    gate.require(user, gate.ADMIN, node, event="hostkey.scanned")
    try:
        via = target_for(node).via if node.jump_host_id else None
        key = _scan(node.host, node.port, via=via)
    except RemoteError as exc:
        with transaction.atomic():
            record("hostkey.scanned", user=user, obj=node, outcome="failure", details={"error": exc.message})
        raise RequestError(exc.message) from None
    with transaction.atomic():
        record(
            "hostkey.scanned",
            user=user,
            obj=node,
            details={
                "fingerprint": key.fingerprint,
                "key_type": key.key_type,
                "matches_pinned": node.host_key == key.openssh,
            },
        )
    return key


def pin_host_key(node: Node, key_text: str, *, user=None, expected_fingerprint: str | None = None) -> Node:
    """Pin ``key_text`` as the only host key accepted for ``node``.

    With ``expected_fingerprint`` the pin is refused unless the key matches what
    the admin confirmed, so a key swapped between scan and confirm is not pinned.
    """
    gate.require(user, gate.ADMIN, node, event="hostkey.pinned")
    try:
        key = HostKey.parse(key_text)
    except ValueError as exc:
        raise RequestError(f"Not an SSH public key: {exc}") from None
    if expected_fingerprint and key.fingerprint != expected_fingerprint:
        raise RequestError(f"The key is {key.fingerprint}, not the {expected_fingerprint} you confirmed; scan again.")
    with transaction.atomic():
        before = node.host_key_fingerprint
        node.host_key = key.openssh
        node.host_key_fingerprint = key.fingerprint
        node.host_key_pinned_at = timezone.now()
        node.host_key_pinned_by = user if user is not None and user.is_authenticated else None
        node.save(update_fields=["host_key", "host_key_fingerprint", "host_key_pinned_at", "host_key_pinned_by"])
        record(
            "hostkey.pinned",
            user=user,
            actor_kind=None if user else "cli",
            obj=node,
            details={"before": before, "after": node.host_key_fingerprint},
        )
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
    if obj._meta.model_name == "node":
        # The way the panel reaches it, by name: part of every node.changed (before/after).
        data["jump_path"] = [hop.name for hop in obj.jump_path()] if obj.jump_host_id else []
    if isinstance(obj, Repository):
        # A token in a URL stored before URLs were validated must not reach the trail again.
        data["url"] = obj.display_url
    if obj.pk and isinstance(obj, Credential | Repository):
        data["teams"] = _teams_using(obj)
    return data


def _teams_using(obj: Credential | Repository) -> list[str]:
    return sorted(obj.uses.values_list("team__name", flat=True))


def diff(before: dict, after: dict) -> dict:
    return {
        k: {"before": before.get(k), "after": after.get(k)}
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    }


def record_saved(obj, *, user=None, created: bool, before: dict | None = None, actor_kind: str | None = None) -> None:
    """Audit a create/change of an inventory object (call inside its transaction)."""
    after = snapshot(obj)
    details = {"after": after} if created else {"changes": diff(before or {}, after)}
    if obj._meta.model_name == "credential":
        details["secret"] = "set" if created else "unchanged-or-replaced"
    _record(obj, "created" if created else "changed", details, user=user, actor_kind=actor_kind)


def record_deleted(obj, *, user=None, actor_kind: str | None = None) -> None:
    _record(obj, "deleted", {"before": snapshot(obj)}, user=user, actor_kind=actor_kind)


def _record(obj, what: str, details: dict, *, user, actor_kind: str | None) -> None:
    kind = obj._meta.model_name
    node = obj if kind == "node" else None
    record(f"{kind}.{what}", user=user, actor_kind=actor_kind, obj=obj, node=node, details=details)


def save_credential(
    credential: Credential,
    *,
    secret: str | None,
    passphrase: str = "",
    sudo_password: str | None = None,
    user=None,
    actor_kind: str | None = None,
) -> Credential:
    """Create or update a credential; ``secret=None`` keeps the stored one.

    A new secret for an existing credential is a rotation (``credential.rotated``, with the
    fingerprints before and after); the trail says which secrets changed, never what they are.
    """
    created = credential.pk is None
    rotated = bool(secret) and not created
    event = "credential.created" if created else "credential.rotated" if rotated else "credential.changed"
    gate.require_global(user, gate.MANAGE_INVENTORY, event=event, obj=credential, object_type="credential")
    before = {} if created else snapshot(Credential.objects.get(pk=credential.pk))
    if secret:
        credential.set_secret(secret, passphrase)
    elif created:
        raise RequestError("A new credential needs its secret.")
    if sudo_password is not None:
        credential.set_sudo_password(sudo_password)
    with transaction.atomic():
        credential.save()
        after = snapshot(credential)
        details = {"after": after} if created else {"changes": diff(before, after)}
        details["secret"] = "set" if created else "replaced" if rotated else "unchanged"
        if sudo_password is not None:
            details["sudo_password"] = "set" if created else "replaced"
        _record(credential, event.split(".")[1], details, user=user, actor_kind=actor_kind)
    return credential


def _target(node: Node) -> tuple:
    """Where a node's credential and source go: another target is another machine, or another login on it."""
    return (node.host, node.port, node.ssh_user)


def require_node_uses(node: Node, old: Node | None, *, user, actor_kind: str | None = None) -> None:
    """403 (audited) unless ``user`` may use what ``node`` will receive.

    Attaching a credential or repository needs its use; so does pointing a node that has them at
    another host, port or SSH user, since that machine then gets the secret (and the sudo password)
    or the source.  Other edits of a node keep what a superuser attached.
    """
    moved = old is None or _target(old) != _target(node)
    if moved or old.credential_id != node.credential_id:
        gate.require_use(user, node.credential, node=node, actor_kind=actor_kind)
    if moved or old.repository_id != node.repository_id:
        gate.require_use(user, node.repository, node=node, actor_kind=actor_kind)
    if node.jump_host_id is not None and (old is None or old.jump_host_id != node.jump_host_id):
        # The panel logs in to every bastion on the way with its credential: the whole new way is asked.
        gate.require_jump_through(user, _jump_path(node), node=node, actor_kind=actor_kind)


def _jump_path(node: Node) -> list[Node]:
    """``node.jump_path()``, a refused chain (itself, a cycle, too long) as a RequestError."""
    try:
        return node.jump_path()
    except ValidationError as exc:
        raise RequestError(" ".join(exc.messages)) from None


def save_object(obj, *, user=None, actor_kind: str | None = None, tags: list[str] | None = None):
    """Create or update a node or repository (already validated) with its audit event.

    A node's credential and repository must be usable by ``user`` (``require_node_uses``); a node
    moved to another host, port or SSH user loses its pinned host key: pinning it again is an
    explicit, audited step, and deploying waits for it.
    """
    created = obj.pk is None
    before = {} if created else snapshot(type(obj).objects.get(pk=obj.pk))
    old = None if created or not isinstance(obj, Node) else Node.objects.get(pk=obj.pk)
    if isinstance(obj, Node):
        # Before the transaction: a refusal's audit event must outlive the rollback of the change.
        require_node_uses(obj, old, user=user, actor_kind=actor_kind)
    with transaction.atomic():
        if isinstance(obj, Node) and obj.jump_host_id is not None:
            _jump_path(obj)  # again inside the transaction: no cycle slips in beside a concurrent edit
        if old is not None and _target(old) != _target(obj):
            obj.host_key = obj.host_key_fingerprint = ""
            obj.host_key_pinned_at = None
            obj.host_key_pinned_by = None
        obj.save()
        if tags is not None:
            obj.tags.set([Tag.objects.get_or_create(name=t)[0] for t in tags])
        record_saved(obj, user=user, created=created, before=before, actor_kind=actor_kind)
    return obj


def delete_object(obj, *, user=None, actor_kind: str | None = None) -> None:
    with transaction.atomic():
        record_deleted(obj, user=user, actor_kind=actor_kind)
        obj.delete()


# --- credentials and repositories: deleting, and who may use them ----------------


def users_of(obj: Credential | Repository) -> list[str]:
    """What still uses ``obj``, as "node web1" / "repository fleet" (its deploy key), sorted."""
    using = [f"node {n}" for n in obj.nodes.order_by("name").values_list("name", flat=True)]
    if isinstance(obj, Credential):
        repos = Repository.objects.filter(deploy_key=obj).order_by("name").values_list("name", flat=True)
        using += [f"repository {r}" for r in repos]
    return using


def delete_unused(obj: Credential | Repository, *, user=None, actor_kind: str | None = None) -> None:
    """Delete a credential or repository nothing uses; RequestError naming what still uses it."""
    kind = obj._meta.model_name
    gate.require_global(user, gate.MANAGE_INVENTORY, event=f"{kind}.deleted", obj=obj, object_type=kind)
    with transaction.atomic():
        using = users_of(obj)
        if using:
            shown = ", ".join(using[:10]) + (f" and {len(using) - 10} more" if len(using) > 10 else "")
            raise RequestError(f"{obj.name} is still used by {shown}: point them elsewhere first.")
        record_deleted(obj, user=user, actor_kind=actor_kind)
        obj.delete()


_USE_MODELS = {Credential: CredentialUse, Repository: RepositoryUse}


def grant_use(obj: Credential | Repository, team: Team, *, user=None) -> None:
    """Let ``team`` use ``obj``: its node admins may attach it to the nodes they administer."""
    _change_use(obj, team, "use_granted", lambda uses, match: uses.get_or_create(**match)[1], user=user)


def revoke_use(obj: Credential | Repository, team: Team, *, user=None) -> None:
    """Take the use of ``obj`` from ``team``.  Nodes it is attached to keep it: detaching is an edit of each node."""
    _change_use(obj, team, "use_revoked", lambda uses, match: uses.filter(**match).delete()[0], user=user)


def _change_use(obj, team: Team, what: str, change, *, user) -> None:
    """Gate, then ``change`` the use rows of (team, obj) and, if it changed anything, record ``<kind>.<what>``."""
    kind = obj._meta.model_name
    gate.require_global(user, gate.MANAGE_TEAMS, event=f"{kind}.{what}", obj=obj, object_type=kind)
    with transaction.atomic():
        before = _teams_using(obj)
        if change(_USE_MODELS[type(obj)].objects, {"team": team, kind: obj}):
            details = {"team": team.name, "before": before, "after": _teams_using(obj)}
            _record(obj, what, details, user=user, actor_kind=None)


# --- health checks and magic rollback (deployments/health.py runs them) ----------------------------


def save_health_check(check, *, user=None, actor_kind: str | None = None):
    """Create or update a node's or tag's health check (already validated), audited with before/after.

    The gate decides first: node admins for a node's checks; inventory managers for a tag's, and for a
    tag's command check also admin of every node carrying the tag (``gate.require_check_change``)."""
    from .healthchecks import HealthCheck

    created = check.pk is None
    old = None if created else HealthCheck.objects.get(pk=check.pk)
    # The owner before and after: moving a check is changing both.
    for owner in ([old] if old is not None else []) + [check]:
        gate.require_check_change(
            user,
            node=owner.node if owner.node_id else None,
            tag=owner.tag if owner.tag_id else None,
            command=owner.kind == HealthCheck.Kind.COMMAND,
            event="health_check.change",
            actor_kind=actor_kind,
        )
    with transaction.atomic():
        if created and user is not None and user.is_authenticated:
            check.created_by = user
        check.save()
        record(
            "health_check.created" if created else "health_check.changed",
            user=user,
            actor_kind=actor_kind,
            obj=check,
            node=check.node if check.node_id else None,
            details={"after": check.details(), **({} if created else {"before": old.details()})},
        )
    return check


def delete_health_check(check, *, user=None, actor_kind: str | None = None) -> None:
    from .healthchecks import HealthCheck

    gate.require_check_change(
        user,
        node=check.node if check.node_id else None,
        tag=check.tag if check.tag_id else None,
        command=check.kind == HealthCheck.Kind.COMMAND,
        event="health_check.change",
        actor_kind=actor_kind,
    )
    with transaction.atomic():
        record(
            "health_check.deleted",
            user=user,
            actor_kind=actor_kind,
            obj=check,
            node=check.node if check.node_id else None,
            details={"before": check.details()},
        )
        check.delete()


def set_confirm_timeout(node: Node, seconds: int, *, user=None, actor_kind: str | None = None) -> Node:
    """Set the node's magic-rollback deadline (0: off), audited as ``node.changed`` with before/after."""
    gate.require(user, gate.ADMIN, node, event="node.changed", actor_kind=actor_kind)
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 <= seconds <= 3600:
        raise RequestError("The confirmation deadline is 0 (off) to 3600 seconds.")
    with transaction.atomic():
        before = Node.objects.get(pk=node.pk).confirm_timeout
        Node.objects.filter(pk=node.pk).update(confirm_timeout=seconds)
        node.confirm_timeout = seconds
        record(
            "node.changed",
            user=user,
            actor_kind=actor_kind,
            obj=node,
            node=node,
            details={"before": {"confirm_timeout": before}, "after": {"confirm_timeout": seconds}},
        )
    return node
