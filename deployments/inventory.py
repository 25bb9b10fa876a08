"""Every change to the inventory (nodes, credentials, repositories, host keys), one function each.

Each is atomic and writes its audit event, with what changed, inside the same
transaction.  Views and commands stay thin: they ask the gate, validate input,
and call one of these.  Deployment state changes live in ``lifecycle``.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from .access import gate
from .audit.writer import record
from .errors import RequestError
from .models import Credential, Node, Tag
from .remote import HostKey, RemoteError
from .remote import scan_host_key as _scan


def scan_host_key(node: Node, *, user=None) -> HostKey:
    """Fetch the key ``node`` presents now (nothing is pinned)."""
    gate.require(user, gate.ADMIN, node, event="hostkey.scanned")
    try:
        key = _scan(node.host, node.port)
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
    return data


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
    """Create or update a credential; ``secret=None`` keeps the stored one."""
    created = credential.pk is None
    before = {} if created else snapshot(Credential.objects.get(pk=credential.pk))
    if secret:
        credential.set_secret(secret, passphrase)
    elif created:
        raise RequestError("A new credential needs its secret.")
    if sudo_password is not None:
        credential.set_sudo_password(sudo_password)
    with transaction.atomic():
        credential.save()
        record_saved(credential, user=user, created=created, before=before, actor_kind=actor_kind)
    return credential


def save_object(obj, *, user=None, actor_kind: str | None = None, tags: list[str] | None = None):
    """Create or update a node or repository (already validated) with its audit event."""
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
