"""The REST API's views (``/api/v1/``).  Thin, like the pages: the gate first (404 unseen, 403 seen but
not allowed, refusals audited where the pages audit them), then the input, then one state change of
``lifecycle`` or ``rollouts``; nothing here changes state itself.

Who is asking comes from ``authentication`` (a Bearer token or the session, CSRF enforced); every
view needs a signed-in user (401 otherwise) except the schema and its documentation page.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, renderers, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from deployments import change, generations, inventory, lifecycle, logstream, rollbacks, rollouts
from deployments.access import gate
from deployments.access.gate import DEPLOY, VIEW
from deployments.audit import checkpoint
from deployments.audit.models import AuditEvent
from deployments.audit.query import AuditFilter
from deployments.audit.verify import verify_since
from deployments.audit.views import LIST_FIELDS
from deployments.errors import AwaitingApproval, RequestError
from deployments.gitops import approvals
from deployments.healthchecks import HealthCheck
from deployments.models import Deployment, Node, Tag
from deployments.sync import notify
from deployments.sync import status as sync_status
from deployments.sync.models import NodeSync, Subscription
from deployments.validators import redact_url_secrets, validate_node_name, validate_search_text, validate_tag
from deployments.views.pages import _fleet as fleet_columns  # what each node runs: one definition, the fleet view's
from deployments.views.pages import _validate_sync  # the dashboard's sync filter: one rule

from . import logsse, tokens
from .framework import ByNamePagination, KeysetPagination, conflict
from .models import ApiToken
from .serializers import (
    ApprovalOut,
    AuditEventDetailOut,
    AuditEventOut,
    AuditPage,
    AuditVerifyOut,
    BuildLocationRequest,
    ConfirmTimeoutRequest,
    DecisionOut,
    DecisionRequest,
    DeploymentOut,
    DeployRequest,
    Empty,
    Error,
    GenerationsOut,
    HealthCheckFields,
    HealthCheckOut,
    HealthCheckRequest,
    HeldOut,
    LogPage,
    NewTokenOut,
    NodeDetailOut,
    NodeHealthOut,
    NodeOut,
    RollbackRequest,
    RolloutOut,
    RolloutRequest,
    RolloutSummary,
    SubscriptionOut,
    SubscriptionRequest,
    SyncOut,
    TokenOut,
    TokenRequest,
)

ERRORS = {
    400: OpenApiResponse(Error, description="Malformed input: what is wrong, by field"),
    401: OpenApiResponse(Error, description="Not signed in, or the token was refused"),
    403: OpenApiResponse(Error, description="Seen, but not allowed (the refusal is audited)"),
    404: OpenApiResponse(Error, description="No such object, or not visible to you"),
}
CONFLICT = {409: OpenApiResponse(Error, description="Busy, or already finished")}
HELD = {202: OpenApiResponse(HeldOut, description="A protected node is touched: held for a second person's approval")}
# How many log lines one call may ask for.
MAX_LOG_LIMIT = 5000


def _query(request, name: str, validate=None) -> str:
    """A GET filter, judged like the pages' filters (free text first, then its own rule); 400 names it."""
    value = request.query_params.get(name, "").strip()
    if value:
        try:
            validate_search_text(value)
            if validate is not None:
                validate(value)
        except ValidationError as exc:
            raise exceptions.ValidationError({name: exc.messages}) from None
    return value


def _int_query(request, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise exceptions.ValidationError({name: ["must be an integer"]}) from None
    if value < lo or (hi is not None and value > hi):
        raise exceptions.ValidationError({name: [f"must be between {lo} and {hi}" if hi else f"must be at least {lo}"]})
    return value


def _read(serializer_class, request):
    """The body judged by ``serializer_class``; a field it does not know is refused too (400), as the JSON
    API refuses it: a typo must not be silently ignored."""
    serializer = serializer_class(data=request.data)
    unknown = sorted(set(request.data) - set(serializer.fields))
    if unknown:
        raise exceptions.ValidationError({name[:50]: ["unknown field"] for name in unknown[:5]})
    serializer.is_valid(raise_exception=True)
    return serializer


def _empty_body(request) -> None:
    """Cancel and reconcile take no input: an empty body or ``{}``; anything else is refused (400)."""
    if request.data:
        raise exceptions.ValidationError({name: ["unknown field"] for name in list(request.data)[:5]})


# --- nodes -----------------------------------------------------------------------------------------


def _with_fleet(user, nodes) -> list[Node]:
    """``nodes`` (a page) with what each runs, its last deployment and the caller's buttons: one query."""
    shown = gate.annotate_permissions(Node.objects.filter(pk__in=[n.pk for n in nodes]), user)
    return list(fleet_columns(shown.prefetch_related("tags").select_related("repository", "sync")).order_by("name"))


@extend_schema(tags=["nodes"])
class NodeViewSet(viewsets.GenericViewSet):
    """Nodes you may see, with what each runs."""

    lookup_field = "name"
    lookup_value_regex = "[^/]+"
    serializer_class = NodeOut
    pagination_class = ByNamePagination
    queryset = Node.objects.none()  # each view asks the gate for its own

    @extend_schema(
        parameters=[
            OpenApiParameter("tag", str, description="Only nodes carrying this tag"),
            OpenApiParameter("q", str, description="Only nodes whose name contains this"),
            OpenApiParameter(
                "sync",
                str,
                enum=NodeSync.Status.values,
                description="Only nodes with this sync status (never checked: unknown)",
            ),
        ],
        responses={200: NodeOut(many=True), **ERRORS},
    )
    def list(self, request):
        nodes = gate.visible_nodes(request.user)
        tag = _query(request, "tag", validate_tag)
        if tag:
            nodes = nodes.filter(tags__name=tag)
        q = _query(request, "q")
        if q:
            nodes = nodes.filter(name__icontains=q)
        sync = _query(request, "sync", _validate_sync)
        if sync:
            nodes = nodes.filter(sync_status_filter(sync))
        page = self.paginate_queryset(nodes.only("pk", "name"))
        return self.get_paginated_response(NodeOut(_with_fleet(request.user, page), many=True).data)

    @extend_schema(responses={200: NodeDetailOut, **ERRORS})
    def retrieve(self, request, name=None):
        """One node, with where it builds and its jump host (each named only if you may see it)."""
        node = gate.node_for(request.user, name, VIEW)
        return Response(_detail(request.user, node))

    # --- where the node builds (deployments/change.py) ---

    @extend_schema(request=BuildLocationRequest, responses={200: NodeDetailOut, **ERRORS})
    @action(detail=True, methods=["post"], url_path="build-location", url_name="build-location")
    def build_location(self, request, name=None):
        """Set where the node builds (node admins).  A build host you may not deploy (or cannot see) is
        refused (403, audited): it would receive the source of everything built there."""
        node = gate.node_for(request.user, name, VIEW)
        gate.require(request.user, gate.ADMIN, node, event="build_location.changed")
        data = _read(BuildLocationRequest, request).validated_data
        host = None
        if data["build_host"] is not None:
            host = Node.objects.filter(name=data["build_host"]).first()
            if host is None or not gate.can(request.user, VIEW, host):
                # Unseen or unknown: refused as any node they may not deploy (the answer does not say which).
                gate.require_build_host(request.user, Node(pk=0, name="?"), event="build_location.changed", obj=node)
                raise exceptions.ValidationError({"build_host": ["no node has this name"]})
        try:
            change.set_build_location(node, data["location"], host, user=request.user)
        except RequestError as exc:
            raise exceptions.ValidationError({"build_host": [str(exc)]}) from None
        return Response(_detail(request.user, node))

    # --- sync status (deployments/sync) ---

    @extend_schema(request=Empty, responses={200: SyncOut, **ERRORS, **CONFLICT})
    @action(detail=True, methods=["post"], url_path="sync/refresh", url_name="sync-refresh")
    def sync_refresh(self, request, name=None):
        """Read the node and recompute its sync status now (its deployers); 409 while it is being deployed."""
        node = gate.node_for(request.user, name, VIEW)
        gate.require(request.user, DEPLOY, node, event="node.sync_changed")
        _empty_body(request)
        sync = sync_status.refresh_node(node, user=request.user)
        if sync is None:
            return conflict(f"{node.name} is being deployed: its sync status is read after the deployment.")
        return Response(SyncOut(sync).data)

    @extend_schema(request=Empty, responses={201: DeploymentOut, **HELD, **ERRORS, **CONFLICT})
    @action(detail=True, methods=["post"], url_path="sync/redeploy", url_name="sync-redeploy")
    def sync_redeploy(self, request, name=None):
        """Deploy (switch) the branch head the sync status was computed against, to a drifted or behind node
        (409 when it is neither, or busy)."""
        node = gate.node_for(request.user, name, VIEW)
        gate.require(request.user, DEPLOY, node, event="deployment.requested")
        _empty_body(request)
        sync = NodeSync.objects.filter(node=node).first()
        if sync is None or not sync.redeployable:
            return conflict(f"{node.name} is not drifted or behind: nothing to redeploy.")
        return _requested(
            lambda: lifecycle.request_deployment(
                node, action="switch", revision=sync.commit_sha, user=request.user, trigger=Deployment.Trigger.API
            )
        )

    # --- generations and rollback (deployments/generations.py, rollbacks.py) ---

    @extend_schema(responses={200: GenerationsOut, **ERRORS})
    @action(detail=True, methods=["get"])
    def generations(self, request, name=None):
        """The node's generations as last read (no connection to the node), each with the deployment that made it."""
        node = gate.node_for(request.user, name, VIEW)
        return Response({"node": node.name, **generations.shown(node).as_json()})

    @extend_schema(
        request=Empty,
        responses={
            200: GenerationsOut,
            502: OpenApiResponse(GenerationsOut, description="The node could not be read: `error` says why"),
            **ERRORS,
        },
    )
    @action(detail=True, methods=["post"], url_path="generations/read", url_name="generations-read")
    def generations_read(self, request, name=None):
        """Read the node's generations now over SSH (seeing the node is enough: nothing changes there)."""
        node = gate.node_for(request.user, name, VIEW)
        _empty_body(request)
        read = generations.read_node_generations(node, user=request.user)
        body = {"node": node.name, **generations.shown(node).as_json()}
        return Response(body, status=status.HTTP_502_BAD_GATEWAY if read.error else status.HTTP_200_OK)

    @extend_schema(request=RollbackRequest, responses={201: DeploymentOut, **HELD, **ERRORS, **CONFLICT})
    @action(detail=True, methods=["post"])
    def rollback(self, request, name=None):
        """Go back to a generation (null: the previous one): a deployment of kind ``rollback``."""
        node = gate.node_for(request.user, name, VIEW)
        gate.require(request.user, DEPLOY, node, event="deployment.requested")
        data = _read(RollbackRequest, request).validated_data
        return _requested(
            lambda: rollbacks.request_rollback(
                node,
                generation=data["generation"],
                action=data["action"],
                user=request.user,
                trigger=Deployment.Trigger.API,
            )
        )

    # --- health checks and the magic-rollback deadline (deployments/health.py) ---

    @extend_schema(responses={200: NodeHealthOut, **ERRORS})
    @action(detail=True, methods=["get"])
    def health(self, request, name=None):
        """The node's checks (its own and its tags') and its confirmation deadline."""
        node = gate.node_for(request.user, name, VIEW)
        return Response(
            {
                "node": node.name,
                "confirm_timeout": node.confirm_timeout,
                "can_change": gate.can_change_checks(request.user, node),
                "checks": HealthCheckOut(HealthCheck.for_node(node), many=True).data,
            }
        )

    @extend_schema(request=ConfirmTimeoutRequest, responses={200: NodeHealthOut, **ERRORS})
    @action(detail=True, methods=["post"], url_path="health/deadline", url_name="health-deadline")
    def health_deadline(self, request, name=None):
        """Set the magic-rollback deadline (node admins)."""
        node = gate.node_for(request.user, name, VIEW)
        gate.require(request.user, gate.ADMIN, node, event="node.changed")
        data = _read(ConfirmTimeoutRequest, request).validated_data
        inventory.set_confirm_timeout(node, data["confirm_timeout"], user=request.user)
        return self.health(request, name=name)


def _detail(user, node: Node) -> dict:
    shown = _with_fleet(user, [node])[0]
    return NodeDetailOut(shown, context={"user": user}).data


def sync_status_filter(wanted: str):
    """The dashboard's rule: a node never checked counts as unknown."""
    from django.db.models import Q

    unchecked = Q(sync__isnull=True) if wanted == NodeSync.Status.UNKNOWN else Q(pk__in=[])
    return Q(sync__status=wanted) | unchecked


def _requested(request_it):
    """Run a deploy/rollout request: 201 with the deployment, or 202 with the approval it is held for."""
    try:
        deployment = request_it()
    except AwaitingApproval as exc:
        return _held(exc)
    return Response(DeploymentOut(deployment).data, status=status.HTTP_201_CREATED)


def _held(exc: AwaitingApproval) -> Response:
    return Response({"error": str(exc), "approval": ApprovalOut(exc.approval).data}, status=status.HTTP_202_ACCEPTED)


# --- deployments -----------------------------------------------------------------------------------


def _validate_status(value: str) -> None:
    if value not in Deployment.Status.values:
        raise ValidationError(f"use one of {', '.join(Deployment.Status.values)}")


class EventStreamRenderer(renderers.JSONRenderer):
    """Lets a client ask for ``text/event-stream`` (DRF would answer 406 otherwise).  Only errors before the
    stream starts are rendered (the stream itself is a streaming response): as JSON, like every error."""

    media_type = "text/event-stream"
    format = "sse"


@extend_schema(tags=["deployments"])
class DeploymentViewSet(viewsets.GenericViewSet):
    """Deployments of nodes you may see; request, cancel and reconcile them where you may deploy."""

    serializer_class = DeploymentOut
    pagination_class = KeysetPagination
    queryset = Deployment.objects.none()

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        if isinstance(response, Response) and isinstance(request.accepted_renderer, EventStreamRenderer):
            response.content_type = "application/json"  # an error of the stream: JSON like every error
        return response

    @extend_schema(
        parameters=[
            OpenApiParameter("node", str, description="Only this node's deployments"),
            OpenApiParameter("status", str, enum=Deployment.Status.values, description="Only with this status"),
        ],
        responses={200: DeploymentOut(many=True), **ERRORS},
    )
    def list(self, request):
        deployments = gate.visible_deployments(request.user).select_related("node")
        node = _query(request, "node", validate_node_name)
        if node:
            deployments = deployments.filter(node__name=node)
        wanted = _query(request, "status", _validate_status)
        if wanted:
            deployments = deployments.filter(status=wanted)
        page = self.paginate_queryset(deployments)
        return self.get_paginated_response(DeploymentOut(page, many=True).data)

    @extend_schema(responses={200: DeploymentOut, **ERRORS})
    def retrieve(self, request, pk=None):
        return Response(DeploymentOut(gate.deployment_for(request.user, _pk(pk), VIEW)).data)

    @extend_schema(request=DeployRequest, responses={201: DeploymentOut, **HELD, **ERRORS, **CONFLICT})
    def create(self, request):
        """Deploy one node.  The node is judged first (404 unseen, 403 not a deployer: audited), then the rest."""
        name = request.data.get("node")
        if not isinstance(name, str) or not name:
            raise exceptions.ValidationError({"node": ["the node to deploy, by name"]})
        try:
            validate_node_name(name)
        except ValidationError as exc:
            raise exceptions.ValidationError({"node": exc.messages}) from None
        node = gate.node_for(request.user, name, VIEW)
        gate.require(request.user, DEPLOY, node, event="deployment.requested")
        data = _read(DeployRequest, request).validated_data
        return _requested(
            lambda: lifecycle.request_deployment(
                node,
                action=data["action"],
                revision=data["revision"],
                user=request.user,
                trigger=Deployment.Trigger.API,
                timeout_seconds=data["timeout"],
                kind=Deployment.Kind.DIFF if data["diff"] else Deployment.Kind.REBUILD,
            )
        )

    @extend_schema(
        request=Empty,
        responses={
            201: OpenApiResponse(DeploymentOut, description="The activation (kind activate, diff_of: this diff)"),
            **HELD,
            **ERRORS,
            409: OpenApiResponse(Error, description="Not a succeeded diff, confirmed already, or expired"),
        },
    )
    @action(detail=True, methods=["post"])
    def confirm(self, request, pk=None):
        """Switch the node to exactly the system a diff built (its deployers; once, while it is kept)."""
        diff = gate.deployment_for(request.user, _pk(pk), VIEW)
        gate.require(request.user, DEPLOY, diff.node, event="deployment.requested")
        _empty_body(request)
        try:
            activation = change.confirm_diff(diff, user=request.user, trigger=Deployment.Trigger.API)
        except AwaitingApproval as exc:
            return _held(exc)
        except RequestError as exc:
            return conflict(str(exc))
        return Response(DeploymentOut(activation).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=Empty, responses={200: DeploymentOut, **ERRORS, **CONFLICT})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Cancel a queued deployment, or stop a running one (its worker kills the run on the node)."""
        deployment = gate.deployment_for(request.user, _pk(pk), VIEW)
        gate.require(request.user, DEPLOY, deployment.node, event="deployment.cancel")
        _empty_body(request)
        try:
            deployment = lifecycle.cancel_deployment(deployment, user=request.user)
        except RequestError as exc:
            return conflict(str(exc))
        return Response(DeploymentOut(deployment).data)

    @extend_schema(
        request=Empty,
        responses={
            200: inline_serializer(
                "Reconciled",
                {
                    "summary": serializers.CharField(),
                    "final": serializers.BooleanField(help_text="The outcome is recorded"),
                    "running": serializers.BooleanField(help_text="The run still goes on on the node"),
                    "deployment": DeploymentOut(),
                },
            ),
            **ERRORS,
            **CONFLICT,
        },
    )
    @action(detail=True, methods=["post"])
    def reconcile(self, request, pk=None):
        """Ask the node what became of an interrupted deployment, and record it."""
        deployment = gate.deployment_for(request.user, _pk(pk), VIEW)
        gate.require(request.user, DEPLOY, deployment.node, event="deployment.reconcile")
        _empty_body(request)
        try:
            done = lifecycle.reconcile_deployment(deployment, user=request.user)
        except RequestError as exc:
            return conflict(str(exc))
        deployment = Deployment.objects.select_related("node").get(pk=deployment.pk)
        return Response(
            {
                "summary": done.summary,
                "final": bool(done.final),
                "running": bool(done.running),
                "deployment": DeploymentOut(deployment).data,
            }
        )

    @extend_schema(
        parameters=[
            OpenApiParameter("after", int, description="Lines after this seq (default -1: from the first)"),
            OpenApiParameter(
                "limit", int, description=f"At most this many lines (default 1000, at most {MAX_LOG_LIMIT})"
            ),
        ],
        responses={200: LogPage, **ERRORS},
    )
    @action(detail=True, methods=["get"])
    def log(self, request, pk=None):
        """The stored log lines after ``after``, by seq; ``next_after`` continues."""
        deployment = gate.deployment_for(request.user, _pk(pk), VIEW)
        after = _int_query(request, "after", -1, -1)
        limit = _int_query(request, "limit", 1000, 1, MAX_LOG_LIMIT)
        # The status first: once it is terminal every line is stored, so "finished" never hides a late line.
        finished = deployment.status in Deployment.TERMINAL
        lines = logstream.lines_after(deployment.pk, after, limit=limit + 1)
        more, lines = len(lines) > limit, lines[:limit]
        return Response(
            {
                "lines": [{"seq": s, "stream": st, "text": t} for s, st, t in lines],
                "next_after": lines[-1][0] if lines else after,
                "more": more,
                "status": deployment.status,
                "finished": finished and not more,
            }
        )

    @extend_schema(
        parameters=[OpenApiParameter("after", int, description="Lines after this seq (default -1: from the first)")],
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                OpenApiTypes.STR,
                description="Server-sent events: `line` (id = seq, data = {seq, stream, text}) for every line, "
                "then one `end` (data = {status, next_after}) when the deployment has ended; comments as "
                "keep-alives; `error` if access is lost meanwhile.",
            ),
            **ERRORS,
        },
    )
    @action(
        detail=True,
        methods=["get"],
        url_path="log/stream",
        url_name="log-stream",
        renderer_classes=[renderers.JSONRenderer, EventStreamRenderer],
    )
    def log_stream(self, request, pk=None):
        """Follow the log: the stored lines after ``after``, then new ones as they come, until it ends."""
        deployment = gate.deployment_for(request.user, _pk(pk), VIEW)
        after = _int_query(request, "after", -1, -1)
        follower = logsse.Follower(
            deployment.pk,
            after=after,
            user_id=request.user.pk,
            token_id=request.auth.pk if isinstance(request.auth, ApiToken) else None,
        )
        response = StreamingHttpResponse(
            follower.stream(asynchronous=logsse.is_asgi(request)), content_type="text/event-stream; charset=utf-8"
        )
        response["X-Accel-Buffering"] = "no"  # a proxy must pass each event on at once
        return response


def _pk(raw) -> int:
    """A deployment, rollout or token id from the URL: digits only (anything else is not found)."""
    if not str(raw).isdigit() or len(str(raw)) > 18:
        raise Http404("not found")
    return int(raw)


# --- rollouts --------------------------------------------------------------------------------------


@extend_schema(tags=["rollouts"])
class RolloutViewSet(viewsets.GenericViewSet):
    """Rollouts with a node you see (showing only the nodes you see); start one where you may deploy."""

    serializer_class = RolloutSummary
    pagination_class = KeysetPagination
    queryset = Deployment.objects.none()

    @extend_schema(responses={200: RolloutSummary(many=True), **ERRORS})
    def list(self, request):
        page = self.paginate_queryset(gate.visible_rollouts(request.user))
        return self.get_paginated_response(RolloutSummary(page, many=True).data)

    @extend_schema(request=RolloutRequest, responses={201: RolloutOut, **HELD, **ERRORS, **CONFLICT})
    def create(self, request):
        """Start a rollout.  Whoever may deploy nowhere is refused (403, audited) before the body is judged;
        every selected node must be deployable, or the whole rollout is refused."""
        gate.require_somewhere(request.user, DEPLOY, event="rollout.requested")
        options = _read(RolloutRequest, request).options()
        try:
            rollout = rollouts.request_rollout(options, user=request.user, trigger=Deployment.Trigger.API)
        except AwaitingApproval as exc:
            return _held(exc)
        data = rollouts.payload(rollout, gate.rollout_deployments(request.user, rollout), tails=False)
        return Response(data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={200: RolloutOut, **ERRORS})
    def retrieve(self, request, pk=None):
        rollout = gate.rollout_for(request.user, _pk(pk))
        return Response(rollouts.payload(rollout, gate.rollout_deployments(request.user, rollout)))

    @extend_schema(request=Empty, responses={200: RolloutOut, **ERRORS, **CONFLICT})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Cancel the rollout: needs DEPLOY on every node of it."""
        rollout = gate.rollout_for(request.user, _pk(pk))
        gate.require_every(request.user, DEPLOY, gate.rollout_nodes(rollout), event="rollout.cancel")
        _empty_body(request)
        try:
            rollout = rollouts.cancel_rollout(rollout, user=request.user)
        except RequestError as exc:
            return conflict(str(exc))
        return Response(rollouts.payload(rollout, gate.rollout_deployments(request.user, rollout), tails=False))


# --- approvals (deployments/gitops/approvals.py) -------------------------------------------------------


def _validate_bool(value: str) -> None:
    if value not in ("true", "false"):
        raise ValidationError("use true or false")


@extend_schema(tags=["approvals"])
class ApprovalViewSet(viewsets.GenericViewSet):
    """Requests held for a protected node: those with a node you see; decide them where you may deploy every
    node of one (never your own)."""

    serializer_class = ApprovalOut
    pagination_class = KeysetPagination
    queryset = Deployment.objects.none()

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "decidable", str, enum=["true", "false"], description="true: only the pending ones you may decide"
            ),
            OpenApiParameter("status", str, enum=approvals.Status.values, description="Only with this status"),
        ],
        responses={200: ApprovalOut(many=True), **ERRORS},
    )
    def list(self, request):
        decidable = _query(request, "decidable", _validate_bool) == "true"
        found = approvals.decidable(request.user) if decidable else approvals.visible(request.user)
        wanted = _query(request, "status", _validate_approval_status)
        if wanted:
            found = found.filter(status=wanted)
        page = self.paginate_queryset(found.prefetch_related("nodes"))
        return self.get_paginated_response(ApprovalOut(page, many=True).data)

    @extend_schema(responses={200: ApprovalOut, **ERRORS})
    def retrieve(self, request, pk=None):
        return Response(ApprovalOut(approvals.approval_for(request.user, _pk(pk))).data)

    @extend_schema(request=DecisionRequest, responses={200: DecisionOut, **ERRORS, **CONFLICT})
    @action(detail=True, methods=["post"])
    def approve(self, request, pk=None):
        """Approve: the deployment or rollout is requested as the requester, pinned to its commits.  409 when it is
        no longer pending, expired (the branch moved), or cannot start (busy)."""
        return self._decide(request, pk, "approved")

    @extend_schema(request=DecisionRequest, responses={200: DecisionOut, **ERRORS, **CONFLICT})
    @action(detail=True, methods=["post"])
    def reject(self, request, pk=None):
        """Reject: nothing starts."""
        return self._decide(request, pk, "rejected")

    def _decide(self, request, pk, decision: str):
        approval = approvals.approval_for(request.user, _pk(pk))
        approvals.require_decider(approval, request.user, f"approval.{decision}")
        comment = _read(DecisionRequest, request).validated_data["comment"]
        result = None
        try:
            if decision == "approved":
                result = approvals.approve(approval, user=request.user, comment=comment)
            else:
                approvals.reject(approval, user=request.user, comment=comment)
        except RequestError as exc:
            return conflict(str(exc))
        approval.refresh_from_db()
        return Response(
            {
                "approval": ApprovalOut(approval).data,
                "deployment": DeploymentOut(result).data if isinstance(result, Deployment) else None,
                "rollout": result.pk if result is not None and not isinstance(result, Deployment) else None,
            }
        )


def _validate_approval_status(value: str) -> None:
    if value not in approvals.Status.values:
        raise ValidationError(f"use one of {', '.join(approvals.Status.values)}")


# --- health checks (deployments/healthchecks.py; changed through inventory) -----------------------------


def _visible_checks(user):
    """Checks ``user`` may read: those of nodes they see and of those nodes' tags (the node page shows them);
    every tag's for whoever may view the inventory (the tag pages)."""
    from django.db.models import Q

    nodes = gate.visible_nodes(user)
    seen = Q(node__in=nodes) | Q(tag__nodes__in=nodes)
    if gate.may(user, gate.VIEW_INVENTORY):
        seen |= Q(tag__isnull=False)
    return HealthCheck.objects.filter(seen).distinct().select_related("node", "tag")


@extend_schema(tags=["health checks"])
class HealthCheckViewSet(viewsets.GenericViewSet):
    """Health checks of nodes and tags.  A node's are changed by its admins; a tag's by inventory managers
    (a command check also needs admin of every node carrying the tag).  The gate first, then the input."""

    serializer_class = HealthCheckOut
    pagination_class = KeysetPagination
    queryset = HealthCheck.objects.none()

    @extend_schema(
        parameters=[
            OpenApiParameter("node", str, description="Only this node's own checks"),
            OpenApiParameter("tag", str, description="Only this tag's checks"),
        ],
        responses={200: HealthCheckOut(many=True), **ERRORS},
    )
    def list(self, request):
        checks = _visible_checks(request.user)
        node = _query(request, "node", validate_node_name)
        if node:
            checks = checks.filter(node__name=node)
        tag = _query(request, "tag", validate_tag)
        if tag:
            checks = checks.filter(tag__name=tag)
        page = self.paginate_queryset(checks)
        return self.get_paginated_response(HealthCheckOut(page, many=True).data)

    @extend_schema(responses={200: HealthCheckOut, **ERRORS})
    def retrieve(self, request, pk=None):
        return Response(HealthCheckOut(self._check(request, pk)).data)

    @extend_schema(request=HealthCheckRequest, responses={201: HealthCheckOut, **ERRORS})
    def create(self, request):
        """Add a check to ``node`` or ``tag``: the owner is judged first (404 unseen, 403 not allowed: audited)."""
        node, tag = self._owner(request)
        gate.require_check_change(request.user, node=node, tag=tag, event="health_check.change")
        data = dict(_read(HealthCheckRequest, request).validated_data)
        data.pop("node", None), data.pop("tag", None)
        check = _valid(HealthCheck(node=node, tag=tag, **data))
        inventory.save_health_check(check, user=request.user)
        return Response(HealthCheckOut(check).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=HealthCheckFields(partial=True), responses={200: HealthCheckOut, **ERRORS})
    def partial_update(self, request, pk=None):
        """Change some fields of a check (its owner stays)."""
        check = self._check(request, pk)
        gate.require_check_change(request.user, node=check.node, tag=check.tag, event="health_check.change")
        serializer = HealthCheckFields(data=request.data, partial=True)
        unknown = sorted(set(request.data) - set(serializer.fields))
        if unknown:
            raise exceptions.ValidationError({name[:50]: ["unknown field"] for name in unknown[:5]})
        serializer.is_valid(raise_exception=True)
        for field_name, value in serializer.validated_data.items():
            setattr(check, field_name, value)
        inventory.save_health_check(_valid(check), user=request.user)
        return Response(HealthCheckOut(check).data)

    @extend_schema(responses={204: None, **ERRORS})
    def destroy(self, request, pk=None):
        check = self._check(request, pk)
        inventory.delete_health_check(check, user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _check(self, request, pk) -> HealthCheck:
        check = _visible_checks(request.user).filter(pk=_pk(pk)).first()
        if check is None:
            raise Http404("No such health check")
        return check

    def _owner(self, request):
        """(node, tag) named by the body: exactly one; an unseen node or an unknown tag is 404."""
        name, tag = request.data.get("node"), request.data.get("tag")
        if (name is None) == (tag is None):
            raise exceptions.ValidationError({"node": ["give the node or the tag whose check this is (one of them)"]})
        field, value, check = ("node", name, validate_node_name) if name is not None else ("tag", tag, validate_tag)
        if not isinstance(value, str) or not value:
            raise exceptions.ValidationError({field: ["a name"]})
        try:
            check(value)
        except ValidationError as exc:
            raise exceptions.ValidationError({field: exc.messages}) from None
        if field == "node":
            return gate.node_for(request.user, value, VIEW), None
        found = Tag.objects.filter(name=value).first()
        if found is None:
            raise Http404("No such tag")
        return None, found


def _valid(check: HealthCheck) -> HealthCheck:
    """The model's own validation (each field's validators, the fields its kind needs, unique per owner): 400 by field."""
    try:
        check.full_clean(exclude=["created_by"])
    except ValidationError as exc:
        raise exceptions.ValidationError(exc.message_dict) from None
    return check


# --- notification subscriptions (deployments/sync/notify.py) ------------------------------------------


@extend_schema(tags=["notifications"])
class SubscriptionViewSet(viewsets.GenericViewSet):
    """Your teams' notification subscriptions (team admins; every team's for whoever manages teams).  The
    target is written once and shown masked (``target_display``), never returned."""

    serializer_class = SubscriptionOut
    pagination_class = KeysetPagination
    queryset = Subscription.objects.none()

    @extend_schema(responses={200: SubscriptionOut(many=True), **ERRORS})
    def list(self, request):
        teams = gate.subscription_teams(request.user)
        page = self.paginate_queryset(Subscription.objects.filter(team__in=teams).select_related("team"))
        return self.get_paginated_response(SubscriptionOut(page, many=True).data)

    @extend_schema(responses={200: SubscriptionOut, **ERRORS})
    def retrieve(self, request, pk=None):
        return Response(SubscriptionOut(self._managed(request, pk)).data)

    @extend_schema(request=SubscriptionRequest, responses={201: SubscriptionOut, **ERRORS})
    def create(self, request):
        """Subscribe a team you manage.  Whoever manages none is refused (403, audited) before the body is read."""
        teams = gate.subscription_teams(request.user)
        if not teams.exists():
            gate.require_global(request.user, gate.MANAGE_TEAMS, event="subscription.changed")
        data = _read(SubscriptionRequest, request).validated_data
        # Only the caller's teams are looked at: another team's name is the same answer as an unknown one.
        team = teams.filter(name=data["team"]).first()
        if team is None:
            raise exceptions.ValidationError({"team": ["no team whose notifications you manage has this name"]})
        gate.require_subscriptions(request.user, team, event="subscription.changed")
        if Subscription.objects.filter(team=team, name=data["name"]).exists():
            raise exceptions.ValidationError({"name": ["the team has a subscription of this name"]})
        sub = Subscription(
            team=team, name=data["name"], kind=data["kind"], events=list(data["events"]), enabled=data["enabled"]
        )
        try:
            notify.save_subscription(sub, target=data["target"], user=request.user)
        except ValidationError as exc:
            raise exceptions.ValidationError({"events": exc.messages}) from None
        return Response(SubscriptionOut(sub).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={204: None, **ERRORS})
    def destroy(self, request, pk=None):
        notify.delete_subscription(self._managed(request, pk), user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _managed(self, request, pk) -> Subscription:
        """As the subscription pages: 404 if there is none, 403 (audited) unless you manage its team."""
        subscription = Subscription.objects.select_related("team").filter(pk=_pk(pk)).first()
        if subscription is None:
            raise Http404("No such subscription")
        gate.require_subscriptions(request.user, subscription.team, event="subscription.changed")
        return subscription


# --- the audit trail ---------------------------------------------------------------------------------


def _require_auditor(request) -> None:
    if not gate.may(request.user, gate.AUDIT):
        raise PermissionDenied("Only auditors read the audit trail.")


@extend_schema(tags=["audit"])
class AuditEventViewSet(viewsets.GenericViewSet):
    """The audit trail, for auditors: the review page's filters, newest first, paged by ``before``."""

    lookup_field = "seq"
    lookup_value_regex = "[0-9]{1,18}"
    serializer_class = AuditEventOut
    queryset = AuditEvent.objects.none()

    @extend_schema(
        parameters=[
            OpenApiParameter("actor", str, description="Who acted (a user name)"),
            OpenApiParameter("node", str, description="The node's name"),
            OpenApiParameter("action", str, description="The event, e.g. deployment.requested, or deployment.*"),
            OpenApiParameter("outcome", str, enum=AuditEvent.Outcome.values),
            OpenApiParameter("since", str, description="YYYY-MM-DD or an ISO date-time (UTC if naive)"),
            OpenApiParameter("until", str, description="YYYY-MM-DD (inclusive) or an ISO date-time"),
            OpenApiParameter("q", str, description="Free text in the object or node name"),
            OpenApiParameter("request", str, description="A request id"),
            OpenApiParameter("object_type", str),
            OpenApiParameter("object_id", str),
            OpenApiParameter("before", int, description="Events older than this seq"),
            OpenApiParameter("limit", int, description="At most this many (default 100, at most 500)"),
        ],
        responses={200: AuditPage, **ERRORS},
    )
    def list(self, request):
        _require_auditor(request)
        found, errors = AuditFilter.from_data(request.query_params)
        if errors:
            raise exceptions.ValidationError({e.split(":", 1)[0]: [e.split(":", 1)[1].strip()] for e in errors})
        before = _int_query(request, "before", None, 1)
        limit = _int_query(request, "limit", 100, 1, 500)
        events = found.page(below=before, limit=limit + 1, fields=(*LIST_FIELDS, "prev_hash", "hash"))
        return Response(
            {
                "results": AuditEventOut(events[:limit], many=True).data,
                "next_before": events[limit - 1].seq if len(events) > limit else None,
            }
        )

    @extend_schema(responses={200: AuditEventDetailOut, **ERRORS})
    def retrieve(self, request, seq=None):
        _require_auditor(request)
        event = AuditEvent.objects.filter(seq=int(seq)).first()
        if event is None:
            raise Http404("No such audit event")
        data = AuditEventDetailOut(event).data
        # As the event page shows it: a URL with a secret in it (from before URLs were validated) redacted.
        data["details"] = _redacted(event.details)
        return Response(data)

    @extend_schema(responses={200: AuditVerifyOut, **ERRORS})
    @action(detail=False, methods=["get"])
    def verify(self, request):
        """The chain since the last signed checkpoint (each checkpoint verified what came before it): cheap,
        as the checkpoint schedule signs every 15 minutes.  ``manage.py audit verify`` walks everything."""
        _require_auditor(request)
        try:
            public, _ = checkpoint.verification_key()
        except checkpoint.KeyUnavailable as exc:
            return Response(_verify_payload(None, None, problem=str(exc)))
        chain = checkpoint.load_chain(public)
        if chain.problem:
            return Response(_verify_payload(None, chain, problem=str(chain.problem), notes=chain.notes))
        report = verify_since(chain)
        return Response(_verify_payload(report, chain))


def _redacted(value):
    if isinstance(value, str):
        return redact_url_secrets(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def _verify_payload(report, chain, *, problem: str | None = None, notes=()) -> dict:
    latest = chain.latest[0] if chain is not None and chain.latest else None
    if report is None:
        return {
            "ok": False,
            "checked_events": 0,
            "first_seq": 0,
            "last_seq": 0,
            "head_hash": "",
            "since_checkpoint": latest,
            "problem": problem,
            "notes": list(notes),
        }
    return {
        "ok": report.ok,
        "checked_events": report.count,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
        "head_hash": report.head_hash,
        "since_checkpoint": latest,
        "problem": str(report.problem) if report.problem else None,
        "notes": [*chain.notes, *report.notes],
    }


# --- one's own API tokens ----------------------------------------------------------------------------


@extend_schema(tags=["tokens"])
class TokenViewSet(viewsets.GenericViewSet):
    """Your own API tokens.  Creating one needs a signed-in session (the API tokens page, or this API with
    the session): a token that could make tokens would outlive its own revocation."""

    serializer_class = TokenOut
    queryset = ApiToken.objects.none()

    def _own(self, request):
        return ApiToken.objects.filter(user=request.user)

    @extend_schema(responses={200: TokenOut(many=True), **ERRORS})
    def list(self, request):
        return Response(TokenOut(self._own(request), many=True).data)

    @extend_schema(request=TokenRequest, responses={201: NewTokenOut, **ERRORS})
    def create(self, request):
        if isinstance(request.auth, ApiToken):
            raise exceptions.PermissionDenied("A token cannot create tokens: create one from a signed-in session.")
        data = _read(TokenRequest, request).validated_data
        token, secret = tokens.create_token(request.user, name=data["name"], expires_in_days=data["expires_in_days"])
        return Response(NewTokenOut(token, context={"secret": secret}).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=Empty, responses={200: TokenOut, **ERRORS, **CONFLICT})
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        """Revoke one of your tokens (another user's is not found)."""
        token = self._own(request).filter(pk=_pk(pk)).first()
        if token is None:
            raise Http404("No such token")
        _empty_body(request)
        try:
            tokens.revoke_token(token, user=request.user)
        except RequestError as exc:
            return conflict(str(exc))
        return Response(TokenOut(token).data)
