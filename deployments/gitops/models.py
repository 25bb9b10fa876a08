"""GitOps state: how the panel learns a branch moved (webhook secret, polling), what it then does per node or
tag (sync policy, maintenance window), auto-deploys waiting for their window, and approval requests for
protected tags."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from deployments import crypto
from deployments.models import Deployment, Node, Repository, Rollout, Tag


class RepositoryWatch(models.Model):
    """How the panel hears that ``repository``'s tracked branch moved: its webhook secret (encrypted,
    write-only) and its polling interval; and the branch head it last saw."""

    repository = models.OneToOneField(Repository, on_delete=models.CASCADE, related_name="watch")
    secret_encrypted = models.TextField(blank=True, editable=False)
    secret_set_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Seconds between two polls of the branch; 0: no polling (webhooks only).
    poll_interval = models.PositiveIntegerField(default=0)
    last_polled_at = models.DateTimeField(null=True, blank=True)
    head_commit = models.CharField(max_length=40, blank=True)  # the branch head last seen (push or poll)
    head_seen_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"watch of {self.repository}"

    def set_secret(self, secret: str) -> None:
        self.secret_encrypted = crypto.encrypt(secret)
        self.secret_set_at = timezone.now()

    def secret(self) -> str:
        return crypto.decrypt(self.secret_encrypted) if self.secret_encrypted else ""


class Delivery(models.Model):
    """One verified webhook delivery, by the forge's delivery id: a repeat of the same id does nothing."""

    provider = models.CharField(max_length=16)
    delivery_id = models.CharField(max_length=100)
    repository = models.ForeignKey(Repository, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    received_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["provider", "delivery_id"], name="delivery_unique_id")]

    def __str__(self) -> str:
        return f"{self.provider} delivery {self.delivery_id}"


class SyncPolicy(models.Model):
    """What the panel does when a node's tracked branch moves; set on one node or on a tag (the node's
    own policy beats its tags')."""

    class Mode(models.TextChoices):
        MANUAL = "manual", "Manual"  # nothing: a person deploys (the default without a policy)
        NOTIFY = "notify", "Notify"  # record that the node is behind (gitops.node_behind)
        AUTO = "auto", "Auto-deploy"  # deploy the branch head, inside the maintenance window if there is one

    node = models.OneToOneField(Node, null=True, blank=True, on_delete=models.CASCADE, related_name="sync_policy")
    tag = models.OneToOneField(Tag, null=True, blank=True, on_delete=models.CASCADE, related_name="sync_policy")
    mode = models.CharField(max_length=8, choices=Mode.choices, default=Mode.MANUAL)
    action = models.CharField(
        max_length=16, default="switch", choices=[("switch", "switch"), ("boot", "boot"), ("test", "test")]
    )
    # The maintenance window (UTC): ISO weekdays "1,2,3,4,5" (Monday = 1) and start/end times; an end
    # before the start runs past midnight (the day is the start's).  No days: no window, any time.
    window_days = models.CharField(max_length=13, blank=True)
    window_start = models.TimeField(null=True, blank=True)
    window_end = models.TimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        verbose_name_plural = "sync policies"
        constraints = [
            models.CheckConstraint(
                condition=(Q(node__isnull=False) & Q(tag__isnull=True)) | (Q(node__isnull=True) & Q(tag__isnull=False)),
                name="sync_policy_node_xor_tag",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.mode} on {self.node or f'tag {self.tag}'}"

    @property
    def days(self) -> list[int]:
        return [int(d) for d in self.window_days.split(",") if d]

    @property
    def has_window(self) -> bool:
        return bool(self.window_days) and self.window_start is not None and self.window_end is not None

    def snapshot(self) -> dict:
        """The policy as audit details (before/after)."""
        return {
            "mode": self.mode,
            "action": self.action,
            "window_days": self.days,
            "window_start": self.window_start.strftime("%H:%M") if self.window_start else None,
            "window_end": self.window_end.strftime("%H:%M") if self.window_end else None,
        }


class ProtectedTag(models.Model):
    """A tag whose nodes are deployed only after a second person approved (``approvals``)."""

    tag = models.OneToOneField(Tag, on_delete=models.CASCADE, related_name="protection")
    protected_at = models.DateTimeField(default=timezone.now)
    protected_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    def __str__(self) -> str:
        return f"protected tag {self.tag}"


class PendingSync(models.Model):
    """An auto-deploy of ``node`` waiting for its maintenance window; the newest push replaces it."""

    node = models.OneToOneField(Node, on_delete=models.CASCADE, related_name="pending_sync")
    commit_sha = models.CharField(max_length=40)
    queued_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.node} waits to deploy {self.commit_sha[:10]}"


class ApprovalRequest(models.Model):
    """A deployment or rollout to a protected node, held until a second person approves it.

    It keeps the request's parameters and the commit each repository resolved to when it was asked
    (``commits``): an approval deploys exactly that, as the requester, through ``lifecycle`` or
    ``rollouts``.  A request for a branch head (no revision named) expires when the branch moves.
    """

    class Kind(models.TextChoices):
        DEPLOYMENT = "deployment", "Deployment"
        ROLLOUT = "rollout", "Rollout"

    class Status(models.TextChoices):
        PENDING = "pending", "Awaiting approval"  # held: nothing started
        APPROVED = "approved", "Approved"  # a second person approved: the deployment or rollout was requested
        REJECTED = "rejected", "Rejected"  # a second person said no
        EXPIRED = "expired", "Expired"  # the branch moved, or it waited longer than PANEL_APPROVAL_MAX_AGE

    kind = models.CharField(max_length=10, choices=Kind.choices)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    action = models.CharField(max_length=16, choices=Deployment.Action.choices)
    revision = models.CharField(max_length=200, blank=True)  # as asked; empty: each branch's head
    commits = models.JSONField(default=dict)  # repository name -> the commit SHA pinned at request time
    params = models.JSONField(default=dict)  # the rest of the request (timeouts, parallelism, canaries)
    nodes = models.ManyToManyField(Node, related_name="+")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_by_name = models.CharField(max_length=150, blank=True)
    trigger = models.CharField(max_length=8, default="web")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_by_name = models.CharField(max_length=150, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    comment = models.TextField(blank=True)
    deployment = models.ForeignKey(Deployment, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    rollout = models.ForeignKey(Rollout, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"approval #{self.pk} ({self.kind} {self.action})"

    def get_absolute_url(self) -> str:
        return reverse("gitops:approval-detail", args=[self.pk])

    @property
    def pinned_to_branch(self) -> bool:
        return not self.revision and not self.is_rollback

    @property
    def is_rollback(self) -> bool:
        """A held rollback (``rollbacks.request_rollback``): back to ``params["generation"]``."""
        return self.kind == self.Kind.DEPLOYMENT and (self.params or {}).get("kind") == "rollback"

    @property
    def rollback_generation(self) -> int | None:
        return (self.params or {}).get("generation") if self.is_rollback else None

    def payload(self) -> dict:
        """The request as JSON-able values (API, pages)."""
        return {
            "id": self.pk,
            "kind": self.kind,
            "status": self.status,
            "action": self.action,
            "revision": self.revision,
            "commits": self.commits,
            **({"rollback_to_generation": self.rollback_generation} if self.is_rollback else {}),
            "nodes": sorted(n.name for n in self.nodes.all()),
            "requested_by": self.requested_by_name,
            "trigger": self.trigger,
            "created_at": self.created_at.isoformat(),
            "decided_by": self.decided_by_name,
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "comment": self.comment,
            "deployment": self.deployment_id,
            "rollout": self.rollout_id,
            "url": self.get_absolute_url(),
        }
