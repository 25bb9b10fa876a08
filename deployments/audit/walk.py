"""Walk the stored rows of one ``seq`` range of the chain (``verify`` splits the chain into these).

A segment [start, stop) is walked from the state the serial walk would have on
reaching it *if every event before it is sound*: the last event before
``start`` (its seq, hash and time) is that state.  ``verify`` takes segments in
order: the first one reporting a problem holds the first bad event (all before
it are sound, so its starting state was the serial one), and the events at the
boundaries are checked by the segment after them (seq follows, prev_hash links,
time does not go back), exactly as in one pass.  ``ChainWalker`` (the offline
verifier's) decides every event that is not plainly sound, so the messages are
the same as ever.

This module also runs in verify's worker processes, which are fresh
interpreters (``start_worker``): it imports no models and needs nothing of
Django but a database connection.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC

from django.db import DEFAULT_DB_ALIAS, connections

from .chain import CANONICAL_ORDER, ChainWalker, Problem, canonical_encoded, encode_value, format_time

# A row holds the hashed fields in the canonical form's order, then the two hashes.
_COLUMNS = CANONICAL_ORDER + ("prev_hash", "hash")
_SEQ, _TIME, _DETAILS = _COLUMNS.index("seq"), _COLUMNS.index("created_at"), _COLUMNS.index("details")
_PREV, _HASH, _FIELDS = _COLUMNS.index("prev_hash"), _COLUMNS.index("hash"), len(CANONICAL_ORDER)
_CANONICAL_TIME = {
    # The canonical time (chain.TIME_FORMAT), formatted by the database (PostgreSQL, as audit_append() does)
    # or as Django stores it (SQLite: naive UTC text, made canonical by canonical_time()).
    "postgresql": """to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""",
    "sqlite": "CAST(created_at AS TEXT)",
}


@dataclass
class Segment:
    start: int | None  # first seq (None: from the beginning)
    stop: int | None  # seq after the last (None: to the end)
    problem: Problem | None = None
    count: int = 0
    end: tuple | None = None  # (seq, hash, time) of the last sound event walked


def start_worker(databases: dict) -> None:
    """Initializer of a verify worker process: Django with the parent's database settings only.

    The parent passes its connection's settings as they are (a test database's
    name included).  Times are formatted in SQL, in UTC, so no other setting
    matters to the walk.
    """
    from django.conf import settings

    settings.configure(DATABASES=databases, USE_TZ=True, TIME_ZONE="UTC")


def walk_segment(
    segment: Segment, anchor_seq: int, anchor_hash: str, expected: dict, batch: int, *, in_worker: bool = False
) -> Segment:
    try:
        return walk_rows(segment, anchor_seq, anchor_hash, expected, batch)
    finally:
        if in_worker:
            connections.close_all()


def walk_rows(segment: Segment, anchor_seq: int, anchor_hash: str, expected: dict, batch: int) -> Segment:
    connection = connections[DEFAULT_DB_ALIAS]
    time_sql = _CANONICAL_TIME.get(connection.vendor, "created_at")
    columns = ", ".join(time_sql if name == "created_at" else name for name in _COLUMNS)
    upper = "" if segment.stop is None else f" AND seq < {int(segment.stop)}"
    sql = f"SELECT {columns} FROM audit_auditevent WHERE seq > %s{upper} ORDER BY seq LIMIT {batch}"

    last_seq, last_hash, last_time = anchor_seq, anchor_hash, ""
    started_after = False  # the state is the event just before the segment, not the anchor
    with connection.cursor() as cur:
        if segment.start is not None:
            cur.execute(
                f"SELECT seq, hash, {time_sql} FROM audit_auditevent WHERE seq < %s ORDER BY seq DESC LIMIT 1",
                [segment.start],
            )
            before = cur.fetchone()
            if before is not None:
                last_seq, last_hash, last_time = before[0], before[1], canonical_time(before[2])
                started_after = True
            bound = segment.start - 1
        else:
            cur.execute("SELECT MIN(seq) FROM audit_auditevent")
            bound = (cur.fetchone()[0] or 0) - 1
        count = 0
        sqlite = connection.vendor == "sqlite"
        while True:
            cur.execute(sql, [bound])
            rows = cur.fetchall()
            if not rows:
                break
            for row in rows:
                seq, prev_hash, hash_ = row[_SEQ], row[_PREV], row[_HASH]
                created_at = canonical_time(row[_TIME]) if sqlite else row[_TIME]
                # The plainly sound case, inline; anything else goes to ChainWalker for its verdict.
                if (
                    seq == last_seq + 1
                    and prev_hash == last_hash
                    and type(created_at) is str
                    and created_at >= last_time
                    and seq not in expected
                    and _sha256((prev_hash + _canonical_row(row, created_at)).encode()).hexdigest() == hash_
                ):
                    last_seq, last_hash, last_time = seq, hash_, created_at
                    count += 1
                    continue
                event = dict(zip(_COLUMNS, row, strict=True))
                event.update(created_at=created_at, details=_details(row[_DETAILS]), prev_hash=prev_hash, hash=hash_)
                judge = ChainWalker(anchor_seq=anchor_seq, anchor_hash=anchor_hash, expected=expected)
                judge.last_seq, judge.last_hash, judge.last_time = last_seq, last_hash, last_time
                problem = judge.feed(event)
                if problem is not None:
                    segment.problem = problem
                    break
                last_seq, last_hash, last_time = judge.last_seq, judge.last_hash, judge.last_time
                count += 1
            if segment.problem is not None:
                break
            bound = rows[-1][_SEQ]
            del rows
    segment.count = count
    if count or started_after:
        # With no event in it, a segment ends where the one before it did (the serial walk's state there).
        segment.end = (last_seq, last_hash, last_time)
    return segment


_sha256 = hashlib.sha256


def _details(value):
    return json.loads(value) if isinstance(value, str | bytes) else value


def _canonical_row(row, created_at: str) -> str:
    """``chain.canonical()`` of a row, from its values (no dict built); details arrive as JSON text."""
    values = [encode_value(x) for x in row[:_FIELDS]]
    details = row[_DETAILS]
    values[_TIME], values[_DETAILS] = (
        encode_value(created_at),
        "{}" if details == "{}" else encode_value(_details(details)),
    )
    return canonical_encoded(values)


def canonical_time(value) -> str:
    """A stored time as ``chain.format_time()`` gives it, whatever the backend returned.

    SQLite keeps naive UTC text ``YYYY-MM-DD HH:MM:SS[.ffffff]`` (Django's
    converter makes it a naive datetime, also UTC, never the local zone);
    PostgreSQL an aware datetime, or the canonical text when formatted in SQL.
    """
    if isinstance(value, str):
        if value.endswith("Z"):
            return value
        return value.replace(" ", "T") + ("Z" if "." in value else ".000000Z")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return format_time(value)
