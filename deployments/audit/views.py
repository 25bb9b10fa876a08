"""The audit page for reviewers, one event's page, and filtered exports.

Only users the gate lets audit (``gate.AUDIT``) see any of it (anonymous users are
sent to log in; others get 403).  Pages are keyset-paginated on ``seq``
(``?before=`` / ``?after=``), so the first and the thousandth page cost the
same with a million events.
"""

from __future__ import annotations

import json

from asgiref.sync import sync_to_async
from django.contrib.admin import site as admin_site
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.db import transaction
from django.http import Http404, HttpResponseBadRequest, StreamingHttpResponse
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from deployments.access import gate
from deployments.access.gate import visible_nodes
from deployments.validators import redact_url_secrets

from . import export
from .chain import HASHED_FIELDS
from .events import EVENT_NAMES
from .models import AuditEvent
from .query import AuditFilter
from .writer import record

PAGE_SIZE = 50
# The columns of the list page: every hashed field but the bulky ones, which the event page shows.
LIST_FIELDS = tuple(f for f in HASHED_FIELDS if f not in ("details", "user_agent"))


def _require_auditor(request) -> None:
    if not gate.may(request.user, gate.AUDIT):
        raise PermissionDenied("You may not read the audit trail.")


def _int(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def object_links(event: AuditEvent) -> dict:
    """Where the event's object (and, for deployments, its log) can be seen."""
    links = {}
    try:
        if event.object_type == "deployment" and event.object_id.isdigit():
            links["object"] = reverse("deployments:deployment-detail", args=[int(event.object_id)])
            links["log"] = reverse("deployments:deployment-log", args=[int(event.object_id)])
        elif event.object_type == "node" and event.node_name:
            links["object"] = reverse("deployments:node-detail", args=[event.node_name])
        elif event.object_type and event.object_id.isdigit():
            for model in admin_site._registry:
                if model._meta.model_name == event.object_type:
                    opts = model._meta
                    links["object"] = reverse(
                        f"admin:{opts.app_label}_{opts.model_name}_change", args=[int(event.object_id)]
                    )
                    break
        if event.node_name and event.object_type != "node":
            links["node"] = reverse("deployments:node-detail", args=[event.node_name])
    except NoReverseMatch:
        pass
    return links


@login_required
def event_list(request):
    """Newest first, filtered; ``before``/``after`` are seq cursors."""
    _require_auditor(request)
    f, errors = AuditFilter.from_data(request.GET)
    before, after = _int(request.GET.get("before")), _int(request.GET.get("after"))
    if errors:
        # Refused whole (400): the page shows what was wrong and no events.
        events, has_newer, has_older = [], False, False
    elif after is not None:
        events = f.page(above=after, limit=PAGE_SIZE + 1, fields=LIST_FIELDS)
        has_newer = len(events) > PAGE_SIZE
        events = events[:PAGE_SIZE][::-1]
        has_older = bool(events) and bool(f.page(below=events[-1].seq, limit=1, fields=("seq",)))
    else:
        events = f.page(below=before, limit=PAGE_SIZE + 1, fields=LIST_FIELDS)
        has_older = len(events) > PAGE_SIZE
        events = events[:PAGE_SIZE]
        has_newer = before is not None and bool(events) and bool(f.page(above=events[0].seq, limit=1, fields=("seq",)))
    for event in events:
        event.links = object_links(event)
    return render(
        request,
        "audit/event_list.html",
        {
            "events": events,
            "filter": f,
            "filtered": bool(f),
            "errors": errors,
            "has_newer": has_newer,
            "has_older": has_older,
            "newest_seq": events[0].seq if events else None,
            "oldest_seq": events[-1].seq if events else None,
            "outcomes": AuditEvent.Outcome.choices,
            "known_events": EVENT_NAMES,
            "node_names": visible_nodes(request.user).order_by("name").values_list("name", flat=True)[:500],
            "actor_names": get_user_model().objects.order_by("username").values_list("username", flat=True)[:500],
            "export_query": f.as_dict(),
        },
        status=400 if errors else 200,
    )


@login_required
def event_detail(request, seq: int):
    _require_auditor(request)
    try:
        event = AuditEvent.objects.get(seq=seq)
    except AuditEvent.DoesNotExist:
        raise Http404("No such audit event") from None
    previous = AuditEvent.objects.filter(seq__lt=seq).order_by("-seq").values_list("seq", flat=True).first()
    following = AuditEvent.objects.filter(seq__gt=seq).order_by("seq").values_list("seq", flat=True).first()
    return render(
        request,
        "audit/event_detail.html",
        {
            "event": event,
            "links": object_links(event),
            # Redacted for the page only: events from before URLs were validated may hold a token in a
            # repository URL.  The stored, hashed event and the exports stay as written (offline verification).
            "details_json": redact_url_secrets(json.dumps(event.details, indent=2, sort_keys=True, ensure_ascii=False)),
            "previous": previous,
            "following": following,
        },
    )


@login_required
def event_export(request, fmt: str):
    """The filtered view as CSV or JSON Lines, oldest first, streamed; the export itself is audited."""
    _require_auditor(request)
    if fmt not in export.FORMATS:
        raise Http404("Unknown format")
    f, errors = AuditFilter.from_data(request.GET)
    if errors:
        return HttpResponseBadRequest("; ".join(errors) + "\n", content_type="text/plain; charset=utf-8")
    through = export.head_seq()
    with transaction.atomic():
        record(
            "audit.exported", user=request.user, details={"format": fmt, "filters": f.as_dict(), "through_seq": through}
        )
    content = export.ending(export.chunks(f.queryset(), fmt, through_seq=through), fmt)
    if isinstance(request, ASGIRequest):
        # Under daphne a sync iterator would be read whole into memory first; feed it batch by batch.
        content = _async_chunks(content)
    response = StreamingHttpResponse(content, content_type=export.FORMATS[fmt])
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    response["Content-Disposition"] = f'attachment; filename="audit-{stamp}-through-{through}.{fmt}"'
    return response


async def _async_chunks(chunks):
    step = sync_to_async(lambda: next(chunks, None), thread_sensitive=True)
    while (chunk := await step()) is not None:
        yield chunk
