"""A webhook delivery, from bytes to a queued task: find the repository, verify, deduplicate, record.

The endpoint never tells whether a repository exists: an unknown repository and a wrong secret get the
same answer (401, the same message) after the same work (one signature check at least, one audit event),
and both are audited as ``webhook.refused`` with the provider and the source address (never the secret
or the signature).  A verified push is recorded (``webhook.received``, one per tracked repository) with
its delivery id in one transaction; the fetch and the policies run in the worker (``tasks.handle_push``),
queued after commit, so the forge gets its 202 within milliseconds.  A delivery id seen before is
acknowledged (200) and does nothing.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from deployments.audit.writer import record
from deployments.models import Repository
from deployments.validators import DELIVERY_ID_RE, redact_url_secrets, validate_revision

from . import hooks
from .models import Delivery, RepositoryWatch

REFUSED = "Webhook refused: the signature does not match."


@dataclass
class Answer:
    status: int
    body: dict


def _refuse(provider: str, source: str | None, reason: str, push: hooks.Push) -> Answer:
    with transaction.atomic():
        record(
            "webhook.refused",
            actor_kind="webhook",
            actor_name=provider,
            outcome="denied",
            details={
                "provider": provider,
                "source": source or "",
                "reason": reason,
                "delivery": push.delivery_id[:100],
                "repository_urls": [redact_url_secrets(u)[:200] for u in push.urls[:5]],
            },
        )
    return Answer(401, {"error": REFUSED})


def receive(provider: str, headers, body: bytes, *, source: str | None) -> Answer:
    """Handle one delivery of ``provider`` (a name in ``hooks.PROVIDERS``); the HTTP answer."""
    if provider not in hooks.PROVIDERS:
        return Answer(404, {"error": f"Unknown webhook provider: use one of {', '.join(hooks.PROVIDERS)}."})
    if len(body) > settings.WEBHOOK_MAX_BYTES:
        return Answer(413, {"error": f"The body is larger than {settings.WEBHOOK_MAX_BYTES} bytes."})
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return Answer(400, {"error": "The body is not valid JSON."})
    if not isinstance(data, dict):
        return Answer(400, {"error": "The body must be a JSON object."})
    try:
        push = hooks.parse(provider, headers, data, body)
    except hooks.BadPayload as exc:
        return Answer(400, {"error": str(exc)})
    if not DELIVERY_ID_RE.match(push.delivery_id):
        return Answer(400, {"error": "The delivery id has characters a delivery id never has."})
    if push.is_push:
        branch = push.branch
        try:
            if branch:
                validate_revision(branch)
            elif not push.ref.startswith("refs/tags/"):
                raise ValidationError("not a branch")
        except ValidationError:
            return Answer(400, {"error": "The ref is not a branch name the panel accepts (refs/heads/<branch>)."})

    # Every repository the payload may mean, by URL; each one's secret is tried (no early exit on the
    # first candidate, and one check against a throwaway secret when there is none).
    wanted = {hooks.normalize_url(u) for u in push.urls}
    watches = {w.repository_id: w for w in RepositoryWatch.objects.exclude(secret_encrypted="")}
    candidates = [r for r in Repository.objects.all() if hooks.normalize_url(r.url) in wanted]
    now = time.time()
    window = settings.WEBHOOK_TIMESTAMP_WINDOW
    verified = []
    for repository in candidates:
        watch = watches.get(repository.pk)
        secret = watch.secret() if watch else secrets.token_hex(32)
        if hooks.verify(provider, secret, headers, body, now=now, window=window) and watch:
            verified.append(repository)
    if not candidates:
        hooks.verify(provider, secrets.token_hex(32), headers, body, now=now, window=window)
    if not verified:
        reason = "bad signature" if candidates else "no repository with this URL"
        return _refuse(provider, source, reason, push)

    tracked = [r for r in verified if push.is_push and push.branch == r.branch]
    deleted = push.after in ("", hooks.ZERO_SHA)
    try:
        # The delivery id and the record of the push in one transaction: a replay finds the id only if the
        # push was recorded.
        with transaction.atomic():
            Delivery.objects.create(provider=provider, delivery_id=push.delivery_id, repository=verified[0])
            for repository in tracked if not deleted else []:
                record(
                    "webhook.received",
                    actor_kind="webhook",
                    actor_name=provider,
                    obj=repository,
                    details={
                        "provider": provider,
                        "delivery": push.delivery_id,
                        "source": source or "",
                        "ref": push.ref,
                        "before": push.before,
                        "after": push.after,
                    },
                )
                transaction.on_commit(lambda pk=repository.pk: _enqueue(pk, push.after))
    except IntegrityError:
        return Answer(200, {"status": "duplicate", "detail": "This delivery id was handled before: nothing done."})
    if not tracked:
        what = f"event {push.event!r}" if not push.is_push else f"ref {push.ref!r} (not a tracked branch)"
        return Answer(202, {"status": "ignored", "detail": f"Verified; nothing to do for {what}."})
    if deleted:
        return Answer(202, {"status": "ignored", "detail": "Verified; the branch was deleted: nothing deployed."})
    return Answer(
        202, {"status": "accepted", "detail": "Verified push: the panel fetches it and applies the policies."}
    )


def _enqueue(repository_id: int, after: str) -> None:
    from django_q.tasks import async_task

    async_task("deployments.gitops.tasks.handle_push", repository_id, after, task_name=f"gitops-push-{repository_id}")
