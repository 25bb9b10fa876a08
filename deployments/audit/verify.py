"""Walk the stored chain and name the first event that was modified, removed or reordered.

Checks, in seq order: seq is gap-free from the start (event 1, or the event
after an archive seal), every event's hash matches its content, every
``prev_hash`` is the hash before it, time never goes backwards, and the
chain agrees with every signed checkpoint: the checkpoints are first checked
as their own chain (signed by the verification key, numbered without gaps,
each naming the one before it, never going backwards), then each event a
checkpoint names must carry the checkpoint's hash, and the chain must reach
the furthest one (else a tail was cut off).

``verify_since`` is the checkpoint writer's check: the events from the last
checkpoint to the head only.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from django.db import DEFAULT_DB_ALIAS, connections

from . import checkpoint as checkpoints
from .chain import ChainWalker, CheckpointChain, Problem, key_id
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


def _failed(problem: Problem, notes: list[str]) -> Report:
    return Report(ok=False, count=0, first_seq=0, last_seq=0, head_hash="", problem=problem, notes=notes)


def verify_chain(
    checkpoint_files=(),
    *,
    checkpoint_dir: Path | None = None,
    batch: int = BATCH,
    workers: int | None = None,
) -> Report:
    """Walk the chain against every checkpoint; ``workers`` processes (default: one per CPU for a long chain).

    Checkpoints are those of ``checkpoint_dir`` (default: the configured
    directory) plus ``checkpoint_files``, verified with ``verification_key()``;
    without a key the report fails at once (no key is ever created here).
    """
    if isinstance(checkpoint_files, str | Path):
        checkpoint_files = [checkpoint_files]
    notes: list[str] = []
    try:
        public, source = checkpoints.verification_key()
    except checkpoints.KeyUnavailable as exc:
        return _failed(Problem(0, str(exc)), notes)
    chain = checkpoints.load_chain(public, directory=checkpoint_dir, extra=checkpoint_files)
    notes.extend(chain.notes)
    if chain.problem:
        return _failed(Problem(chain.problem_seq, chain.problem), notes)

    walker = _anchored(chain, notes)
    for seq, (hash_, label) in chain.expected.items():
        if seq > walker.anchor_seq:
            walker.expect(seq, hash_, label)
    if chain.latest is None:
        notes.append("no checkpoint yet: a cut-off tail cannot be detected (run `audit checkpoint`)")
    else:
        name, latest = chain.latest
        kinds = []
        if chain.chain:
            kinds.append(f"{len(chain.chain)} chained (#1-#{chain.chain[-1][1]['number']})")
        if chain.legacy:
            kinds.append(f"{len(chain.legacy)} older-format (each on its own)")
        notes.append(
            f"checking against {', '.join(kinds)} checkpoints, public key {key_id(checkpoints._raw(public))} "
            f"({source}); the latest, {name}, names #{latest['seq']}"
        )

    if walker.problem is None:
        _walk(walker, batch=batch, workers=workers)
    walker.finish()
    return Report(
        ok=walker.problem is None,
        count=walker.count,
        first_seq=walker.anchor_seq + 1,
        last_seq=walker.last_seq,
        head_hash=walker.last_hash,
        problem=walker.problem,
        notes=notes,
    )


def verify_since(chain: CheckpointChain, *, batch: int = BATCH) -> Report:
    """Verify the events from the one ``chain.latest`` names (itself included) to the head, in this process.

    Without a checkpoint, the whole chain.  The checkpoint writer signs the
    head only if this passes; the events before the last checkpoint were
    checked when it was written.
    """
    notes: list[str] = []
    walker = _anchored(chain, notes)
    start = None
    if chain.latest is not None:
        name, latest = chain.latest
        if latest["seq"] > walker.anchor_seq:
            walker.expect(latest["seq"], latest["hash"], f"checkpoint {name}")
            start = latest["seq"]
    if walker.problem is None:
        _walk(walker, batch=batch, workers=1, start=start)
    walker.finish()
    return Report(
        ok=walker.problem is None,
        count=walker.count,
        first_seq=start or walker.anchor_seq + 1,
        last_seq=walker.last_seq,
        head_hash=walker.last_hash,
        problem=walker.problem,
        notes=notes,
    )


def _anchored(chain: CheckpointChain, notes: list[str]) -> ChainWalker:
    """A walker from the chain's start: genesis, or the archive seal of the events before the first one left."""
    first = AuditEvent.objects.order_by("seq").values_list("seq", flat=True).first()
    if not first or first == 1:
        return ChainWalker()
    # Events before it were archived: a signed archive seal must name the event just before.
    seal = chain.seal(first - 1)
    if seal is None:
        walker = ChainWalker()
        walker.problem = Problem(
            1, f"events #1-#{first - 1} removed: the chain starts at #{first} and no signed archive seal covers them"
        )
        return walker
    name, doc = seal
    notes.append(f"events #1-#{doc['seq']} archived; sealed by {name}")
    return ChainWalker(anchor_seq=doc["seq"], anchor_hash=doc["hash"])


# --- the walk, split by seq range (deployments/audit/walk.py) -----------------------------------


def _walk(walker: ChainWalker, *, batch: int, workers: int | None, start: int | None = None) -> None:
    """Walk from ``start`` (default: the first event) to the end, merging into ``walker``."""
    connection = connections[DEFAULT_DB_ALIAS]
    with connection.cursor() as cur:
        cur.execute("SELECT MIN(seq), MAX(seq) FROM audit_auditevent")
        low, high = cur.fetchone()
    if low is None:
        return
    if start is not None and start > high:
        # Nothing left from the checkpoint on (a cut tail): the walk only reads where the chain ends.
        _merge(walker, walk_segment(Segment(start, None), *_job(walker, batch)))
        return
    if start is not None:
        low = max(low, start)
    if workers is None:
        shareable = not connection.in_atomic_block and not (
            connection.vendor == "sqlite" and connection.is_in_memory_db()
        )
        workers = (os.cpu_count() or 1) if shareable and high - low + 1 >= PARALLEL_MIN_EVENTS else 1
    parts = max(1, workers * SEGMENTS_PER_WORKER if workers > 1 else 1)
    cuts = sorted({low + (high - low + 1) * i // parts for i in range(1, parts)} - {low})
    bounds = [start, *cuts, None]
    segments = [Segment(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    job = _job(walker, batch)
    if workers > 1:
        _walk_in_processes(walker, segments, job, workers, connection)
    else:
        for segment in segments:
            if _merge(walker, walk_segment(segment, *job)):
                break


def _job(walker: ChainWalker, batch: int) -> tuple:
    return (walker.anchor_seq, walker.anchor_hash, walker.expected, batch)


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
