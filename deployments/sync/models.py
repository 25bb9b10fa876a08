"""Sync status: the system each (commit, attribute) builds, what each node runs against it; notifications."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from deployments import crypto
from deployments.access.models import Team
from deployments.models import Node, Repository


class ExpectedSystem(models.Model):
    """The store path ``nixosConfigurations.<flake_attr>.config.system.build.toplevel`` of one commit.

    Evaluated once per (repository, commit, attribute) on the panel host (``evaluate.expected_system``)
    and kept: a commit's evaluation never changes.  A failed evaluation is kept too, with its message,
    so a broken commit costs one evaluation, not one per node per refresh.
    """

    repository = models.ForeignKey(Repository, on_delete=models.CASCADE, related_name="+")
    commit_sha = models.CharField(max_length=40)
    flake_attr = models.CharField(max_length=100)
    out_path = models.CharField(max_length=300, blank=True)  # '' when the evaluation failed
    error = models.TextField(blank=True)  # why the evaluation failed (Nix's last lines)
    # The failure may pass (a timeout, the mirror unreachable, no nix): evaluated again after a while.
    transient = models.BooleanField(default=False)
    seconds = models.FloatField(default=0)  # how long the evaluation took
    evaluated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["repository", "commit_sha", "flake_attr"], name="expected_system_unique")
        ]

    def __str__(self) -> str:
        return f"{self.commit_sha[:10]}#{self.flake_attr}"


class NodeSync(models.Model):
    """Where ``node`` stands against its tracked branch, as the last refresh saw it (``status.refresh_*``).

    ``since`` is when the node entered ``status``; ``checked_at`` when it was last looked at.
    Written only by ``status.record_states``.
    """

    class Status(models.TextChoices):
        IN_SYNC = "in_sync", "In sync"  # /run/current-system is the branch head's system
        BEHIND = "behind", "Behind"  # the branch moved since what the node runs
        DRIFTED = "drifted", "Drifted"  # the node runs something other than the panel's last deployment
        UNKNOWN = "unknown", "Unknown"  # not reachable, no pinned host key, the evaluation failed (see reason)

    node = models.OneToOneField(Node, on_delete=models.CASCADE, primary_key=True, related_name="sync")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.UNKNOWN)
    since = models.DateTimeField(default=timezone.now)
    reason = models.TextField(blank=True)  # why unknown, or what drifted
    commit_sha = models.CharField(max_length=40, blank=True)  # the branch head the status was computed against
    expected_system = models.CharField(max_length=300, blank=True)  # what the branch head builds
    current_system = models.CharField(max_length=300, blank=True)  # the node's /run/current-system
    deployed_system = models.CharField(max_length=300, blank=True)  # the panel's last successful switch/test
    checked_at = models.DateTimeField(default=timezone.now)

    class Meta:
        # The dashboard's filter and the metrics' count by status.
        indexes = [models.Index(fields=["status", "node"], name="nodesync_status")]

    def __str__(self) -> str:
        return f"{self.node_id}: {self.status}"

    @property
    def redeployable(self) -> bool:
        """Drifted or behind with a known expected system: one click puts the branch head back."""
        return self.status in (self.Status.DRIFTED, self.Status.BEHIND) and bool(self.commit_sha)


class Subscription(models.Model):
    """A team's wish to hear about some events of the nodes it may view, at one target.

    ``target_encrypted`` holds the webhook URL (often with a token in it) or the e-mail address,
    encrypted at rest; pages show ``target_display`` only (``notify.mask_target``).
    """

    class Kind(models.TextChoices):
        WEBHOOK = "webhook", "Webhook (generic JSON)"
        SLACK = "slack", "Slack-compatible webhook"
        MATRIX = "matrix", "Matrix webhook bridge"
        EMAIL = "email", "E-mail"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="subscriptions")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    target_encrypted = models.TextField(editable=False)
    target_display = models.CharField(max_length=300, editable=False)
    events = models.JSONField(default=list)  # notification kinds (notify.KINDS)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["team", "name"]
        constraints = [models.UniqueConstraint(fields=["team", "name"], name="subscription_unique_name")]

    def __str__(self) -> str:
        return f"{self.team}: {self.name}"

    def target(self) -> str:
        return crypto.decrypt(self.target_encrypted)


class Delivery(models.Model):
    """One notification of one audit event to one subscription, tried until sent or out of attempts."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"  # waiting for its (next) attempt at ``next_attempt_at``
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed"  # every attempt failed (``error`` is the last reason)

    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="deliveries")
    event_seq = models.BigIntegerField()  # the audit event's seq
    kind = models.CharField(max_length=32)
    node_name = models.CharField(max_length=63, blank=True)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["subscription", "event_seq"], name="delivery_once_per_event"),
        ]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="delivery_due")]

    def __str__(self) -> str:
        return f"{self.kind} #{self.event_seq} -> {self.subscription_id}: {self.status}"
