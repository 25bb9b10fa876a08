"""Walk the stored chain and name the first event that was modified, removed or reordered.

Checks, in seq order: seq is gap-free from the start (event 1, or the event
after an archive seal), every event's hash matches its content, every
``prev_hash`` is the hash before it, time never goes backwards, and the
chain agrees with the latest signed checkpoint (or the one given): the
checkpoint's event carries the checkpoint's hash, and the chain reaches it
(else a tail was cut off).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from django.db import DEFAULT_DB_ALIAS, connections

from . import checkpoint as checkpoints
from .chain import GENESIS_HASH, ChainWalker, Problem
from .models import AuditEvent
from .walk import Segment, start_worker, walk_segment

# Chains at least this long are split across processes (one per CPU), when the
# database is one other processes can read (not inside a transaction, not in memory).
PARALLEL_MIN_EVENTS = 50_000
BATCH = 10_000
SEGMENTS_PER_WORKER = 4


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
            lines.append(
                f"OK: {self.count} events, #{self.first_seq}-#{self.last_seq}, chain intact; head hash {self.head_hash}"
            )
        return "\n".join(lines)


def verify_chain(checkpoint_file: Path | None = None, *, batch: int = BATCH, workers: int | None = None) -> Report:
    """Walk the chain; ``workers`` processes (default: one per CPU for a long chain, else this one)."""
    notes: list[str] = []
    first = AuditEvent.objects.order_by("seq").values_list("seq", "prev_hash").first()
    anchor_seq, anchor_hash = 0, GENESIS_HASH
    early: Problem | None = None
    if first and first[0] > 1:
        # Events before it were archived: the archive's signed seal must name the event just before.
        seal = next(
            (
                cp
                for cp in checkpoints.checkpoints("archive")
                if cp.seq == first[0] - 1 and checkpoints.is_authentic(cp)
            ),
            None,
        )
        if seal is None:
            early = Problem(
                1,
                f"events #1-#{first[0] - 1} removed: the chain starts at #{first[0]} "
                f"and no signed archive seal covers them",
            )
        else:
            anchor_seq, anchor_hash = seal.seq, seal.hash
            notes.append(f"events #1-#{seal.seq} archived; sealed by {seal.path.name}")
    walker = ChainWalker(anchor_seq=anchor_seq, anchor_hash=anchor_hash)
    if early:
        walker.problem = early

    cp = checkpoints.read_checkpoint(checkpoint_file) if checkpoint_file else checkpoints.latest_checkpoint()
    if cp is not None:
        if not checkpoints.is_authentic(cp):
            walker.problem = walker.problem or Problem(
                cp.seq, f"checkpoint {cp.path.name} is not signed by the panel's audit key: it was forged or altered"
            )
        elif cp.seq > anchor_seq:
            walker.expect(cp.seq, cp.hash, f"checkpoint {cp.path.name}")
            notes.append(f"checking against checkpoint {cp.path.name} (#{cp.seq})")
    else:
        notes.append("no checkpoint yet: a cut-off tail cannot be detected (run `audit checkpoint`)")

    if walker.problem is None:
        _walk(walker, batch=batch, workers=workers)
    walker.finish()
    return Report(
        ok=walker.problem is None,
        count=walker.count,
        first_seq=anchor_seq + 1,
        last_seq=walker.last_seq,
        head_hash=walker.last_hash,
        problem=walker.problem,
        notes=notes,
    )


# --- the walk, split by seq range (deployments/audit/walk.py) -----------------------------------


def _walk(walker: ChainWalker, *, batch: int, workers: int | None) -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    with connection.cursor() as cur:
        cur.execute("SELECT MIN(seq), MAX(seq) FROM audit_auditevent")
        low, high = cur.fetchone()
    if low is None:
        return
    if workers is None:
        shareable = not connection.in_atomic_block and not (
            connection.vendor == "sqlite" and connection.is_in_memory_db()
        )
        workers = (os.cpu_count() or 1) if shareable and high - low + 1 >= PARALLEL_MIN_EVENTS else 1
    parts = max(1, workers * SEGMENTS_PER_WORKER if workers > 1 else 1)
    cuts = sorted({low + (high - low + 1) * i // parts for i in range(1, parts)} - {low})
    bounds = [None, *cuts, None]
    segments = [Segment(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    job = (walker.anchor_seq, walker.anchor_hash, walker.expected, batch)
    if workers > 1:
        _walk_in_processes(walker, segments, job, workers, connection)
    else:
        for segment in segments:
            if _merge(walker, walk_segment(segment, *job)):
                break


def _walk_in_processes(walker: ChainWalker, segments: list[Segment], job: tuple, workers: int, connection) -> None:
    """Walk ``segments`` in ``workers`` fresh processes and merge the results in order.

    Not forked from this process: it may run threads (a log writer, a test
    server), and a forked ``multiprocessing.Pool`` could hang for ever in
    ``terminate()`` when stopping early, which is exactly when tampering was
    found.  A fork server (a fresh, single-threaded interpreter that has
    imported the walk once) starts the workers; stopping cancels the segments
    not started and waits for the few already running, which always end.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "deployments.audit.walk"])  # used when the server starts
    pool = ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=start_worker,
        initargs=({DEFAULT_DB_ALIAS: dict(connection.settings_dict)},),
    )
    try:
        futures = [pool.submit(walk_segment, segment, *job, in_worker=True) for segment in segments]
        for future in futures:
            if _merge(walker, future.result()):
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _merge(walker: ChainWalker, segment: Segment) -> bool:
    """Add a walked segment to ``walker``; True once the first problem is known."""
    walker.count += segment.count
    if segment.end is not None:
        walker.last_seq, walker.last_hash, walker.last_time = segment.end
    walker.problem = segment.problem
    return segment.problem is not None
