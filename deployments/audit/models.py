"""The audit event: one row per state change or security-relevant event."""

from django.db import models


class AuditEventQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise PermissionError("audit events are append-only")

    def delete(self):
        raise PermissionError("audit events are append-only")


class AuditEvent(models.Model):
    """An append-only, hash-chained audit event.

    ``hash = SHA-256(prev_hash || canonical JSON of the event)``; ``seq`` is
    gap-free.  The actor is kept as a plain id plus a username snapshot (not a
    foreign key) so deleting a user never touches the trail.
    """

    class Outcome(models.TextChoices):
        SUCCESS = "success", "Success"
        FAILURE = "failure", "Failure"
        DENIED = "denied", "Denied"

    class ActorKind(models.TextChoices):
        USER = "user", "User"
        SYSTEM = "system", "System"
        CLI = "cli", "Command line"
        WEBHOOK = "webhook", "Webhook"
        ANONYMOUS = "anonymous", "Anonymous"  # e.g. a failed login: actor_name is the name tried

    seq = models.BigIntegerField(unique=True)
    created_at = models.DateTimeField(db_index=True)
    actor_kind = models.CharField(max_length=10, choices=ActorKind.choices)
    actor_id = models.BigIntegerField(null=True, blank=True)
    actor_name = models.CharField(max_length=150, blank=True)
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=64, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    object_repr = models.CharField(max_length=300, blank=True)
    node_id = models.BigIntegerField(null=True, blank=True)
    node_name = models.CharField(max_length=63, blank=True)
    outcome = models.CharField(max_length=10, choices=Outcome.choices, default=Outcome.SUCCESS)
    details = models.JSONField(default=dict, blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=500, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-seq"]
        # Every filter of the audit page walks one of these newest-first and
        # stops after a page (keyset pagination on seq; no OFFSET, no COUNT).
        indexes = [
            models.Index(fields=["node_id", "-seq"], name="audit_node_seq"),
            models.Index(fields=["actor_id", "-seq"], name="audit_actor_seq"),
            models.Index(fields=["node_name", "-seq"], name="audit_node_name_seq"),
            models.Index(fields=["actor_name", "-seq"], name="audit_actor_name_seq"),
            models.Index(fields=["action", "-seq"], name="audit_action_seq"),
            models.Index(fields=["outcome", "-seq"], name="audit_outcome_seq"),
            models.Index(fields=["object_type", "object_id", "-seq"], name="audit_object_seq"),
            models.Index(fields=["request_id"], name="audit_request"),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} {self.object_repr}"

    def save(self, *args, **kwargs):
        if self.pk is not None or not self._state.adding:
            raise PermissionError("audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("audit events are append-only")
