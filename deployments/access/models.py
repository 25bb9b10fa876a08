"""Teams of users and the grants they hold: a role over a scope of nodes, and the
use of credentials and repositories.

A user's permissions are the union of the grants of every team they belong
to.  ``deployments.access.gate`` is the only reader of these rows that decides
anything; nothing else decides access.
"""

from __future__ import annotations

import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from deployments.models import Credential, Node, Repository
from deployments.validators import TAG_RE

# A tag scope names one tag (``web``) or every tag starting with a prefix (``db-*``).
TAG_PATTERN_RE = re.compile(r"\A[a-z0-9][a-z0-9_.-]{0,49}\*?\Z")


def validate_tag_pattern(value: str) -> None:
    """An exact tag, or a non-empty tag prefix followed by one trailing ``*``."""
    if not TAG_PATTERN_RE.match(value or "") or (not value.endswith("*") and not TAG_RE.match(value)):
        raise ValidationError(
            "A tag scope is a tag (web) or a tag prefix ending in * (db-*): lowercase letters, digits, '_', '.', '-'.",
            code="invalid_tag_pattern",
        )


class Team(models.Model):
    """A named group of users; its grants apply to every member."""

    name = models.CharField(max_length=100, unique=True)
    description = models.CharField(max_length=300, blank=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="teams")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Grant(models.Model):
    """One role over one scope, held by a team.

    Roles include the ones before them: a deployer may view, an admin may
    deploy.  The auditor role is global only (scope ``all``): it reads the whole
    audit trail and sees every node read-only.
    """

    class Role(models.TextChoices):
        VIEWER = "viewer", "Viewer"  # sees the nodes, their deployments and logs
        DEPLOYER = "deployer", "Deployer"  # viewer, plus requests and cancels deployments
        ADMIN = "admin", "Admin"  # deployer, plus edits nodes, pins host keys, assigns credentials
        AUDITOR = "auditor", "Auditor"  # the whole audit trail; every node read-only; global only

    class Scope(models.TextChoices):
        NODE = "node", "One node"
        TAG = "tag", "Nodes with a tag"
        ALL = "all", "All nodes"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="grants")
    role = models.CharField(max_length=10, choices=Role.choices)
    scope = models.CharField(max_length=4, choices=Scope.choices)
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.CASCADE, related_name="grants")
    tag = models.CharField(
        "tag or tag prefix",
        max_length=51,
        blank=True,
        validators=[validate_tag_pattern],
        help_text="A tag (web) or a prefix ending in * (db-*); every node carrying a matching tag, now or later.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["team", "scope", "tag", "node", "role"]
        constraints = [
            models.CheckConstraint(
                name="grant_scope_target",
                condition=(
                    Q(scope="node", node__isnull=False, tag="")
                    | (Q(scope="tag", node__isnull=True) & ~Q(tag=""))
                    | Q(scope="all", node__isnull=True, tag="")
                ),
                violation_error_message="A node scope names a node, a tag scope a tag, and an all scope neither.",
            ),
            models.CheckConstraint(
                name="grant_auditor_global",
                condition=~Q(role="auditor") | Q(scope="all"),
                violation_error_message="The auditor role is global: its scope must be all nodes.",
            ),
            models.UniqueConstraint(
                fields=["team", "role", "node"],
                condition=Q(scope="node"),
                name="grant_unique_node",
                violation_error_message="The team already has this grant.",
            ),
            models.UniqueConstraint(
                fields=["team", "role", "tag"],
                condition=Q(scope="tag"),
                name="grant_unique_tag",
                violation_error_message="The team already has this grant.",
            ),
            models.UniqueConstraint(
                fields=["team", "role"],
                condition=Q(scope="all"),
                name="grant_unique_all",
                violation_error_message="The team already has this grant.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.team}: {self.get_role_display().lower()} on {self.scope_label}"

    @property
    def scope_label(self) -> str:
        if self.scope == self.Scope.NODE:
            return f"node {self.node.name if self.node_id else '?'}"
        if self.scope == self.Scope.TAG:
            return f"tag {self.tag}"
        return "all nodes"

    def clean(self) -> None:
        # Clear what the scope does not use, so the form's leftovers never fail the constraints.
        if self.scope != self.Scope.NODE:
            self.node = None
        if self.scope != self.Scope.TAG:
            self.tag = ""
        errors = {}
        if self.scope == self.Scope.NODE and not self.node_id:
            errors["node"] = "Choose the node."
        if self.scope == self.Scope.TAG and not self.tag:
            errors["tag"] = "Enter a tag or a tag prefix ending in *."
        if self.role == self.Role.AUDITOR and self.scope != self.Scope.ALL:
            errors["scope"] = "The auditor role is global: its scope must be all nodes."
        if errors:
            raise ValidationError(errors)

    def snapshot(self) -> dict:
        """What the audit trail keeps of a grant."""
        return {
            "id": self.pk,
            "role": self.role,
            "scope": self.scope,
            "node": self.node.name if self.node_id else None,
            "tag": self.tag or None,
        }


class CredentialUse(models.Model):
    """A team may use ``credential``: its node admins may attach it to the nodes they administer.

    Like AWX's "use" role on a credential: using a credential never shows its
    secret, but a node pointed at a machine of one's choosing with it would
    hand the secret over, so it must be granted, per team, by a team manager.
    """

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="credential_uses")
    credential = models.ForeignKey(Credential, on_delete=models.CASCADE, related_name="uses")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["credential", "team"]
        constraints = [
            models.UniqueConstraint(
                fields=["team", "credential"],
                name="credentialuse_unique",
                violation_error_message="The team may already use this credential.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.team}: may use credential {self.credential}"


class RepositoryUse(models.Model):
    """A team may use ``repository``: its node admins may deploy nodes from it (its source goes to them)."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="repository_uses")
    repository = models.ForeignKey(Repository, on_delete=models.CASCADE, related_name="uses")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["repository", "team"]
        constraints = [
            models.UniqueConstraint(
                fields=["team", "repository"],
                name="repositoryuse_unique",
                violation_error_message="The team may already use this repository.",
            )
        ]

    def __str__(self) -> str:
        return f"{self.team}: may use repository {self.repository}"
