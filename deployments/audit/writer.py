"""The one writer of audit events.

``record()`` must run inside the transaction of the change it records, so a
change never lands without its event, nor an event without its change.
Inserts are serialised (an advisory lock on PostgreSQL; SQLite's write lock,
taken at BEGIN IMMEDIATE) so that concurrent writers cannot fork the chain.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from .context import current
from .models import AuditEvent

GENESIS_HASH = "0" * 64
# Arbitrary constant naming the chain's advisory lock on PostgreSQL.
CHAIN_LOCK_KEY = 0x6E69786F73  # "nixos"

HASHED_FIELDS = (
    "seq", "created_at", "actor_kind", "actor_id", "actor_name", "action", "object_type", "object_id",
    "object_repr", "node_id", "node_name", "outcome", "details", "source_ip", "user_agent", "request_id",
)


def canonical(event: dict[str, Any]) -> str:
    """Canonical JSON of an event's hashed fields (sorted keys, no spaces, UTC ISO times)."""
    doc = {}
    for name in HASHED_FIELDS:
        value = event.get(name)
        if name == "created_at" and value is not None and not isinstance(value, str):
            value = value.astimezone(timezone.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        doc[name] = value
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev_hash: str, event: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical(event)).encode()).hexdigest()


def _actor(user, actor_kind: str | None) -> tuple[str, int | None, str]:
    if user is not None and getattr(user, "is_authenticated", False):
        return actor_kind or AuditEvent.ActorKind.USER, user.pk, user.get_username()
    return actor_kind or AuditEvent.ActorKind.SYSTEM, None, "" if actor_kind != "cli" else "cli"


def record(
    action: str,
    *,
    user=None,
    actor_kind: str | None = None,
    obj=None,
    object_type: str = "",
    object_id: str = "",
    object_repr: str = "",
    node=None,
    outcome: str = AuditEvent.Outcome.SUCCESS,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain, inside the caller's transaction.

    ``details`` must never hold secrets; callers pass non-secret fields only.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("audit.record() must run inside the transaction of the change it records")
    ctx = current.get()
    kind, actor_id, actor_name = _actor(user, actor_kind)
    if obj is not None:
        object_type = object_type or obj._meta.model_name
        object_id = object_id or str(obj.pk)
        object_repr = object_repr or str(obj)[:300]
    if node is None and obj is not None and obj._meta.model_name == "node":
        node = obj
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [CHAIN_LOCK_KEY])
        last = AuditEvent.objects.order_by("-seq").values("seq", "hash").first()
        seq, prev_hash = (last["seq"] + 1, last["hash"]) if last else (1, GENESIS_HASH)
        fields = dict(
            seq=seq,
            created_at=timezone.now(),
            actor_kind=kind,
            actor_id=actor_id,
            actor_name=actor_name,
            action=action,
            object_type=object_type,
            object_id=str(object_id),
            object_repr=object_repr,
            node_id=node.pk if node is not None else None,
            node_name=node.name if node is not None else "",
            outcome=outcome,
            details=json.loads(json.dumps(details or {}, default=str)),
            source_ip=ctx.source_ip,
            user_agent=ctx.user_agent,
            request_id=ctx.request_id,
        )
        event = AuditEvent(prev_hash=prev_hash, hash=chain_hash(prev_hash, fields), **fields)
        event.save(force_insert=True)
    return event
