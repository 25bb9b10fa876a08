"""Health checks: what must hold on a node after its new system is activated (model only).

A check belongs to one node, or to one tag (then it applies to every node that
carries the tag): a node's checks are its own and its tags' together. They
run after a successful switch or test (``deployments/health.py``), before the
panel confirms the activation (``deployments/remote/confirm.py``).
"""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from . import validators
from .models import Node, Tag


class HealthCheck(models.Model):
    """One check of a node or a tag: a command on the node, a TCP port or an HTTP URL probed from the panel.

    ``retries`` more attempts follow a failing one, ``interval_seconds`` apart; each attempt has
    ``timeout_seconds``. ``on_failure`` says what a failure does: ``rollback`` (the node goes back to
    the system before) or ``keep`` (the deployment is marked unhealthy, the node keeps the new system).
    """

    class Kind(models.TextChoices):
        COMMAND = "command", "Command on the node"  # sh -c <command> over SSH, as the node's SSH user; exit 0
        TCP = "tcp", "TCP port"  # a connection from the panel to host:port
        HTTP = "http", "HTTP URL"  # a GET from the panel; the status must be expected_status

    class OnFailure(models.TextChoices):
        ROLLBACK = "rollback", "Roll the node back"
        KEEP = "keep", "Keep the new system, mark the deployment unhealthy"

    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.CASCADE, related_name="health_checks")
    tag = models.ForeignKey(Tag, null=True, blank=True, on_delete=models.CASCADE, related_name="health_checks")
    name = models.CharField(max_length=50, validators=[validators.validate_check_name])
    kind = models.CharField(max_length=8, choices=Kind.choices)
    command = models.TextField(blank=True, help_text="Run on the node with sh -c, as its SSH user; exit 0 = healthy.")
    host = models.CharField(
        max_length=253, blank=True, validators=[validators.validate_host], help_text="Empty: the node's host."
    )
    port = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(65535)]
    )
    url = models.CharField(
        "URL",
        max_length=500,
        blank=True,
        validators=[validators.validate_check_url],
        help_text="http:// or https://; {host} stands for the node's host.",
    )
    expected_status = models.PositiveSmallIntegerField(
        default=200, validators=[MinValueValidator(100), MaxValueValidator(599)]
    )
    timeout_seconds = models.PositiveSmallIntegerField(
        default=5, validators=[MinValueValidator(1), MaxValueValidator(300)]
    )
    retries = models.PositiveSmallIntegerField(default=2, validators=[MaxValueValidator(20)])
    interval_seconds = models.PositiveSmallIntegerField(default=2, validators=[MaxValueValidator(300)])
    on_failure = models.CharField(max_length=8, choices=OnFailure.choices, default=OnFailure.ROLLBACK)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, editable=False, related_name="+"
    )

    class Meta:
        ordering = ["name", "pk"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(node__isnull=False) & Q(tag__isnull=True)) | (Q(node__isnull=True) & Q(tag__isnull=False)),
                name="healthcheck_node_or_tag",
            ),
            models.UniqueConstraint(fields=["node", "name"], name="healthcheck_unique_node_name"),
            models.UniqueConstraint(fields=["tag", "name"], name="healthcheck_unique_tag_name"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_kind_display()})"

    def clean(self) -> None:
        """The fields of its kind are required; the others are emptied (so nothing unused is stored)."""
        from django.core.exceptions import ValidationError

        if self.kind == self.Kind.COMMAND:
            try:
                validators.validate_check_command(self.command)
            except ValidationError as exc:
                raise ValidationError({"command": exc.messages}) from None
            self.host, self.port, self.url = "", None, ""
        elif self.kind == self.Kind.TCP:
            if self.port is None:
                raise ValidationError({"port": "A TCP check needs a port."})
            self.command, self.url = "", ""
        elif self.kind == self.Kind.HTTP:
            if not self.url:
                raise ValidationError({"url": "An HTTP check needs a URL."})
            self.command, self.host, self.port = "", "", None

    @property
    def owner(self) -> str:
        return f"node {self.node.name}" if self.node_id else f"tag {self.tag.name}"

    def attempts(self) -> int:
        return self.retries + 1

    def budget(self) -> int:
        """The longest its attempts can take, in seconds (a command gets 5 s more for SSH)."""
        extra = 5 if self.kind == self.Kind.COMMAND else 0
        return self.attempts() * (self.timeout_seconds + extra) + self.retries * self.interval_seconds

    def describe(self) -> str:
        """What it checks, as the log and the pages say it (never more than the fields hold)."""
        if self.kind == self.Kind.COMMAND:
            return f"command `{self.command}` on the node"
        if self.kind == self.Kind.TCP:
            return f"TCP {self.host or '{host}'}:{self.port}"
        return f"GET {self.url} expecting {self.expected_status}"

    def details(self) -> dict:
        """Its fields for audit events."""
        return {
            "name": self.name,
            "owner": self.owner,
            "kind": self.kind,
            "command": self.command,
            "host": self.host,
            "port": self.port,
            "url": self.url,
            "expected_status": self.expected_status,
            "timeout_seconds": self.timeout_seconds,
            "retries": self.retries,
            "interval_seconds": self.interval_seconds,
            "on_failure": self.on_failure,
        }

    @classmethod
    def for_node(cls, node: Node):
        """Every check that applies to ``node``: its own and its tags'."""
        return cls.objects.filter(Q(node=node) | Q(tag__in=node.tags.all())).select_related("node", "tag")
