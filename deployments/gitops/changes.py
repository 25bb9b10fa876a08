"""Every change of GitOps settings, atomic and audited: webhook secrets, polling intervals, sync policies,
protected tags.  The gate decides first in each (node admins for their node's policy; MANAGE_INVENTORY
for repositories and tags)."""

from __future__ import annotations

import secrets
from datetime import time

from django.db import transaction

from deployments.access import gate
from deployments.audit.writer import record
from deployments.errors import RequestError
from deployments.models import Node, Repository, Tag

from .models import ProtectedTag, RepositoryWatch, SyncPolicy

# Polling more often than this would only load the forge; 0 turns polling off.
MIN_POLL_INTERVAL = 60
MAX_POLL_INTERVAL = 7 * 24 * 3600


def watch_of(repository: Repository) -> RepositoryWatch:
    return RepositoryWatch.objects.get_or_create(repository=repository)[0]


def rotate_webhook_secret(repository: Repository, *, user) -> str:
    """Set a new random webhook secret for ``repository`` and return it: the only time it is shown."""
    gate.require_global(user, gate.MANAGE_INVENTORY, event="repository.webhook_secret", obj=repository)
    secret = secrets.token_urlsafe(32)
    with transaction.atomic():
        watch = watch_of(repository)
        rotated = bool(watch.secret_encrypted)
        watch.set_secret(secret)
        watch.save(update_fields=["secret_encrypted", "secret_set_at"])
        record("repository.webhook_secret", user=user, obj=repository, details={"rotated": rotated})
    return secret


def set_poll_interval(repository: Repository, seconds: int, *, user) -> RepositoryWatch:
    """Poll ``repository``'s branch every ``seconds`` (0: never); audited ``repository.changed``."""
    gate.require_global(user, gate.MANAGE_INVENTORY, event="repository.changed", obj=repository)
    if seconds and not MIN_POLL_INTERVAL <= seconds <= MAX_POLL_INTERVAL:
        raise RequestError(
            f"A polling interval is 0 (off) or between {MIN_POLL_INTERVAL} and {MAX_POLL_INTERVAL} seconds."
        )
    with transaction.atomic():
        watch = watch_of(repository)
        before = watch.poll_interval
        watch.poll_interval = seconds
        watch.save(update_fields=["poll_interval"])
        record(
            "repository.changed",
            user=user,
            obj=repository,
            details={"before": {"poll_interval": before}, "after": {"poll_interval": seconds}},
        )
    return watch


def _check_window(days: list[int], start: time | None, end: time | None) -> None:
    if any(d not in range(1, 8) for d in days):
        raise RequestError("Window days are ISO weekdays, 1 (Monday) to 7 (Sunday).")
    if days and (start is None or end is None):
        raise RequestError("A maintenance window needs a start and an end time (UTC).")
    if not days and (start is not None or end is not None):
        raise RequestError("A maintenance window needs its days of the week.")
    if days and start == end:
        raise RequestError("A maintenance window's end must differ from its start.")


def set_policy(
    target: Node | Tag,
    *,
    mode: str,
    action: str = "switch",
    days: list[int] | None = None,
    start: time | None = None,
    end: time | None = None,
    user,
) -> SyncPolicy | None:
    """Set the sync policy of a node (ADMIN on it) or a tag (MANAGE_INVENTORY); ``manual`` without a
    window removes it.  Audited ``sync_policy.changed`` with before/after."""
    is_node = isinstance(target, Node)
    if is_node:
        gate.require(user, gate.ADMIN, target, event="sync_policy.changed")
    else:
        gate.require_global(user, gate.MANAGE_INVENTORY, event="sync_policy.changed", obj=target)
    if mode not in SyncPolicy.Mode.values:
        raise RequestError(f"Unknown sync policy {mode!r}: use one of {', '.join(SyncPolicy.Mode.values)}.")
    if action not in ("switch", "boot", "test"):
        raise RequestError("An auto-deploy runs switch, boot or test.")
    days = sorted(set(days or []))
    _check_window(days, start, end)
    key = {"node": target} if is_node else {"tag": target}
    with transaction.atomic():
        policy = SyncPolicy.objects.filter(**key).first()
        before = policy.snapshot() if policy else None
        if mode == SyncPolicy.Mode.MANUAL and not days:
            if policy:
                policy.delete()
            policy, after = None, None
        else:
            policy = policy or SyncPolicy(**key)
            policy.mode, policy.action = mode, action
            policy.window_days = ",".join(str(d) for d in days)
            policy.window_start, policy.window_end = start, end
            policy.updated_by = user if user is not None and user.is_authenticated else None
            policy.save()
            after = policy.snapshot()
        if before != after:
            record(
                "sync_policy.changed",
                user=user,
                obj=target,
                node=target if is_node else None,
                details={"scope": "node" if is_node else "tag", "before": before, "after": after},
            )
    return policy


def set_protected(tag: Tag, protected: bool, *, user) -> None:
    """Mark ``tag`` protected (deploys to its nodes need a second person's approval) or not."""
    gate.require_global(user, gate.MANAGE_INVENTORY, event="tag.protection_changed", obj=tag)
    with transaction.atomic():
        existing = ProtectedTag.objects.filter(tag=tag).first()
        if protected == bool(existing):
            return
        if protected:
            ProtectedTag.objects.create(tag=tag, protected_by=user if user and user.is_authenticated else None)
        else:
            existing.delete()
        record("tag.protection_changed", user=user, obj=tag, details={"protected": protected})
