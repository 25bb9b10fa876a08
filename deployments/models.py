"""Inventory (credentials, repositories, nodes, tags) and deployments with their logs."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from . import crypto, validators
from .remote import MAX_JUMP_HOPS, REBUILD_ACTIONS


class Credential(models.Model):
    """An SSH private key or password, encrypted at rest.

    The secret is write-only: after saving, only its fingerprint (keys) or the
    fact that it is set (passwords) is ever shown.
    """

    class Kind(models.TextChoices):
        SSH_KEY = "ssh-key", "SSH private key"
        PASSWORD = "password", "Password"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    secret_encrypted = models.TextField(editable=False)
    passphrase_encrypted = models.TextField(blank=True, default="", editable=False)
    # For sudo on nodes whose SSH user is not root: fed to `sudo -S`.
    sudo_password_encrypted = models.TextField(blank=True, default="", editable=False)
    fingerprint = models.CharField(max_length=100, blank=True, editable=False)
    public_key = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def set_secret(self, secret: str, passphrase: str = "") -> None:
        """Store a new secret; computes the fingerprint of a key (ValueError if unreadable)."""
        from .remote import key_fingerprint, load_private_key

        if self.kind == self.Kind.SSH_KEY:
            pkey = load_private_key(secret, passphrase or None)
            self.fingerprint = key_fingerprint(secret, passphrase or None)
            self.public_key = f"{pkey.get_name()} {pkey.get_base64()}"
        else:
            self.fingerprint = ""
            self.public_key = ""
        self.secret_encrypted = crypto.encrypt(secret)
        self.passphrase_encrypted = crypto.encrypt(passphrase)

    def set_sudo_password(self, password: str) -> None:
        self.sudo_password_encrypted = crypto.encrypt(password)

    def secret(self) -> str:
        return crypto.decrypt(self.secret_encrypted)

    def passphrase(self) -> str:
        return crypto.decrypt(self.passphrase_encrypted)

    def sudo_password(self) -> str:
        return crypto.decrypt(self.sudo_password_encrypted)

    @property
    def display_fingerprint(self) -> str:
        return self.fingerprint or ("password (set)" if self.secret_encrypted else "not set")


class Repository(models.Model):
    """A git repository of Nix flakes, the source of truth for nodes' configurations."""

    name = models.CharField(max_length=100, unique=True, validators=[validators.validate_node_name])
    url = models.CharField("git URL or local path", max_length=500, validators=[validators.validate_repo_url])
    branch = models.CharField(
        "tracked branch", max_length=200, default="main", validators=[validators.validate_revision]
    )
    deploy_key = models.ForeignKey(
        Credential,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        limit_choices_to={"kind": "ssh-key"},
        help_text="Only for private repositories fetched over SSH.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "repositories"

    def __str__(self) -> str:
        return self.name

    @property
    def display_url(self) -> str:
        """The URL as pages show it: a token or password left in a row stored before validation is ``***``."""
        return validators.redact_url_secrets(self.url)


class BuildLocation(models.TextChoices):
    """Where a node's system is built (``deployments/change.py``); "" on a node: its tags' default."""

    TARGET = "target", "on the node itself"  # nixos-rebuild on the node, as always
    PANEL = "panel", "on the panel host"  # the panel host's Nix builds, the closure is copied to the node
    HOST = "host", "on a build host"  # another registered node builds, the closure is copied to the node


class Tag(models.Model):
    """A free label on nodes, used for roles and rollouts; may give its nodes a default build location."""

    name = models.CharField(max_length=50, unique=True, validators=[validators.validate_tag])
    build_location = models.CharField(
        max_length=8, choices=BuildLocation.choices, blank=True, default="", editable=False
    )
    build_host = models.ForeignKey(
        "Node", null=True, blank=True, on_delete=models.PROTECT, related_name="+", editable=False
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Node(models.Model):
    """A NixOS machine deployed from ``repository`` as ``nixosConfigurations.<flake_attr>``."""

    name = models.CharField(max_length=63, unique=True, validators=[validators.validate_node_name])
    host = models.CharField(max_length=253, validators=[validators.validate_host])
    port = models.PositiveIntegerField(default=22)
    ssh_user = models.CharField(max_length=32, default="root", validators=[validators.validate_ssh_user])
    use_sudo = models.BooleanField(default=False, help_text="Run nixos-rebuild with sudo (for a non-root SSH user).")
    flake_attr = models.CharField(
        "flake attribute",
        max_length=100,
        validators=[validators.validate_flake_attr],
        help_text="The <attr> of nixosConfigurations.<attr>.",
    )
    repository = models.ForeignKey(Repository, on_delete=models.PROTECT, related_name="nodes")
    credential = models.ForeignKey(Credential, on_delete=models.PROTECT, related_name="nodes")
    host_key = models.TextField(blank=True, editable=False, help_text="Pinned SSH host key (OpenSSH format).")
    host_key_fingerprint = models.CharField(max_length=100, blank=True, editable=False)
    host_key_pinned_at = models.DateTimeField(null=True, blank=True, editable=False)
    host_key_pinned_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, editable=False, related_name="+"
    )
    tags = models.ManyToManyField(Tag, blank=True, related_name="nodes")
    # Magic rollback (deployments/remote/confirm.py): after switch or test the node waits this long for the
    # panel to confirm over a new SSH connection, and goes back to the system before if none comes.
    confirm_timeout = models.PositiveIntegerField(
        "confirmation deadline (s)",
        default=30,
        help_text="Magic rollback: seconds the node waits after switch/test for the panel to confirm over a "
        "new SSH connection before it goes back by itself. 0 turns it off.",
    )
    # Where its system is built ("": its tags' default, else on the node); set by ``change.set_build_location``.
    build_location = models.CharField(
        max_length=8, choices=BuildLocation.choices, blank=True, default="", editable=False
    )
    build_host = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="+", editable=False
    )
    jump_host = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="nodes_behind",
        verbose_name="jump host",
        help_text="Reach this node through another registered node (a bastion, as OpenSSH's ProxyJump).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(port__gte=1, port__lte=65535), name="node_port_range"),
            models.CheckConstraint(condition=Q(confirm_timeout__lte=3600), name="node_confirm_timeout_range"),
        ]

    def __str__(self) -> str:
        return self.name

    def jump_path(self) -> list[Node]:
        """The bastions on the way to this node, the one the panel connects to first first.

        Raises ValidationError (on ``jump_host``) for a node that is its own bastion, a cycle, or more
        than ``MAX_JUMP_HOPS`` bastions. One query per hop; chains are short.
        """
        chain: list[Node] = []
        seen = {self.pk} if self.pk else set()
        hop_id = self.jump_host_id
        if hop_id is not None and hop_id == self.pk:
            raise ValidationError({"jump_host": "A node cannot be its own jump host."})
        while hop_id is not None:
            if hop_id in seen:
                raise ValidationError({"jump_host": "The jump hosts go round in a circle back to this node."})
            if len(chain) >= MAX_JUMP_HOPS:
                raise ValidationError({"jump_host": f"At most {MAX_JUMP_HOPS} jump hosts, one behind the other."})
            seen.add(hop_id)
            hop = Node.objects.select_related("credential").get(pk=hop_id)
            chain.append(hop)
            hop_id = hop.jump_host_id
        return chain[::-1]

    def clean(self) -> None:
        super().clean()
        if self.jump_host_id is not None:
            self.jump_path()

    def get_absolute_url(self) -> str:
        return reverse("deployments:node-detail", args=[self.name])

    @property
    def address(self) -> str:
        return f"{self.ssh_user}@{self.host}:{self.port}"


# The actions after whose success the node runs the deployed system (boot waits for a reboot).
RUNNING_SYSTEM_ACTIONS = ("switch", "test")


class Rollout(models.Model):
    """One action at one revision over many nodes, a few at a time (``deployments/rollouts.py``).

    Each node's run is an ordinary ``Deployment`` (own log, audit events and the
    node's one-active lock) pointing here, written ``queued`` at request time
    with a ``rollout_position``; positions below ``dispatched`` have been handed
    to the worker.  The revision is resolved once per repository at request
    time (``commits``), so every node of one repository gets the same commit.
    """

    class Status(models.TextChoices):
        RUNNING = "running", "Running"  # starting node deployments as slots free up
        STOPPING = "stopping", "Stopping"  # starts nothing more (failure policy, canary); waits for running nodes
        CANCELLING = "cancelling", "Cancelling"  # a user cancelled it: running nodes are being stopped
        SUCCEEDED = "succeeded", "Succeeded"  # every node succeeded
        FAILED = "failed", "Failed"  # some node did not succeed (stop_reason says why the rest did not run)
        CANCELLED = "cancelled", "Cancelled"  # a user cancelled it

    ACTIVE = (Status.RUNNING, Status.STOPPING, Status.CANCELLING)
    TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    action = models.CharField(max_length=16, choices=[(a, a) for a in REBUILD_ACTIONS])
    requested_revision = models.CharField(max_length=200, blank=True)  # as asked; empty: each branch's head
    commits = models.JSONField(default=dict)  # repository name -> the commit SHA it resolved to
    selection = models.JSONField(default=dict)  # how the nodes were chosen: tags, nodes, all
    node_count = models.PositiveIntegerField(default=0)
    parallelism = models.PositiveIntegerField(default=10)
    max_failures = models.PositiveIntegerField(null=True, blank=True)  # None: continue whatever fails
    canary_count = models.PositiveIntegerField(default=0)  # positions 0 .. canary_count-1 are the canaries
    canary_tag = models.CharField(max_length=50, blank=True)
    timeout_seconds = models.PositiveIntegerField(null=True, blank=True)  # default per node; None: the panel's
    dispatched = models.PositiveIntegerField(default=0)  # positions below this were handed to the worker
    canary_passed_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING, db_index=True)
    stop_reason = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_by_name = models.CharField(max_length=150, blank=True)
    trigger = models.CharField(max_length=8, default="web")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(parallelism__gte=1), name="rollout_parallelism_positive"),
            models.CheckConstraint(
                condition=Q(timeout_seconds__isnull=True) | Q(timeout_seconds__gte=1), name="rollout_timeout_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"rollout #{self.pk} {self.action}"

    def get_absolute_url(self) -> str:
        return reverse("deployments:rollout-detail", args=[self.pk])

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE


class Deployment(models.Model):
    """One run on one node, pinned to one commit: ``nixos-rebuild <action>`` (kind "rebuild"), a build and
    closure diff without activation ("diff"), or the switch to a diff's built system ("activate")."""

    class Kind(models.TextChoices):
        REBUILD = "rebuild", "Rebuild"  # build the commit (where the node builds) and run the action
        DIFF = "diff", "Difference"  # build, bring the system to the node, compare with what it runs; no switch
        ACTIVATE = "activate", "Activate"  # switch to a confirmed diff's built system (no second evaluation)
        ROLLBACK = "rollback", "Rollback"  # back to an earlier generation (deployments/rollbacks.py)

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"  # written by the request, waiting for a worker
        RUNNING = "running", "Running"  # claimed by exactly one worker
        SUCCEEDED = "succeeded", "Succeeded"  # nixos-rebuild exited 0
        FAILED = "failed", "Failed"  # nixos-rebuild ran and exited non-zero (see exit_code)
        ERROR = "error", "Error"  # we could not run it: SSH, auth, host key, shipping, panel bug
        CANCELLED = "cancelled", "Cancelled"  # a user asked to stop it
        INTERRUPTED = "interrupted", "Interrupted"  # the worker died or lost track mid-run
        UNHEALTHY = "unhealthy", "Unhealthy"  # activated, but a health check failed (policy: keep)
        ROLLED_BACK = "rolled_back", "Rolled back"  # activated, then the node went back to the system before

    ACTIVE = (Status.QUEUED, Status.RUNNING)
    TERMINAL = (
        Status.SUCCEEDED,
        Status.FAILED,
        Status.ERROR,
        Status.CANCELLED,
        Status.INTERRUPTED,
        Status.UNHEALTHY,
        Status.ROLLED_BACK,
    )
    # Ended with the node running what it built: succeeded, or unhealthy (a health check failed and its
    # policy kept the system). What the fleet view and sync status call what a node runs.
    DEPLOYED = (Status.SUCCEEDED, Status.UNHEALTHY)

    # The nixos-rebuild actions, from their one definition (remote.REBUILD_ACTIONS): SWITCH, BOOT, TEST, …
    Action = models.TextChoices("Action", [(a.upper().replace("-", "_"), (a, a)) for a in REBUILD_ACTIONS])

    class Trigger(models.TextChoices):
        WEB = "web", "Web"
        CLI = "cli", "Command line"
        API = "api", "API"
        GITOPS = "gitops", "GitOps"  # an auto-deploy after a push (deployments/gitops): the system acts

    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="deployments")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.REBUILD, db_index=True)
    action = models.CharField(max_length=16, choices=Action.choices)
    requested_revision = models.CharField(max_length=200, blank=True)
    commit_sha = models.CharField(max_length=40)
    flake_attr = models.CharField(max_length=100)
    archive_sha256 = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    exit_code = models.IntegerField(null=True, blank=True)
    error_message = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_by_name = models.CharField(max_length=150, blank=True)
    trigger = models.CharField(max_length=8, choices=Trigger.choices, default=Trigger.WEB)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    cancel_requested = models.BooleanField(default=False)
    generation_before = models.IntegerField(null=True, blank=True)
    generation_after = models.IntegerField(null=True, blank=True)
    system_before = models.CharField(max_length=300, blank=True)
    system_after = models.CharField(max_length=300, blank=True)
    toplevel = models.CharField("system path built", max_length=300, blank=True)
    line_count = models.PositiveIntegerField(default=0)
    byte_count = models.PositiveBigIntegerField(default=0)
    log_sha256 = models.CharField(max_length=64, blank=True)
    # Lines the log writer could not store (the database stayed unreachable too long), each gap as
    # {"after_seq": N, "lines": count, "reason": text}; empty when the stored log is complete.
    log_gaps = models.JSONField(default=list, blank=True)
    # A rollout's node: its place in the rollout's order (canaries first); None for a single deployment.
    rollout = models.ForeignKey(Rollout, null=True, blank=True, on_delete=models.PROTECT, related_name="deployments")
    rollout_position = models.PositiveIntegerField(null=True, blank=True)
    # Seconds the run may take on the node before the worker stops it (None: the panel's PANEL_DEPLOY_TIMEOUT).
    timeout_seconds = models.PositiveIntegerField(null=True, blank=True)
    # The run's folder on the node: its output and exit status stay there until the panel has read them.
    remote_dir = models.CharField(max_length=300, blank=True, editable=False)
    # When ``lifecycle.reconcile_deployment`` recorded what the node says about this interrupted deployment.
    reconciled_at = models.DateTimeField(null=True, blank=True, editable=False)
    # A rollback's generation: as asked (None: the previous one), then the one the node went to.
    target_generation = models.PositiveIntegerField(null=True, blank=True)
    # Where the system was built: "target", "panel" or "host:<node>" ("" before the run says).
    built_on = models.CharField(max_length=80, blank=True, editable=False)
    # A diff's outcome (``remote.closure.parse_diff``): packages added, removed, changed; sizes; reboot hint.
    diff = models.JSONField(null=True, blank=True, editable=False)
    # An activation's diff: the one deployment whose built system it switches to (confirmed once).
    diff_of = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="activation", editable=False
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # At most one active deployment per node, whatever the application does.
            models.UniqueConstraint(
                fields=["node"], condition=Q(status__in=["queued", "running"]), name="one_active_deployment_per_node"
            ),
            models.CheckConstraint(
                condition=Q(timeout_seconds__isnull=True) | Q(timeout_seconds__gte=1),
                name="deployment_timeout_positive",
            ),
        ]
        indexes = [
            models.Index(fields=["node", "-created_at"], name="deployment_node_recent"),
            models.Index(fields=["rollout", "rollout_position"], name="deployment_rollout_position"),
            # The fleet view's "what each node runs": its latest succeeded switch or test.  Not a partial
            # index: SQLite cannot match a partial index's condition to bound parameters.
            models.Index(fields=["node", "status", "-finished_at"], name="deployment_node_finished"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.action} {self.node.name}"

    def get_absolute_url(self) -> str:
        return reverse("deployments:deployment-detail", args=[self.pk])

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def short_sha(self) -> str:
        return self.commit_sha[:10]

    @property
    def duration(self):
        if not self.started_at:
            return None
        return (self.finished_at or timezone.now()) - self.started_at

    def status_payload(self) -> dict:
        """The fields a live page shows, as JSON-able values."""
        return {
            "id": self.pk,
            "status": self.status,
            "status_label": self.get_status_display(),
            "exit_code": self.exit_code,
            "error_message": self.error_message,
            "action": self.action,
            "commit_sha": self.commit_sha,
            "requested_by": self.requested_by_name,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "generation_before": self.generation_before,
            "generation_after": self.generation_after,
            "system_before": self.system_before,
            "system_after": self.system_after,
            "toplevel": self.toplevel,
            "line_count": self.line_count,
            "byte_count": self.byte_count,
            "log_sha256": self.log_sha256,
            "log_gaps": self.log_gaps,
            "cancel_requested": self.cancel_requested,
            "kind": self.kind,
            "target_generation": self.target_generation,
            "built_on": self.built_on,
            "diff": self.diff,
        }


class NodeGenerations(models.Model):
    """The last read of a node's system generations (``deployments/generations.py``), kept so the node page
    shows them without connecting; ``error`` says why the last read failed (then ``data`` is the read
    before it, if any)."""

    node = models.OneToOneField(Node, on_delete=models.CASCADE, related_name="generations_read")
    data = models.JSONField(default=dict)  # remote.generations.Generations.as_dict()
    read_at = models.DateTimeField(null=True, blank=True)  # the last successful read
    tried_at = models.DateTimeField(default=timezone.now)  # the last attempt, successful or not
    read_by_name = models.CharField(max_length=150, blank=True)
    error = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"generations of {self.node.name}"


class BuiltSystem(models.Model):
    """A system built off its target, once per (build location, commit, attribute): a rollout's nodes that
    need the same system wait for the one build and copy its result (``deployments/change.py``).

    ``location`` is "panel" or "host:<node id>"; the first deployment to insert the row builds
    (``building``), the others wait for ``built`` or ``failed``; a row whose builder ended without
    saying is taken over by a conditional UPDATE.
    """

    class Status(models.TextChoices):
        BUILDING = "building", "Building"  # a deployment is building it
        BUILT = "built", "Built"  # toplevel holds it on the build location, under a GC root
        FAILED = "failed", "Failed"  # the build failed: the waiting nodes fail too (no retry storm)

    location = models.CharField(max_length=40)
    commit_sha = models.CharField(max_length=40)
    flake_attr = models.CharField(max_length=100)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.BUILDING)
    toplevel = models.CharField(max_length=300, blank=True)
    error_message = models.TextField(blank=True)
    built_by = models.ForeignKey(Deployment, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["location", "commit_sha", "flake_attr"], name="built_system_once")
        ]

    def __str__(self) -> str:
        return f"{self.flake_attr}@{self.commit_sha[:10]} on {self.location}: {self.status}"


class LogChunk(models.Model):
    """A batch of consecutive log lines of one deployment.

    Lines carry a gap-free per-deployment sequence number: this chunk holds
    lines ``seq_start`` .. ``seq_end - 1``.  ``data`` is one entry per line,
    newline separated, each starting with its stream: ``o`` stdout, ``e``
    stderr, ``s`` the panel's own messages.  Batching keeps the row count low
    (a 200,000-line log is a few hundred rows) without losing per-line order.
    """

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="chunks")
    seq_start = models.PositiveIntegerField()
    seq_end = models.PositiveIntegerField()
    data = models.TextField()

    class Meta:
        ordering = ["deployment", "seq_start"]
        constraints = [
            models.UniqueConstraint(fields=["deployment", "seq_start"], name="logchunk_unique_start"),
        ]

    def lines(self) -> list[tuple[int, str, str]]:
        """Return ``(seq, stream, text)`` for each line of the chunk."""
        return [(self.seq_start + i, entry[:1], entry[1:]) for i, entry in enumerate(self.data.split("\n"))]


from .healthchecks import HealthCheck  # noqa: E402, F401  (a model module of its own, found through here)
