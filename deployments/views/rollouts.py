"""Rollout pages and their JSON API.  Thin, like the other views: the gate first, then the input, then one
call into ``deployments.rollouts``.

A rollout is visible to whoever sees one of its nodes, and shows them only those nodes' rows and
counts; cancelling it needs DEPLOY on every node of it.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Count, Q
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from .. import logstream, rollouts
from ..access import gate
from ..access.gate import DEPLOY
from ..errors import AwaitingApproval, NodeBusy, RequestError
from ..forms import RolloutForm
from ..models import Deployment, Rollout
from ..rollouts import Options
from .api import ApiError, _api_login_required, json_object

# --- pages -------------------------------------------------------------------------------------------


@login_required
@require_GET
def rollout_list(request):
    visible = gate.visible_deployments(request.user)
    in_view = Q(deployments__in=visible.values("pk"))
    rows = gate.visible_rollouts(request.user).annotate(
        shown=Count("deployments", filter=in_view),
        **{
            name: Count("deployments", filter=in_view & Q(deployments__status__in=statuses))
            for name, statuses in _BUCKET_STATUSES.items()
        },
    )
    page = Paginator(rows.order_by("-created_at", "-id"), 50).get_page(request.GET.get("page"))
    return render(
        request,
        "deployments/rollout_list.html",
        {"page": page, "can_start": gate.can(request.user, DEPLOY)},
    )


_BUCKET_STATUSES = {
    name: [status for status, bucket in rollouts.BUCKETS.items() if bucket == name] for name in rollouts.COUNT_NAMES
}


@login_required
@require_http_methods(["GET", "POST"])
def rollout_new(request):
    # The gate first: whoever may deploy nowhere gets 403 (audited), whatever they sent.
    gate.require_somewhere(request.user, DEPLOY, event="rollout.requested")
    form = RolloutForm(request.POST or None, initial={"tags": request.GET.get("tag", "")})
    if request.method == "POST" and form.is_valid():
        try:
            rollout = rollouts.request_rollout(form.options(), user=request.user)
        except AwaitingApproval as exc:
            messages.info(request, str(exc))
            return redirect(exc.approval)
        except RequestError as exc:
            form.add_error(None, str(exc))
        else:
            return redirect(rollout)
    status = 400 if request.method == "POST" else 200
    return render(request, "deployments/rollout_form.html", {"form": form}, status=status)


@login_required
@require_GET
def rollout_detail(request, pk):
    rollout = gate.rollout_for(request.user, pk)
    deployments = gate.rollout_deployments(request.user, rollout)
    data = rollouts.payload(rollout, deployments)
    return render(
        request,
        "deployments/rollout_detail.html",
        {
            "rollout": rollout,
            "data": data,
            "hidden_nodes": rollout.node_count - len(data["nodes"]),
            "can_cancel": rollout.is_active and gate.can_every(request.user, DEPLOY, gate.rollout_nodes(rollout)),
            "terminal_statuses": [str(s) for s in Rollout.TERMINAL],
        },
    )


@login_required
@require_POST
def rollout_cancel(request, pk):
    rollout = gate.rollout_for(request.user, pk)
    try:
        rollouts.cancel_rollout(rollout, user=request.user)
        messages.info(request, f"Rollout #{rollout.pk} cancelled: running nodes are being stopped.")
    except RequestError as exc:
        messages.error(request, str(exc))
    return redirect(rollout)


# --- the JSON API ------------------------------------------------------------------------------------

# Field -> (JSON types allowed, may be null).  Booleans are not integers here, although Python says so.
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "action": ((str,), False),
    "revision": ((str,), False),
    "tags": ((list,), False),
    "nodes": ((list,), False),
    "all": ((bool,), False),
    "confirm_all": ((bool,), False),
    "parallelism": ((int,), False),
    "canary": ((int,), False),
    "canary_tag": ((str,), False),
    "max_failures": ((int,), True),
    "timeout": ((int,), True),
    "node_timeouts": ((dict,), False),
}


_TYPE_NAMES = {str: "a string", list: "a list", bool: "true or false", int: "an integer", dict: "an object"}


def _options(body: dict) -> Options:
    """``Options`` from a JSON object whose every value has the right type, or ApiError 400."""
    for name, value in body.items():
        kinds, nullable = _FIELDS[name]
        if value is None and nullable:
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ApiError(400, f"{name} must be {_TYPE_NAMES[kinds[0]]}{' or null' if nullable else ''}")
    for name in ("tags", "nodes"):
        if not all(isinstance(v, str) for v in body.get(name, [])):
            raise ApiError(400, f"{name} must be a list of strings")
    timeouts = body.get("node_timeouts", {})
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in timeouts.values()):
        raise ApiError(400, "node_timeouts must map node names to seconds")
    return Options(
        action=body.get("action", "switch"),
        revision=body.get("revision", ""),
        tags=body.get("tags", []),
        nodes=body.get("nodes", []),
        all_nodes=body.get("all", False),
        confirm_all=body.get("confirm_all", False),
        parallelism=body.get("parallelism", rollouts.DEFAULT_PARALLELISM),
        max_failures=body.get("max_failures"),
        canary=body.get("canary", 0),
        canary_tag=body.get("canary_tag", ""),
        timeout=body.get("timeout"),
        node_timeouts=timeouts,
    )


@_api_login_required
@require_http_methods(["GET", "POST"])
def api_rollouts(request):
    """GET: the rollouts the user sees, newest first (at most 100).  POST: start one → 201 with it.

    POST body: {"tags": [...], "nodes": [...], "all": false, "confirm_all": false, "action": "switch",
    "revision": "", "parallelism": 10, "canary": 0, "canary_tag": "", "max_failures": null,
    "timeout": null, "node_timeouts": {}}.
    """
    if request.method == "GET":
        shown = gate.visible_rollouts(request.user).order_by("-created_at", "-id")[:100]
        return JsonResponse(
            {
                "rollouts": [
                    {
                        "id": r.pk,
                        "status": r.status,
                        "action": r.action,
                        "node_count": r.node_count,
                        "created_at": r.created_at.isoformat(),
                        "finished_at": r.finished_at.isoformat() if r.finished_at else None,
                        "url": r.get_absolute_url(),
                    }
                    for r in shown
                ]
            }
        )
    gate.require_somewhere(request.user, DEPLOY, event="rollout.requested")
    options = _options(json_object(request, {name: object for name in _FIELDS}))
    try:
        rollout = rollouts.request_rollout(options, user=request.user, trigger=Deployment.Trigger.API)
    except AwaitingApproval as exc:
        return JsonResponse({"error": str(exc), "approval": exc.approval.payload()}, status=202)
    except NodeBusy as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    except RequestError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    deployments = gate.rollout_deployments(request.user, rollout)
    return JsonResponse(
        {"rollout": rollouts.payload(rollout, deployments, tails=False), "url": rollout.get_absolute_url()},
        status=201,
    )


@_api_login_required
@require_GET
def api_rollout(request, pk):
    """The rollout, its counts and one row per node the user sees.  A failed node's row has the last
    lines of its log (``tail``); ``?tails=ID,ID`` asks for those deployments' tails only (the page asks
    once per failed node), ``?tails=`` for none."""
    rollout = gate.rollout_for(request.user, pk)
    deployments = gate.rollout_deployments(request.user, rollout)
    data = rollouts.payload(rollout, deployments, tails="tails" not in request.GET)
    wanted = request.GET.get("tails", "")
    if wanted:
        try:
            ids = {int(x) for x in wanted.split(",")[:100]}
        except ValueError:
            raise ApiError(400, "tails must be deployment numbers separated by commas") from None
        failed = {
            r["deployment"]: r["line_count"]
            for r in data["nodes"]
            if r["deployment"] in ids and r["bucket"] == "failed"
        }
        last = logstream.last_lines_of(failed, rollouts.TAIL_LINES)
        for row in data["nodes"]:
            if row["deployment"] in last:
                row["tail"] = last[row["deployment"]]
    return JsonResponse({"rollout": data})


@_api_login_required
@require_POST
def api_rollout_cancel(request, pk):
    """POST (an empty JSON body or ``{}``) → 200 with the rollout, 409 if it has already finished."""
    rollout = gate.rollout_for(request.user, pk)
    gate.require_every(request.user, DEPLOY, gate.rollout_nodes(rollout), event="rollout.cancel")
    json_object(request, {})
    try:
        rollout = rollouts.cancel_rollout(rollout, user=request.user)
    except RequestError as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    deployments = gate.rollout_deployments(request.user, rollout)
    return JsonResponse({"rollout": rollouts.payload(rollout, deployments, tails=False)})
