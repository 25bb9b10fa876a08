"""What the REST API reads and writes, field by field.  Input is judged by the panel's own validators
(``deployments.validators``: node names, tags, revisions refuse shell metacharacters), so the API
refuses exactly what the pages refuse; the state changes judge it again."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from deployments import change, logstream, rollouts
from deployments.access import gate
from deployments.audit.models import AuditEvent
from deployments.gitops.models import ApprovalRequest
from deployments.healthchecks import HealthCheck
from deployments.models import BuildLocation, Deployment, Node
from deployments.remote.generations import ROLLBACK_ACTIONS
from deployments.sync import notify
from deployments.sync.models import NodeSync, Subscription
from deployments.validators import (
    validate_comment,
    validate_node_name,
    validate_revision,
    validate_search_text,
    validate_tag,
)

from . import tokens
from .models import ApiToken

# --- input ---------------------------------------------------------------------------------------


class StrictBooleanField(serializers.BooleanField):
    """A JSON ``true`` or ``false`` only: DRF's own takes "yes", "on", 1; the JSON API refuses them."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=str(data)[:50])
        return data


class DeployRequest(serializers.Serializer):
    """A deployment of one node: ``nixos-rebuild <action>`` of ``revision`` (empty: the tracked branch)."""

    node = serializers.CharField(max_length=63, validators=[validate_node_name])
    action = serializers.ChoiceField(choices=Deployment.Action.choices, default=Deployment.Action.SWITCH)
    revision = serializers.CharField(
        max_length=200, required=False, allow_blank=True, default="", validators=[validate_revision]
    )
    timeout = serializers.IntegerField(
        min_value=1, max_value=settings.DEPLOY_TIMEOUT, required=False, allow_null=True, default=None
    )
    diff = StrictBooleanField(
        required=False,
        default=False,
        help_text="Build and show the difference first (kind diff, nothing switched); confirm it with "
        "POST /api/v1/deployments/{id}/confirm/. Not with action build.",
    )


class RolloutRequest(serializers.Serializer):
    """A rollout: the same options as the form and ``deploy --tag`` (``rollouts.Options``)."""

    action = serializers.ChoiceField(choices=Deployment.Action.choices, default=Deployment.Action.SWITCH)
    revision = serializers.CharField(
        max_length=200, required=False, allow_blank=True, default="", validators=[validate_revision]
    )
    tags = serializers.ListField(
        child=serializers.CharField(max_length=50, validators=[validate_tag]),
        required=False,
        default=list,
        max_length=rollouts.MAX_TAGS,
    )
    nodes = serializers.ListField(
        child=serializers.CharField(max_length=63, validators=[validate_node_name]),
        required=False,
        default=list,
        max_length=rollouts.MAX_NODES,
    )
    all = serializers.BooleanField(required=False, default=False, help_text="Every node you may deploy.")
    confirm_all = serializers.BooleanField(required=False, default=False, help_text="Needed with all.")
    parallelism = serializers.IntegerField(
        min_value=1, max_value=rollouts.MAX_PARALLELISM, required=False, default=rollouts.DEFAULT_PARALLELISM
    )
    canary = serializers.IntegerField(min_value=0, required=False, default=0)
    canary_tag = serializers.CharField(
        max_length=50, required=False, allow_blank=True, default="", validators=[validate_tag]
    )
    max_failures = serializers.IntegerField(min_value=1, required=False, allow_null=True, default=None)
    timeout = serializers.IntegerField(
        min_value=1, max_value=settings.DEPLOY_TIMEOUT, required=False, allow_null=True, default=None
    )
    node_timeouts = serializers.DictField(
        child=serializers.IntegerField(min_value=1, max_value=settings.DEPLOY_TIMEOUT), required=False, default=dict
    )

    def validate_node_timeouts(self, value):
        for name in value:
            validate_node_name(name)
        return value

    def options(self) -> rollouts.Options:
        data = self.validated_data
        return rollouts.Options(
            action=data["action"],
            revision=data["revision"],
            tags=sorted({t.lower() for t in data["tags"]}),
            nodes=sorted(set(data["nodes"])),
            all_nodes=data["all"],
            confirm_all=data["confirm_all"],
            parallelism=data["parallelism"],
            max_failures=data["max_failures"],
            canary=data["canary"],
            canary_tag=data["canary_tag"],
            timeout=data["timeout"],
            node_timeouts=data["node_timeouts"],
        )


class TokenRequest(serializers.Serializer):
    name = serializers.CharField(max_length=100, validators=[tokens.validate_token_name])
    expires_in_days = serializers.IntegerField(
        min_value=1, max_value=tokens.MAX_EXPIRY_DAYS, required=False, allow_null=True, default=None
    )


class RollbackRequest(serializers.Serializer):
    """Back to ``generation`` (null: the previous one), then ``switch`` to it now or ``boot`` it next time."""

    generation = serializers.IntegerField(
        min_value=1, max_value=999999999, required=False, allow_null=True, default=None
    )
    action = serializers.ChoiceField(choices=[(a, a) for a in ROLLBACK_ACTIONS], default="switch")

    def to_internal_value(self, data):
        # "3" would pass an IntegerField; a generation is a JSON number or null, nothing else.
        generation = data.get("generation") if isinstance(data, dict) else None
        if generation is not None and (isinstance(generation, bool) or not isinstance(generation, int)):
            raise serializers.ValidationError({"generation": ["a number (1 or more), or null for the previous one"]})
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    """Text only: a number or a list is refused, not turned into its string."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class DecisionRequest(serializers.Serializer):
    """Approve or reject, with an optional comment (plain text: no shell characters)."""

    comment = StrictCharField(
        max_length=1000, required=False, allow_blank=True, default="", trim_whitespace=False,
        validators=[validate_comment],
    )  # fmt: skip


class ConfirmTimeoutRequest(serializers.Serializer):
    confirm_timeout = serializers.IntegerField(
        min_value=0, max_value=3600, help_text="Seconds the node waits for the panel's confirmation; 0: off."
    )


class HealthCheckFields(serializers.ModelSerializer):
    """A check's own fields, judged by the model's validators (anchored patterns, no shell characters)."""

    class Meta:
        model = HealthCheck
        fields = [
            "name", "kind", "command", "host", "port", "url", "expected_status", "timeout_seconds", "retries",
            "interval_seconds", "on_failure",
        ]  # fmt: skip
        # Uniqueness per owner is the model's own check (full_clean), which knows the owner.
        validators = []


class HealthCheckRequest(HealthCheckFields):
    """A new check of one node (``node``) or one tag (``tag``): exactly one of them."""

    node = serializers.CharField(max_length=63, required=False, validators=[validate_node_name])
    tag = serializers.CharField(max_length=50, required=False, validators=[validate_tag])

    class Meta(HealthCheckFields.Meta):
        fields = ["node", "tag", *HealthCheckFields.Meta.fields]


class SubscriptionRequest(serializers.Serializer):
    """A team's subscription: where to (``target``: stored encrypted, never shown again) and which events."""

    team = StrictCharField(max_length=150, help_text="A team whose notifications you manage")
    name = StrictCharField(max_length=100)
    kind = serializers.ChoiceField(choices=Subscription.Kind.choices)
    target = StrictCharField(max_length=2000, write_only=True, help_text="Webhook URL or e-mail address")
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=list(notify.KINDS.items())), min_length=1, max_length=len(notify.KINDS)
    )
    enabled = serializers.BooleanField(required=False, default=True)

    def validate_name(self, value):
        value = value.strip()
        validate_search_text(value)
        return value

    def validate(self, data):
        try:
            data["target"] = notify.validate_target(data["kind"], data["target"])
        except DjangoValidationError as exc:
            raise serializers.ValidationError({"target": exc.messages}) from None
        return data


class BuildLocationRequest(serializers.Serializer):
    """Where a node's system is built (``change.set_build_location``): on the node itself (``target``), on
    the panel host (``panel``), on a build host (``host``: another node, which you must be allowed to
    deploy), or ``""``: its tags' default."""

    location = serializers.ChoiceField(choices=[("", "the tags' default"), *BuildLocation.choices])
    build_host = StrictCharField(
        max_length=63,
        required=False,
        allow_null=True,
        default=None,
        validators=[validate_node_name],
        help_text="The build host's node name, with location host only",
    )


class Empty(serializers.Serializer):
    """No fields: an empty body or ``{}``."""


# --- output --------------------------------------------------------------------------------------


class DeploymentOut(serializers.ModelSerializer):
    node = serializers.CharField(source="node.name")
    status_label = serializers.CharField(source="get_status_display")
    url = serializers.CharField(source="get_absolute_url")
    diff = serializers.JSONField(
        read_only=True,
        allow_null=True,
        help_text="A diff's outcome (kind diff): packages added, removed, changed; closure sizes; reboot hint",
    )
    diff_of = serializers.IntegerField(
        source="diff_of_id", read_only=True, allow_null=True, help_text="An activation's diff (kind activate)"
    )
    built_on = serializers.CharField(
        read_only=True, help_text="Where its system was built: target, panel or host:<name> ('' before the build)"
    )

    class Meta:
        model = Deployment
        fields = [
            "id", "node", "status", "status_label", "action", "requested_revision", "commit_sha", "flake_attr",
            "exit_code", "error_message", "requested_by_name", "trigger", "created_at", "started_at", "finished_at",
            "cancel_requested", "generation_before", "generation_after", "system_before", "system_after",
            "toplevel", "line_count", "byte_count", "log_sha256", "log_gaps", "rollout", "rollout_position",
            "timeout_seconds", "reconciled_at", "kind", "target_generation", "built_on", "diff", "diff_of", "url",
        ]  # fmt: skip
        read_only_fields = fields


class RunningOut(serializers.Serializer):
    """What the node runs: its latest succeeded ``switch`` or ``test``."""

    deployment = serializers.IntegerField()
    commit_sha = serializers.CharField()
    generation = serializers.IntegerField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    requested_by = serializers.CharField()


class LastOut(serializers.Serializer):
    """The node's latest deployment, whatever became of it."""

    deployment = serializers.IntegerField()
    status = serializers.CharField()
    action = serializers.CharField()
    exit_code = serializers.IntegerField(allow_null=True)
    at = serializers.DateTimeField()


class SyncOut(serializers.Serializer):
    """Where the node stands against its tracked branch, as the last refresh saw it (``unknown``: never checked)."""

    status = serializers.ChoiceField(choices=NodeSync.Status.choices)
    since = serializers.DateTimeField(allow_null=True)
    reason = serializers.CharField()
    commit_sha = serializers.CharField()
    expected_system = serializers.CharField()
    current_system = serializers.CharField()
    deployed_system = serializers.CharField()
    checked_at = serializers.DateTimeField(allow_null=True)


NEVER_CHECKED = {
    "status": NodeSync.Status.UNKNOWN,
    "since": None,
    "reason": "never checked",
    "commit_sha": "",
    "expected_system": "",
    "current_system": "",
    "deployed_system": "",
    "checked_at": None,
}


def sync_payload(sync: NodeSync | None) -> dict:
    if sync is None:
        return dict(NEVER_CHECKED)
    return SyncOut(sync).data


class NodeOut(serializers.ModelSerializer):
    tags = serializers.SerializerMethodField()
    repository = serializers.CharField(source="repository.name")
    running = serializers.SerializerMethodField()
    last = serializers.SerializerMethodField()
    can_deploy = serializers.BooleanField()
    can_admin = serializers.BooleanField()
    url = serializers.CharField(source="get_absolute_url")

    class Meta:
        model = Node
        fields = [
            "name", "host", "port", "ssh_user", "flake_attr", "repository", "tags", "host_key_fingerprint",
            "running", "last", "sync", "confirm_timeout", "can_deploy", "can_admin", "url",
        ]  # fmt: skip
        read_only_fields = fields

    sync = serializers.SerializerMethodField()

    @extend_schema_field(SyncOut)
    def get_sync(self, node) -> dict:
        try:
            return sync_payload(node.sync)
        except NodeSync.DoesNotExist:
            return sync_payload(None)

    def get_tags(self, node) -> list[str]:
        return sorted(t.name for t in node.tags.all())

    @extend_schema_field(RunningOut(allow_null=True))
    def get_running(self, node) -> dict | None:
        if node.run_id is None:
            return None
        return {
            "deployment": node.run_id,
            "commit_sha": node.run_commit,
            "generation": node.run_generation,
            "finished_at": node.run_at,
            "requested_by": node.run_by,
        }

    @extend_schema_field(LastOut(allow_null=True))
    def get_last(self, node) -> dict | None:
        if node.last_id is None:
            return None
        return {
            "deployment": node.last_id,
            "status": node.last_status,
            "action": node.last_action,
            "exit_code": node.last_exit_code,
            "at": node.last_at,
        }


class BuildLocationOut(serializers.Serializer):
    """Where the node's system is built (``change.effective_location``) and why."""

    location = serializers.ChoiceField(choices=BuildLocation.choices)
    source = serializers.CharField(help_text="node, tag <name> or default: whose setting decides")
    build_host = serializers.CharField(
        allow_null=True, help_text="With location host: the build host (null if you may not see it)"
    )
    node_setting = serializers.CharField(
        allow_blank=True, help_text="The node's own setting ('': its tags' default, else target)"
    )


class NodeDetailOut(NodeOut):
    """One node: what the list shows, with where it builds and the jump host it is reached through."""

    build_location = serializers.SerializerMethodField()
    build_host = serializers.SerializerMethodField(help_text="The build host of the node's own setting")
    jump_host = serializers.SerializerMethodField(
        help_text="The bastion it is reached through (null: none, or one you may not see)"
    )

    class Meta(NodeOut.Meta):
        fields = [*NodeOut.Meta.fields[:-1], "build_location", "build_host", "jump_host", "url"]
        read_only_fields = fields

    def _shown(self, node: Node | None) -> str | None:
        """A related node's name, only for a viewer the gate lets see it (``context["user"]``)."""
        if node is None or not gate.can(self.context["user"], gate.VIEW, node):
            return None
        return node.name

    @extend_schema_field(BuildLocationOut)
    def get_build_location(self, node) -> dict:
        where = change.effective_location(node)
        return {
            "location": where.kind,
            "source": where.source,
            "build_host": self._shown(where.host),
            "node_setting": node.build_location,
        }

    def get_build_host(self, node) -> str | None:
        return self._shown(node.build_host)

    def get_jump_host(self, node) -> str | None:
        return self._shown(node.jump_host)


class GenerationOut(serializers.Serializer):
    number = serializers.IntegerField()
    created_at = serializers.CharField(allow_null=True)
    path = serializers.CharField()
    default = serializers.BooleanField(help_text="The system profile points at it")
    current = serializers.BooleanField(help_text="It is /run/current-system")
    booted = serializers.BooleanField(help_text="It is /run/booted-system")
    deployment = serializers.IntegerField(allow_null=True, help_text="The deployment that made it (or its system)")
    commit = serializers.CharField()
    made_by_deployment = serializers.BooleanField()


class GenerationsOut(serializers.Serializer):
    """``generations.shown``: the node's last kept read (never a connection while answering a GET)."""

    node = serializers.CharField()
    read_at = serializers.CharField(allow_null=True)
    tried_at = serializers.CharField(allow_null=True)
    read_by = serializers.CharField()
    error = serializers.CharField(help_text="Why the last try failed ('' if it worked)")
    profile_generation = serializers.IntegerField(allow_null=True)
    current_system = serializers.CharField()
    booted_system = serializers.CharField()
    generations = GenerationOut(many=True)


class HealthCheckOut(serializers.ModelSerializer):
    node = serializers.CharField(source="node.name", allow_null=True, default=None)
    tag = serializers.CharField(source="tag.name", allow_null=True, default=None)
    description = serializers.CharField(source="describe")

    class Meta:
        model = HealthCheck
        fields = ["id", "node", "tag", *HealthCheckFields.Meta.fields, "description", "created_at"]
        read_only_fields = fields


class NodeHealthOut(serializers.Serializer):
    node = serializers.CharField()
    confirm_timeout = serializers.IntegerField(help_text="The magic-rollback deadline in seconds; 0: off")
    can_change = serializers.BooleanField(help_text="You may change the node's own checks and its deadline")
    checks = HealthCheckOut(many=True, help_text="The node's own checks and its tags'")


class ApprovalOut(serializers.ModelSerializer):
    nodes = serializers.SerializerMethodField()
    url = serializers.CharField(source="get_absolute_url")

    class Meta:
        model = ApprovalRequest
        fields = [
            "id", "kind", "status", "action", "revision", "commits", "nodes", "requested_by_name", "trigger",
            "created_at", "decided_by_name", "decided_at", "comment", "deployment", "rollout", "url",
        ]  # fmt: skip
        read_only_fields = fields

    def get_nodes(self, approval) -> list[str]:
        return sorted(n.name for n in approval.nodes.all())


class HeldOut(serializers.Serializer):
    """202: a protected node is touched, so the request waits for a second person (nothing started)."""

    error = serializers.CharField()
    approval = ApprovalOut()


class DecisionOut(serializers.Serializer):
    approval = ApprovalOut()
    deployment = DeploymentOut(allow_null=True, help_text="What the approval requested (a deployment)")
    rollout = serializers.IntegerField(allow_null=True, help_text="What the approval requested (a rollout)")


class SubscriptionOut(serializers.ModelSerializer):
    """A subscription as pages show it: the target masked (``target_display``), never the target itself."""

    team = serializers.CharField(source="team.name")

    class Meta:
        model = Subscription
        fields = ["id", "team", "name", "kind", "target_display", "events", "enabled", "created_at"]
        read_only_fields = fields


class LogLine(serializers.Serializer):
    seq = serializers.IntegerField()
    stream = serializers.ChoiceField(
        choices=[(code, name) for name, code in logstream.STREAM_CODES.items()],
        help_text="o: the run's stdout, e: its stderr, s: the panel's own notes",
    )
    text = serializers.CharField()


class LogPage(serializers.Serializer):
    lines = LogLine(many=True)
    next_after = serializers.IntegerField(help_text="Ask ?after= this for the lines that follow.")
    more = serializers.BooleanField(help_text="Lines after these are stored already.")
    status = serializers.CharField()
    finished = serializers.BooleanField(help_text="The deployment has ended: no line will be added.")


class RolloutCounts(serializers.Serializer):
    queued = serializers.IntegerField()
    running = serializers.IntegerField()
    succeeded = serializers.IntegerField()
    failed = serializers.IntegerField()
    cancelled = serializers.IntegerField()


class RolloutNodeRow(serializers.Serializer):
    deployment = serializers.IntegerField()
    node = serializers.CharField()
    position = serializers.IntegerField(allow_null=True)
    status = serializers.CharField()
    status_label = serializers.CharField()
    bucket = serializers.CharField()
    exit_code = serializers.IntegerField(allow_null=True)
    commit_sha = serializers.CharField()
    started_at = serializers.CharField(allow_null=True)
    finished_at = serializers.CharField(allow_null=True)
    duration_seconds = serializers.FloatField(allow_null=True)
    timeout_seconds = serializers.IntegerField(allow_null=True)
    error_message = serializers.CharField()
    cancel_requested = serializers.BooleanField()
    line_count = serializers.IntegerField()
    url = serializers.CharField()
    tail = LogLine(many=True, allow_null=True, help_text="A failed node's last lines (detail only).")


class RolloutOut(serializers.Serializer):
    """``rollouts.payload``: the rollout, its counts and one row per node the caller sees."""

    id = serializers.IntegerField()
    status = serializers.CharField()
    status_label = serializers.CharField()
    terminal = serializers.BooleanField()
    action = serializers.CharField()
    requested_revision = serializers.CharField()
    commits = serializers.DictField(child=serializers.CharField())
    selection = serializers.DictField()
    node_count = serializers.IntegerField()
    parallelism = serializers.IntegerField()
    max_failures = serializers.IntegerField(allow_null=True)
    canary_count = serializers.IntegerField()
    canary_tag = serializers.CharField()
    canary_passed_at = serializers.CharField(allow_null=True)
    timeout_seconds = serializers.IntegerField(allow_null=True)
    stop_reason = serializers.CharField()
    requested_by = serializers.CharField()
    created_at = serializers.CharField()
    finished_at = serializers.CharField(allow_null=True)
    counts = RolloutCounts()
    nodes = RolloutNodeRow(many=True)
    url = serializers.CharField()


class RolloutSummary(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()
    action = serializers.CharField()
    node_count = serializers.IntegerField()
    requested_by = serializers.CharField(source="requested_by_name")
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    url = serializers.CharField(source="get_absolute_url")


class TokenOut(serializers.ModelSerializer):
    state = serializers.SerializerMethodField()
    display = serializers.CharField()

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "display", "state", "created_at", "expires_at", "last_used_at", "revoked_at"]
        read_only_fields = fields

    def get_state(self, token) -> str:
        return token.state()


class NewTokenOut(TokenOut):
    token = serializers.SerializerMethodField(help_text="The whole token: shown this once, never again.")

    class Meta(TokenOut.Meta):
        fields = [*TokenOut.Meta.fields, "token"]
        read_only_fields = fields

    def get_token(self, token) -> str:
        return self.context["secret"]


class AuditEventOut(serializers.ModelSerializer):
    event = serializers.CharField(source="action", help_text="The event name (stored as ``action``).")

    class Meta:
        model = AuditEvent
        fields = [
            "seq", "created_at", "event", "actor_kind", "actor_id", "actor_name", "object_type", "object_id",
            "object_repr", "node_name", "outcome", "request_id", "source_ip", "hash", "prev_hash",
        ]  # fmt: skip
        read_only_fields = fields


class AuditEventDetailOut(AuditEventOut):
    details = serializers.JSONField(help_text="As the event page shows them: secrets in URLs redacted.")

    class Meta(AuditEventOut.Meta):
        fields = [*AuditEventOut.Meta.fields, "user_agent", "details"]
        read_only_fields = fields


class AuditPage(serializers.Serializer):
    results = AuditEventOut(many=True)
    next_before = serializers.IntegerField(allow_null=True, help_text="Ask ?before= this for older events.")


class AuditVerifyOut(serializers.Serializer):
    ok = serializers.BooleanField()
    checked_events = serializers.IntegerField()
    first_seq = serializers.IntegerField()
    last_seq = serializers.IntegerField()
    head_hash = serializers.CharField()
    since_checkpoint = serializers.CharField(allow_null=True)
    problem = serializers.CharField(allow_null=True)
    notes = serializers.ListField(child=serializers.CharField())


class Error(serializers.Serializer):
    error = serializers.CharField()
    fields = serializers.DictField(child=serializers.ListField(child=serializers.CharField()), required=False)
