"""Walk the stored chain and name the first event that was modified, removed or reordered.

Checks, in seq order: seq is gap-free from the start (event 1, or the event
after an archive seal), every event's hash matches its content, every
``prev_hash`` is the hash before it, time never goes backwards, and the
chain agrees with the latest signed checkpoint (or the one given): the
checkpoint's event carries the checkpoint's hash, and the chain reaches it
(else a tail was cut off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint as checkpoints
from .export import rows
from .models import AuditEvent
from .verify_export import GENESIS_HASH, ChainWalker, Problem


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


def verify_chain(checkpoint_file: Path | None = None, *, batch: int = 2000) -> Report:
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
        for chunk in rows(AuditEvent.objects.all(), batch=batch):
            for event in chunk:
                if walker.feed(event):
                    break
            if walker.problem:
                break
    walker.finish()
    return Report(ok=walker.problem is None, count=walker.count, first_seq=anchor_seq + 1,
                  last_seq=walker.last_seq, head_hash=walker.last_hash, problem=walker.problem, notes=notes)
