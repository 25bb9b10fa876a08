"""Exports of the audit trail as CSV or JSON Lines, streamed in flat memory.

Events go out oldest first (chain order), each with ``prev_hash`` and
``hash``, in exactly the canonical form the hash covers, so the offline
verifier (``deployments/audit/chain.py``) can check them with no access to
the panel.  Batches
are read by keyset (``seq > last``), never with OFFSET, and the export stops
at the head it started from so a long export is one consistent prefix.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator

from django.db import connections
from django.db.models import QuerySet

from .chain import EXPORT_FIELDS, canonical_json
from .models import AuditEvent
from .walk import canonical_time

log = logging.getLogger(__name__)

# Small batches keep the export's own memory to a few MB above Django's (a 500-row batch is
# ~250 KB of text); the query is compiled once and re-run per batch with the next keyset bound.
BATCH = 500
FORMATS = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}
_NO_SEQ = -7_346_592_001_337  # a placeholder bound, replaced by the real one for each batch


def rows(qs: QuerySet, *, through_seq: int | None = None, batch: int | None = None) -> Iterator[list[dict]]:
    """Batches of event dicts (export fields, canonical times) in seq order.

    The ORM builds the SQL once; the rows are read with a plain cursor and
    converted here, which is several times faster than Django's per-field
    converters over a million rows.
    """
    if through_seq is not None:
        qs = qs.filter(seq__lte=through_seq)
    connection = connections[qs.db]
    batch = batch or BATCH
    query = qs.filter(seq__gt=_NO_SEQ).order_by("seq").values_list(*EXPORT_FIELDS)[:batch].query
    sql, params = query.sql_with_params()
    params = list(params)
    slot = params.index(_NO_SEQ)
    params[slot] = 0
    while True:
        with connection.cursor() as cur:
            cur.execute(sql, params)
            raw = cur.fetchall()
        if not raw:
            return
        yield [_event(row) for row in raw]
        params[slot] = raw[-1][0]
        del raw


_CREATED_AT = EXPORT_FIELDS.index("created_at")
_DETAILS = EXPORT_FIELDS.index("details")
_SOURCE_IP = EXPORT_FIELDS.index("source_ip")


def _event(row) -> dict:
    event = dict(zip(EXPORT_FIELDS, row, strict=True))
    event["created_at"] = canonical_time(row[_CREATED_AT])
    details = row[_DETAILS]
    event["details"] = json.loads(details) if isinstance(details, str | bytes) else details
    if row[_SOURCE_IP] is not None:
        event["source_ip"] = str(row[_SOURCE_IP])
    return event


def jsonl_lines(chunk: list[dict]) -> str:
    return "".join(canonical_json(row) + "\n" for row in chunk)


def csv_header() -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(EXPORT_FIELDS)
    return out.getvalue()


def csv_lines(chunk: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in chunk:
        writer.writerow(
            [
                canonical_json(row["details"]) if name == "details" else ("" if row[name] is None else row[name])
                for name in EXPORT_FIELDS
            ]
        )
    return out.getvalue()


def chunks(qs: QuerySet, fmt: str, *, through_seq: int | None = None) -> Iterator[str]:
    """The export as text chunks (one per batch)."""
    if fmt == "csv":
        yield csv_header()
    render = csv_lines if fmt == "csv" else jsonl_lines
    for chunk in rows(qs, through_seq=through_seq):
        yield render(chunk)


# The last line of an export that failed half-way: an export without it is complete through its head.
FAILED_MARKER = "EXPORT FAILED"


def ending(chunks_: Iterator[str], fmt: str) -> Iterator[str]:
    """``chunks_``, ended whatever happens: a failure half-way becomes a final line saying so.

    An HTTP response that has started cannot change its status; raising inside it left the client
    waiting for a body that never ended.  The line cannot be read as an event (CSV: a row with too
    few fields; JSON Lines: an object without ``seq``), so a verifier fails on it too.
    """
    try:
        yield from chunks_
    except Exception as exc:
        log.exception("audit export failed")
        message = f"{FAILED_MARKER}: {type(exc).__name__}; this file is incomplete"
        yield (json.dumps({"error": message}) if fmt == "jsonl" else message) + "\n"


def head_seq() -> int:
    return AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first() or 0
