"""Walk the stored chain and name the first event that was modified, removed or reordered.

Checks, in seq order: seq is gap-free from the start (event 1, or the event
after an archive seal), every event's hash matches its content, every
``prev_hash`` is the hash before it, time never goes backwards, and the
chain agrees with the latest signed checkpoint (or the one given): the
checkpoint's event carries the checkpoint's hash, and the chain reaches it
(else a tail was cut off).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _escape
from pathlib import Path

from django.db import DEFAULT_DB_ALIAS, connections

from . import checkpoint as checkpoints
from .models import AuditEvent
from .verify_export import GENESIS_HASH, HASHED_FIELDS, ChainWalker, Problem, canonical_json, format_time

# Chains at least this long are split across processes (one per CPU), when the
# database is one other processes can read (not inside a transaction, not in memory).
PARALLEL_MIN_EVENTS = 50_000
BATCH = 10_000
SEGMENTS_PER_WORKER = 4

# The hashed fields in sorted order (the canonical form sorts keys), then the two hashes.
_SORTED = tuple(sorted(HASHED_FIELDS))
_SEQ, _TIME, _DETAILS = _SORTED.index("seq"), _SORTED.index("created_at"), _SORTED.index("details")
_CANONICAL_TIME = {
    # The canonical time, formatted by the database (PostgreSQL) or as Django stores it (SQLite: naive UTC text).
    "postgresql": """to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""",
    "sqlite": "CAST(created_at AS TEXT)",
}


@dataclass
class Report:
    ok: bool
    count: int
    first_seq: int
    last_seq: int
    head_hash: str
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = list(self.notes)
        if self.problem:
            lines.append(f"FAIL: {self.problem}")
        else:
            lines.append(f"OK: {self.count} events, #{self.first_seq}-#{self.last_seq}, chain intact; "
                         f"head hash {self.head_hash}")
        return "\n".join(lines)


def verify_chain(checkpoint_file: Path | None = None, *, batch: int = BATCH, workers: int | None = None) -> Report:
    """Walk the chain; ``workers`` processes (default: one per CPU for a long chain, else this one)."""
    notes: list[str] = []
    first = AuditEvent.objects.order_by("seq").values_list("seq", "prev_hash").first()
    anchor_seq, anchor_hash = 0, GENESIS_HASH
    early: Problem | None = None
    if first and first[0] > 1:
        # Events before it were archived: the archive's signed seal must name the event just before.
        seal = next((cp for cp in checkpoints.checkpoints("archive")
                     if cp.seq == first[0] - 1 and checkpoints.is_authentic(cp)), None)
        if seal is None:
            early = Problem(1, f"events #1-#{first[0] - 1} removed: the chain starts at #{first[0]} "
                               f"and no signed archive seal covers them")
        else:
            anchor_seq, anchor_hash = seal.seq, seal.hash
            notes.append(f"events #1-#{seal.seq} archived; sealed by {seal.path.name}")
    walker = ChainWalker(anchor_seq=anchor_seq, anchor_hash=anchor_hash)
    if early:
        walker.problem = early

    cp = checkpoints.read_checkpoint(checkpoint_file) if checkpoint_file else checkpoints.latest_checkpoint()
    if cp is not None:
        if not checkpoints.is_authentic(cp):
            walker.problem = walker.problem or Problem(cp.seq, f"checkpoint {cp.path.name} is not signed by "
                                                               f"the panel's audit key: it was forged or altered")
        elif cp.seq > anchor_seq:
            walker.expect(cp.seq, cp.hash, f"checkpoint {cp.path.name}")
            notes.append(f"checking against checkpoint {cp.path.name} (#{cp.seq})")
    else:
        notes.append("no checkpoint yet: a cut-off tail cannot be detected (run `audit checkpoint`)")

    if walker.problem is None:
        _walk(walker, batch=batch, workers=workers)
    walker.finish()
    return Report(ok=walker.problem is None, count=walker.count, first_seq=anchor_seq + 1,
                  last_seq=walker.last_seq, head_hash=walker.last_hash, problem=walker.problem, notes=notes)


# --- the walk, split by seq range ------------------------------------------------------------
#
# A segment [start, stop) is walked from the state the serial walk would have on
# reaching it *if every event before it is sound*: the last event before
# ``start`` (its seq, hash and time) is that state.  Segments are then taken in
# order: the first one reporting a problem holds the first bad event (all before
# it are sound, so its starting state was the serial one), and the events at the
# boundaries are checked by the segment after them (seq follows, prev_hash links,
# time does not go back), exactly as in one pass.  ``ChainWalker`` (the offline
# verifier's) decides every event that is not plainly sound, so the messages are
# the same as ever.


@dataclass
class _Segment:
    start: int | None  # first seq (None: from the beginning)
    stop: int | None  # seq after the last (None: to the end)
    problem: Problem | None = None
    count: int = 0
    end: tuple | None = None  # (seq, hash, time) of the last sound event walked


def _walk(walker: ChainWalker, *, batch: int, workers: int | None) -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    with connection.cursor() as cur:
        cur.execute("SELECT MIN(seq), MAX(seq) FROM audit_auditevent")
        low, high = cur.fetchone()
    if low is None:
        return
    if workers is None:
        shareable = not connection.in_atomic_block and not (
            connection.vendor == "sqlite" and connection.is_in_memory_db())
        workers = (os.cpu_count() or 1) if shareable and high - low + 1 >= PARALLEL_MIN_EVENTS else 1
    parts = max(1, workers * SEGMENTS_PER_WORKER if workers > 1 else 1)
    cuts = sorted({low + (high - low + 1) * i // parts for i in range(1, parts)} - {low})
    bounds = [None, *cuts, None]
    segments = [_Segment(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    job = (walker.anchor_seq, walker.anchor_hash, walker.expected, batch)
    if workers > 1:
        connections.close_all()  # the children open their own, and close them (True below)
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for done in pool.imap(_walk_segment, [(segment, *job, True) for segment in segments]):
                if _merge(walker, done):
                    pool.terminate()
                    break
    else:
        for segment in segments:
            if _merge(walker, _walk_segment((segment, *job, False))):
                break


def _merge(walker: ChainWalker, segment: _Segment) -> bool:
    """Add a walked segment to ``walker``; True once the first problem is known."""
    walker.count += segment.count
    if segment.end is not None:
        walker.last_seq, walker.last_hash, walker.last_time = segment.end
    walker.problem = segment.problem
    return segment.problem is not None


def _walk_segment(args) -> _Segment:
    segment, anchor_seq, anchor_hash, expected, batch, in_child = args
    try:
        return _walk_rows(segment, anchor_seq, anchor_hash, expected, batch)
    finally:
        if in_child:
            connections.close_all()


def _walk_rows(segment: _Segment, anchor_seq: int, anchor_hash: str, expected: dict, batch: int) -> _Segment:
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
