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

from deployments import lifecycle, logstream, rollouts
from deployments.access import gate
from deployments.access.gate import DEPLOY, VIEW
from deployments.audit import checkpoint
from deployments.audit.models import AuditEvent
from deployments.audit.query import AuditFilter
from deployments.audit.verify import verify_since
from deployments.audit.views import LIST_FIELDS
from deployments.errors import RequestError
from deployments.models import Deployment, Node
from deployments.validators import redact_url_secrets, validate_node_name, validate_search_text, validate_tag
from deployments.views.pages import _fleet as fleet_columns  # what each node runs: one definition, the fleet view's

from . import logsse, tokens
from .framework import ByNamePagination, KeysetPagination, conflict
from .models import ApiToken
from .serializers import (
    AuditEventDetailOut,
    AuditEventOut,
    AuditPage,
    AuditVerifyOut,
    DeploymentOut,
    DeployRequest,
    Empty,
    Error,
    LogPage,
    NewTokenOut,
    NodeOut,
    RolloutOut,
    RolloutRequest,
    RolloutSummary,
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
    return list(fleet_columns(shown.prefetch_related("tags").select_related("repository")).order_by("name"))


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
        page = self.paginate_queryset(nodes.only("pk", "name"))
        return self.get_paginated_response(NodeOut(_with_fleet(request.user, page), many=True).data)

    @extend_schema(responses={200: NodeOut, **ERRORS})
    def retrieve(self, request, name=None):
        node = gate.node_for(request.user, name, VIEW)
        return Response(NodeOut(_with_fleet(request.user, [node])[0]).data)


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

    @extend_schema(request=DeployRequest, responses={201: DeploymentOut, **ERRORS, **CONFLICT})
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
        deployment = lifecycle.request_deployment(
            node,
            action=data["action"],
            revision=data["revision"],
            user=request.user,
            trigger=Deployment.Trigger.API,
            timeout_seconds=data["timeout"],
        )
        return Response(DeploymentOut(deployment).data, status=status.HTTP_201_CREATED)

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

    @extend_schema(request=RolloutRequest, responses={201: RolloutOut, **ERRORS, **CONFLICT})
    def create(self, request):
        """Start a rollout.  Whoever may deploy nowhere is refused (403, audited) before the body is judged;
        every selected node must be deployable, or the whole rollout is refused."""
        gate.require_somewhere(request.user, DEPLOY, event="rollout.requested")
        options = _read(RolloutRequest, request).options()
        rollout = rollouts.request_rollout(options, user=request.user, trigger=Deployment.Trigger.API)
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
