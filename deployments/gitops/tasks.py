"""The GitOps work done by the qcluster worker: a verified push, the minute tick, one repository's poll.

Each takes ids only (never a secret) and loads what it needs.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from deployments import repos
from deployments.audit.writer import record
from deployments.models import Repository

from . import approvals, policies
from .changes import watch_of
from .models import Delivery, RepositoryWatch

log = logging.getLogger(__name__)


def _advance_head(repository: Repository, head: str) -> str | None:
    """Record ``head`` as the branch head last seen; the one seen before it, or None if another process
    recorded it first (a push and a poll noticing the same move act once)."""
    watch = watch_of(repository)
    before = watch.head_commit
    if before == head:
        return None
    if not RepositoryWatch.objects.filter(pk=watch.pk, head_commit=before).update(
        head_commit=head, head_seen_at=timezone.now()
    ):
        return None
    return before


def handle_push(repository_id: int, after: str) -> dict | None:
    """A verified push to ``repository_id``'s tracked branch: fetch the mirror, read the branch head (it
    may have moved past ``after`` already: the head is what is deployed) and apply the policies."""
    repository = Repository.objects.filter(pk=repository_id).first()
    if repository is None:
        return None
    head = repos.resolve(repository)
    before = _advance_head(repository, head)
    if before is None:
        log.info("push to %s: head %s already handled", repository.name, head)
        return None
    return policies.act_on_move(repository, head, before=before)


def poll_repository(repository_id: int) -> dict | None:
    """Fetch one repository; a moved branch acts like a push (``repository.polled``).  The first poll
    only learns the head: nothing is deployed for a move the panel did not see."""
    repository = Repository.objects.filter(pk=repository_id).first()
    if repository is None:
        return None
    try:
        head = repos.resolve(repository)
    except repos.RepositoryError as exc:
        log.warning("polling %s failed: %s", repository.name, exc)
        return None
    before = _advance_head(repository, head)
    if before is None:
        return None
    with transaction.atomic():
        record(
            "repository.polled",
            obj=repository,
            details={"branch": repository.branch, "before": before, "after": head, "first": not before},
        )
    if not before:
        return {"first": head}
    return policies.act_on_move(repository, head, before=before)


def due_polls(now: datetime) -> list[int]:
    """Claim the repositories whose polling interval has passed (a conditional UPDATE each, so two ticks
    never poll one twice) and return their ids."""
    claimed = []
    for watch in RepositoryWatch.objects.filter(poll_interval__gt=0):
        # A few seconds of slack: the tick comes every minute, not on the second.
        if watch.last_polled_at and watch.last_polled_at > now - timedelta(seconds=watch.poll_interval - 5):
            continue
        if RepositoryWatch.objects.filter(pk=watch.pk, last_polled_at=watch.last_polled_at).update(last_polled_at=now):
            claimed.append(watch.repository_id)
    return claimed


def tick(now: datetime | None = None) -> dict:
    """Every minute: expire old approval requests, start waiting auto-deploys whose window opened,
    queue the polls that are due, forget delivery ids older than the replay window."""
    from django_q.tasks import async_task

    now = now or timezone.now()
    expired = approvals.expire_old(now)
    started = policies.start_due(now)
    polls = due_polls(now)
    for pk in polls:
        async_task("deployments.gitops.tasks.poll_repository", pk, task_name=f"gitops-poll-{pk}")
    purged, _ = Delivery.objects.filter(
        received_at__lt=now - timedelta(seconds=settings.WEBHOOK_DELIVERY_KEEP)
    ).delete()
    return {"expired": expired, "started": started, "polls": polls, "purged": purged}
