"""Filters over the audit trail, shared by the page, the export view and the command.

Time ranges become ranges of ``seq``: the writer keeps time non-decreasing
along the chain, so the first event at or after ``since`` and the last one
before ``until`` bound the range, and every page walks the ``seq`` index (or
a ``(column, seq)`` index) newest-first, with no OFFSET and no COUNT.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, time, timedelta

from django.core.exceptions import ValidationError
from django.db import connections
from django.db.models import Max, Q, QuerySet
from django.db.models.expressions import RawSQL
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from deployments.validators import validate_search_text

from .db import SEARCH_MIN_LENGTH, SEARCH_TABLE, has_search_table, search_phrase
from .models import AuditEvent

# Free text: how many events next to the page's cursor are filtered directly before the search index is asked.
SEARCH_WINDOW = 20_000
FILTER_NAMES = ("actor", "node", "action", "outcome", "since", "until", "q", "request", "object_type", "object_id")


def parse_time(text: str, *, end: bool = False) -> datetime | None:
    """``2025-01-31`` (start of day, or end with ``end=True``) or an ISO date-time; naive means UTC."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        # A bare date first: parse_datetime() would also take it, as midnight.
        day = parse_date(text)
        value = parse_datetime(text) if day is None else None
    except ValueError:
        day = value = None
    if day is not None:
        value = datetime.combine(day + timedelta(days=1) if end else day, time.min)
    elif value is None:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD) or date-time (YYYY-MM-DDTHH:MM)")
    if timezone.is_naive(value):
        value = timezone.make_aware(value, timezone.get_fixed_timezone(0))
    return value


@dataclass
class AuditFilter:
    """What a reviewer asked for; empty fields match everything."""

    actor: str = ""
    node: str = ""
    action: str = ""
    outcome: str = ""
    since: str = ""
    until: str = ""
    q: str = ""
    request: str = ""
    object_type: str = ""
    object_id: str = ""

    @classmethod
    def from_data(cls, data) -> tuple[AuditFilter, list[str]]:
        """A filter from GET parameters (or command options), and the errors found.

        A field with an error is left empty; callers refuse the whole request when there are errors
        (the pages with 400), so a control character or a 10 kB string never reaches a query.
        """
        f = cls(**{name: str(data.get(name) or "").strip() for name in FILTER_NAMES})
        errors = []
        for name in FILTER_NAMES:
            try:
                validate_search_text(getattr(f, name))
            except ValidationError as exc:
                errors.append(f"{name}: {exc.messages[0]}")
                setattr(f, name, "")
        for name in ("since", "until"):
            try:
                parse_time(getattr(f, name), end=name == "until")
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
                setattr(f, name, "")
        if f.outcome and f.outcome not in AuditEvent.Outcome.values:
            errors.append(f"outcome: use one of {', '.join(AuditEvent.Outcome.values)}")
            f.outcome = ""
        return f, errors

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}

    def __bool__(self) -> bool:
        return bool(self.as_dict())

    def seq_range(self) -> tuple[int | None, int | None]:
        """The (lowest, highest) seq inside the time range; a range matching nothing gives (1, 0)."""
        lo = hi = None
        since, until = parse_time(self.since), parse_time(self.until, end=True)
        if since:
            lo = (
                AuditEvent.objects.filter(created_at__gte=since)
                .order_by("created_at")
                .values_list("seq", flat=True)
                .first()
            )
            if lo is None:
                return 1, 0
        if until:
            hi = (
                AuditEvent.objects.filter(created_at__lt=until)
                .order_by("-created_at")
                .values_list("seq", flat=True)
                .first()
            )
            if hi is None:
                return 1, 0
        return lo, hi

    def queryset(self, qs: QuerySet | None = None, *, indexed: bool = True) -> QuerySet:
        """The matching events; ``indexed=False`` leaves out SQLite's search-index narrowing."""
        qs = AuditEvent.objects.all() if qs is None else qs
        if self.actor:
            qs = qs.filter(actor_name=self.actor)
        if self.node:
            qs = qs.filter(node_name=self.node)
        if self.action:
            # "deployment." or "deployment.*" matches every deployment event.
            prefix = self.action.rstrip("*")
            qs = qs.filter(action__startswith=prefix) if prefix.endswith(".") else qs.filter(action=self.action)
        if self.outcome:
            qs = qs.filter(outcome=self.outcome)
        if self.request:
            qs = qs.filter(request_id=self.request)
        if self.object_type:
            qs = qs.filter(object_type=self.object_type)
        if self.object_id:
            qs = qs.filter(object_id=self.object_id)
        if self.q:
            qs = qs.filter(Q(object_repr__icontains=self.q) | Q(node_name__icontains=self.q))
            # PostgreSQL answers the icontains above from its pg_trgm indexes (migration 0005); SQLite
            # narrows by its FTS5 trigram table first (a superset: it folds case more widely than LIKE).
            connection = connections[qs.db]
            if indexed and len(self.q) >= SEARCH_MIN_LENGTH and has_search_table(connection):
                qs = qs.filter(
                    id__in=RawSQL(
                        f"SELECT rowid FROM {SEARCH_TABLE} WHERE {SEARCH_TABLE} MATCH %s", [search_phrase(self.q)]
                    )
                )
        lo, hi = self.seq_range()
        if lo is not None:
            qs = qs.filter(seq__gte=lo)
        if hi is not None:
            qs = qs.filter(seq__lte=hi)
        return qs

    def page(
        self, *, below: int | None = None, above: int | None = None, limit: int, fields: tuple[str, ...] = ()
    ) -> list[AuditEvent]:
        """Up to ``limit`` matching events with ``seq < below`` newest first, or ``seq > above`` oldest first.

        Free text is found two ways, so both a term that matches every few events
        and one that matches none stay one short walk: first the ``SEARCH_WINDOW``
        events next to the cursor are filtered directly (a common term fills the
        page there), then, only if the page is not full, the rest of the trail
        through the search index (pg_trgm on PostgreSQL, FTS5 on SQLite), which
        finds a rare term's few events without reading the others.
        """
        descending = above is None
        order = "-seq" if descending else "seq"
        if not self.q:
            qs = self.queryset().only(*fields) if fields else self.queryset()
            if below is not None:
                qs = qs.filter(seq__lt=below)
            if above is not None:
                qs = qs.filter(seq__gt=above)
            return list(qs.order_by(order)[:limit])
        if descending:
            top = below if below is not None else (AuditEvent.objects.aggregate(m=Max("seq"))["m"] or 0) + 1
            near = {"seq__lt": top, "seq__gte": top - SEARCH_WINDOW}
            far = {"seq__lt": top - SEARCH_WINDOW}
        else:
            near = {"seq__gt": above, "seq__lte": above + SEARCH_WINDOW}
            far = {"seq__gt": above + SEARCH_WINDOW}
        found = []
        for qs in (self.queryset(indexed=False).filter(**near), self.queryset().filter(**far)):
            if fields:
                qs = qs.only(*fields)
            found += qs.order_by(order)[: limit - len(found)]
            if len(found) >= limit:
                break
        return found
