"""API tokens: a user's keys for scripts, stored as a hash of the secret only."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class ApiToken(models.Model):
    """One API token of one user.

    The token a script sends is ``npt_<prefix>_<secret>``: ``prefix`` (stored, shown on the page, unique)
    finds the row with one indexed query, and the secret is checked against ``secret_hash``
    (SHA-256, compared in constant time).  The secret itself is never stored: it is shown once, when
    the token is created.  A token acts as its user, through the same gate; it stops working when it
    expires, is revoked, or its user is deactivated or deleted.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)  # None: until revoked
    last_used_at = models.DateTimeField(null=True, blank=True)  # kept to the minute (see tokens.USE_RECORDED_EVERY)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} (npt_{self.prefix}_…)"

    @property
    def display(self) -> str:
        """What identifies the token on pages and in the audit trail: never the secret."""
        return f"npt_{self.prefix}_…"

    def state(self, now=None) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or timezone.now()):
            return "expired"
        return "active"
