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
from json.encoder import encode_basestring as _escape

from django.db import DEFAULT_DB_ALIAS, connections

from .verify_export import HASHED_FIELDS, ChainWalker, Problem, canonical_json, format_time

# The hashed fields in sorted order (the canonical form sorts keys), then the two hashes.
_SORTED = tuple(sorted(HASHED_FIELDS))
_SEQ, _TIME, _DETAILS = _SORTED.index("seq"), _SORTED.index("created_at"), _SORTED.index("details")
_CANONICAL_TIME = {
    # The canonical time, formatted by the database (PostgreSQL) or as Django stores it (SQLite: naive UTC text).
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


def walk_segment(segment: Segment, anchor_seq: int, anchor_hash: str, expected: dict, batch: int,
                 *, in_worker: bool = False) -> Segment:
    try:
        return walk_rows(segment, anchor_seq, anchor_hash, expected, batch)
    finally:
        if in_worker:
            connections.close_all()


def walk_rows(segment: Segment, anchor_seq: int, anchor_hash: str, expected: dict, batch: int) -> Segment:
    connection = connections[DEFAULT_DB_ALIAS]
    time_sql = _CANONICAL_TIME.get(connection.vendor, "created_at")
    columns = ", ".join(time_sql if name == "created_at" else name for name in _SORTED)
    upper = "" if segment.stop is None else f" AND seq < {int(segment.stop)}"
    sql = f"SELECT {columns}, prev_hash, hash FROM audit_auditevent WHERE seq > %s{upper} ORDER BY seq LIMIT {batch}"

    last_seq, last_hash, last_time = anchor_seq, anchor_hash, ""
    with connection.cursor() as cur:
        if segment.start is not None:
            cur.execute(f"SELECT seq, hash, {time_sql} FROM audit_auditevent WHERE seq < %s "
                        f"ORDER BY seq DESC LIMIT 1", [segment.start])
            before = cur.fetchone()
            if before is not None:
                last_seq, last_hash, last_time = before[0], before[1], _time(before[2])
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
                seq, prev_hash, hash_ = row[_SEQ], row[16], row[17]
                created_at = _time(row[_TIME]) if sqlite else row[_TIME]
                # The plainly sound case, inline; anything else goes to ChainWalker for its verdict.
                if (seq == last_seq + 1 and prev_hash == last_hash and type(created_at) is str
                        and created_at >= last_time and seq not in expected
                        and _sha256((prev_hash + _canonical_row(row, created_at)).encode()).hexdigest() == hash_):
                    last_seq, last_hash, last_time = seq, hash_, created_at
                    count += 1
                    continue
                event = dict(zip(_SORTED, row, strict=False))  # the 16 fields, then the hashes
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
    if count:
        segment.end = (last_seq, last_hash, last_time)
    return segment


# canonical() of a row, built field by field in the sorted key order: the same string as
# canonical_json() of the event's dict (every value encoded by the same encoder), without
# building the dict; a value of any other type than str, int or None is encoded by the encoder.
_KEYS = tuple(("{" if i == 0 else ",") + _escape(name) + ":" for i, name in enumerate(_SORTED))
_sha256 = hashlib.sha256


def _value(value, _escape=_escape, _encode=canonical_json) -> str:
    kind = type(value)
    if kind is str:
        return _escape(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    return _encode(value)


def _details(value):
    return json.loads(value) if isinstance(value, str | bytes) else value


def _canonical_row(row, created_at: str) -> str:
    details = row[_DETAILS]
    details = "{}" if details == "{}" else canonical_json(_details(details))
    values = [_value(x) for x in row[:16]]
    values[_TIME], values[_DETAILS] = _escape(created_at), details
    return "".join([key + value for key, value in zip(_KEYS, values, strict=True)]) + "}"


def _time(value) -> str:
    """A stored time in the canonical form: SQLite keeps naive UTC text ``YYYY-MM-DD HH:MM:SS[.ffffff]``."""
    if isinstance(value, str):
        if value.endswith("Z"):
            return value
        return value.replace(" ", "T") + ("Z" if "." in value else ".000000Z")
    return format_time(value)
