#!/usr/bin/env python3
"""The audit chain's one definition, and its offline verifier (Python's standard library only).

    python3 chain.py trail.jsonl
    python3 chain.py trail.csv --checkpoint cp.json --public-key audit-signing.pub

``hash = SHA-256(prev_hash || canonical(event))``: this module defines the
hashed fields, the canonical form, the time format, the genesis hash and the
walk over a chain.  The panel imports it (the writer, ``audit verify``,
checkpoints, exports) and PostgreSQL's ``audit_append()`` finishes the hash
from ``canonical_parts()`` (a test proves they agree), so the writer and every
verifier agree by construction.  It imports nothing from the panel or Django:
a reviewer copies this one file and runs it on an export.

Exit status 0: every event's hash matches its content, each event links to the
one before it (seq gap-free, prev_hash = previous hash), times never go
backwards, and every checkpoint given is validly signed and agrees with the
export.  Exit status 1: the first event that was modified, removed or
reordered is named.  Exit status 2: the files could not be read.

An export must start at event #1, or just after an archive seal given with
``--checkpoint``: one whose first lines were removed fails.  A deliberate slice
(``audit export --since/--until``) passes with ``--slice``, which names the
event it starts from and leaves that event's link to the one before unchecked.
A filtered export is not a contiguous run of the chain: pass ``--subset`` to
check each event's own hash and order only (see docs/audit.md for how to tie
a filtered export to a verified full one).

Checkpoints (``--checkpoint``, a file or a directory of them, repeatable) form
their own chain: each names the one before it (``number``, ``prev_checkpoint``,
``prev_checkpoint_seq``), and ``check_checkpoints()`` refuses a chain that
skips, forks or goes backwards, before any of them is trusted.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from json.encoder import encode_basestring
from pathlib import Path

GENESIS_HASH = "0" * 64  # the prev_hash of the chain's first event
HASHED_FIELDS = (
    "seq",
    "created_at",
    "actor_kind",
    "actor_id",
    "actor_name",
    "action",
    "object_type",
    "object_id",
    "object_repr",
    "node_id",
    "node_name",
    "outcome",
    "details",
    "source_ip",
    "user_agent",
    "request_id",
)
EXPORT_FIELDS = HASHED_FIELDS + ("prev_hash", "hash")
# The canonical form's key order (sorted), which is also the order verify reads a row's columns in.
CANONICAL_ORDER = tuple(sorted(HASHED_FIELDS))
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # UTC, microseconds; PostgreSQL: 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
# Checkpoints: /2 adds the checkpoint chain (number, prev_checkpoint, prev_checkpoint_seq); /1 files
# (written before it) are still read, each checked on its own (docs/audit.md).
CHECKPOINT_FORMAT = "nixos-panel-audit-checkpoint/2"
CHECKPOINT_FORMAT_V1 = "nixos-panel-audit-checkpoint/1"
CHECKPOINT_FORMATS = (CHECKPOINT_FORMAT_V1, CHECKPOINT_FORMAT)
SEAL_KIND = "archive"  # a checkpoint left by `audit archive`: names the last archived event, not the head


def format_time(value: datetime) -> str:
    """The canonical time: UTC, microseconds, ``Z``."""
    return value.astimezone(timezone.utc).strftime(TIME_FORMAT)  # noqa: UP017  (runs on 3.10)


# One encoder, built once: json.dumps() with options builds a new one per call.
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical_json(doc) -> str:
    """Sorted keys, no spaces, UTF-8 unescaped: ``json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``."""
    return _ENCODE(doc)


# --- the canonical form ------------------------------------------------------------
#
# canonical(event) is canonical_json() of the event's 16 hashed fields, ``created_at``
# formatted by format_time().  It is built here field by field, in CANONICAL_ORDER,
# each value by the same encoder (the same string, without building a dict), so a
# verifier can feed values straight from a database row (encode_value() and
# canonical_encoded()), and the writer can cut it around the two values only known
# under the chain lock (canonical_parts()).  One way of building it serves all three.

_KEYS = tuple(("{" if i == 0 else ",") + encode_basestring(name) + ":" for i, name in enumerate(CANONICAL_ORDER))
_TIME_AT, _SEQ_AT = CANONICAL_ORDER.index("created_at"), CANONICAL_ORDER.index("seq")


def encode_value(value, _str=encode_basestring, _encode=_ENCODE) -> str:
    """One value as the canonical form holds it (``canonical_json(value)``, with the common types inline)."""
    kind = type(value)
    if kind is str:
        return _str(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    return _encode(value)


def canonical_encoded(encoded: Sequence[str]) -> str:
    """The canonical form from the 16 values already encoded (``encode_value``), in ``CANONICAL_ORDER``."""
    return "".join([key + value for key, value in zip(_KEYS, encoded, strict=True)]) + "}"


def _encoded(event) -> list[str]:
    values = [event.get(name) for name in CANONICAL_ORDER]
    if isinstance(values[_TIME_AT], datetime):
        values[_TIME_AT] = format_time(values[_TIME_AT])
    return [encode_value(value) for value in values]


def canonical(event) -> str:
    """Canonical JSON of an event's hashed fields (sorted keys, no spaces, UTC times as ``TIME_FORMAT``).

    ``event`` maps field names to values; a missing field is ``null``; ``created_at``
    is a datetime or already the canonical text.
    """
    return canonical_encoded(_encoded(event))


def chain_hash(prev_hash: str, event) -> str:
    """``SHA-256(prev_hash || canonical(event))`` as hex."""
    return hashlib.sha256((prev_hash + canonical(event)).encode()).hexdigest()


def canonical_parts(event) -> tuple[str, str, str]:
    """``canonical(event)`` cut around the two values only known under the chain lock.

    ``canonical(event) == head + format_time(created_at) + middle + str(seq) + tail``
    whatever the event's ``seq`` and ``created_at`` (absent here): the same
    string, built in two steps, so the writer can encode the rest before it
    takes the lock and PostgreSQL can finish the hash inside it (``audit_append()``,
    migration 0004).
    """
    pieces = [key + value for key, value in zip(_KEYS, _encoded(event), strict=True)]
    return (
        "".join(pieces[:_TIME_AT]) + _KEYS[_TIME_AT] + '"',
        '"' + "".join(pieces[_TIME_AT + 1 : _SEQ_AT]) + _KEYS[_SEQ_AT],
        "".join(pieces[_SEQ_AT + 1 :]) + "}",
    )


# --- Ed25519 signature check (RFC 8032, section 6 reference code) -------------

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _recover_x(y: int, sign: int):
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 % _P == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _add(a, b):
    pa = (a[1] - a[0]) * (b[1] - b[0]) % _P
    pb = (a[1] + a[0]) * (b[1] + b[0]) % _P
    pc = 2 * a[3] * b[3] * _D % _P
    pd = 2 * a[2] * b[2] % _P
    e, f, g, h = pb - pa, pd - pc, pd + pc, pb + pa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s: int, point):
    acc = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            acc = _add(acc, point)
        point = _add(point, point)
        s >>= 1
    return acc


def _same(a, b) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0


def _decompress(s: bytes):
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
_BASE = (_GX, _GY, 1, _GX * _GY % _P)


def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    if len(public) != 32 or len(signature) != 64:
        return False
    a, r = _decompress(public), _decompress(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _L
    return _same(_mul(s, _BASE), _add(r, _mul(h, a)))


_SPKI_ED25519_PREFIX = bytes.fromhex("302a300506032b6570032100")


def load_public_key(text: str) -> bytes:
    """The raw 32-byte key from a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo) or bare base64."""
    body = "".join(line.strip() for line in text.strip().splitlines() if not line.startswith("-----"))
    der = base64.b64decode(body)
    if len(der) == 32:
        return der
    if len(der) == 44 and der.startswith(_SPKI_ED25519_PREFIX):
        return der[12:]
    raise ValueError("not an Ed25519 public key (expected PEM 'PUBLIC KEY')")


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


def checkpoint_message(checkpoint: dict) -> bytes:
    """The bytes a checkpoint's signature covers: its canonical JSON without ``signature``."""
    return canonical_json({k: v for k, v in checkpoint.items() if k != "signature"}).encode()


def checkpoint_is_signed_by(checkpoint: dict, public: bytes) -> bool:
    try:
        signature = base64.b64decode(checkpoint.get("signature", ""))
    except ValueError:
        return False
    return checkpoint.get("format") in CHECKPOINT_FORMATS and ed25519_verify(
        public, checkpoint_message(checkpoint), signature
    )


def checkpoint_digest(checkpoint: dict) -> str:
    """What the next checkpoint names as ``prev_checkpoint``: SHA-256 of the whole document's canonical JSON."""
    return hashlib.sha256(canonical_json(checkpoint).encode()).hexdigest()


@dataclass
class CheckpointChain:
    """Checkpoints checked together (``check_checkpoints``).

    ``chain`` holds the /2 checkpoints in ``number`` order, ``legacy`` the /1
    ones by seq; ``expected`` maps every event seq a checkpoint names to
    (hash, label), for ``ChainWalker.expect``.  ``problem`` is the first
    thing wrong with the checkpoints themselves.
    """

    chain: list = field(default_factory=list)
    legacy: list = field(default_factory=list)
    expected: dict = field(default_factory=dict)
    problem: str | None = None
    problem_seq: int = 0
    notes: list = field(default_factory=list)

    @property
    def latest(self) -> tuple[str, dict] | None:
        """The last checkpoint of the chain (or, before there is one, the /1 checkpoint furthest along)."""
        if self.chain:
            return self.chain[-1]
        if self.legacy:
            return max(self.legacy, key=lambda item: (item[1]["seq"], item[1]["created_at"]))
        return None

    def seal(self, seq: int) -> tuple[str, dict] | None:
        """The archive seal naming event ``seq`` (the last archived one), if any."""
        return next(
            (item for item in self.legacy + self.chain if item[1].get("kind") == SEAL_KIND and item[1]["seq"] == seq),
            None,
        )


def check_checkpoints(
    found: Iterable[tuple[str, dict]],
    public: bytes,
    *,
    signed_by: Callable[[dict, bytes], bool] = checkpoint_is_signed_by,
    complete: bool = True,
) -> CheckpointChain:
    """Check ``found`` (name, document) pairs as one chain of checkpoints signed by ``public``.

    Each must be signed by that key and name it.  Identical copies count once.
    The /2 checkpoints must run #1, #2, #3 … with none missing or doubled, each
    naming the one before it (its digest and event seq), never dated before it,
    and (except archive seals) never naming an event before the one the last
    head checkpoint named.  ``complete`` (the panel's own directory) requires the
    chain from #1; a reviewer may be given only its recent part.  Any two
    checkpoints naming the same event must agree on its hash.
    """
    result = CheckpointChain()
    kid = key_id(public)

    def fail(message: str, seq: int = 0) -> CheckpointChain:
        result.problem, result.problem_seq = message, seq
        return result

    unique: dict[str, tuple[str, dict]] = {}
    for name, doc in found:
        if not isinstance(doc, dict) or doc.get("format") not in CHECKPOINT_FORMATS:
            return fail(f"checkpoint {name} is not an audit checkpoint of a known format")
        if doc.get("key_id") != kid:
            return fail(
                f"checkpoint {name} names signing key {doc.get('key_id')}, but the public key given is {kid}: "
                f"it was signed by another key, or the wrong public key is configured"
            )
        if not signed_by(doc, public):
            return fail(f"checkpoint {name} is not validly signed by key {kid}: it was forged or altered")
        digest = checkpoint_digest(doc)
        if digest in unique:
            result.notes.append(f"checkpoint {name} is a copy of {unique[digest][0]} (counted once)")
            continue
        unique[digest] = (name, doc)

    result.legacy = sorted(
        (item for item in unique.values() if item[1]["format"] == CHECKPOINT_FORMAT_V1),
        key=lambda item: (item[1]["seq"], item[1]["created_at"]),
    )
    result.chain = sorted(
        (item for item in unique.values() if item[1]["format"] == CHECKPOINT_FORMAT),
        key=lambda item: item[1]["number"],
    )
    legacy_by_digest = {checkpoint_digest(doc): (name, doc) for name, doc in result.legacy}
    prev = last_head = None
    for name, doc in result.chain:
        number = doc["number"]
        if prev is None:
            if number != 1:
                if complete:
                    return fail(
                        f"checkpoint{'s' if number > 2 else ''} #1{f'-#{number - 1}' if number > 2 else ''} "
                        f"missing: the checkpoint chain starts at #{number} ({name})",
                        doc["seq"],
                    )
                result.notes.append(f"checkpoint chain checked from #{number} ({name}); earlier ones not given")
            elif doc["prev_checkpoint"] != GENESIS_HASH:
                before = legacy_by_digest.get(doc["prev_checkpoint"])
                if before is None or before[1]["seq"] != doc["prev_checkpoint_seq"]:
                    if complete:
                        return fail(
                            f"checkpoint {name} (#1) follows an older-format checkpoint that is not here "
                            f"({doc['prev_checkpoint'][:16]}…, event #{doc['prev_checkpoint_seq']})",
                            doc["seq"],
                        )
                    result.notes.append(f"checkpoint {name} (#1) follows an older-format checkpoint not given")
        else:
            pname, pdoc = prev
            pnumber = pdoc["number"]
            if number == pnumber:
                return fail(
                    f"checkpoints {pname} and {name} are both #{number}: the checkpoint chain forks", doc["seq"]
                )
            if number > pnumber + 1:
                gone = f"#{pnumber + 1}" if number == pnumber + 2 else f"#{pnumber + 1}-#{number - 1}"
                return fail(
                    f"checkpoint {gone} missing: the checkpoint chain skips from #{pnumber} ({pname}) to #{number} ({name})",
                    doc["seq"],
                )
            if doc["prev_checkpoint"] != checkpoint_digest(pdoc) or doc["prev_checkpoint_seq"] != pdoc["seq"]:
                return fail(
                    f"checkpoint {name} (#{number}) does not name {pname} (#{pnumber}) as the one before it: "
                    f"the checkpoint chain was rewritten or mixed with another one",
                    doc["seq"],
                )
            if doc["created_at"] < pdoc["created_at"]:
                return fail(
                    f"checkpoint {name} (#{number}) is dated before {pname} (#{pnumber}): the checkpoint chain goes backwards",
                    doc["seq"],
                )
        if doc.get("kind") != SEAL_KIND:
            if last_head is not None and doc["seq"] < last_head[1]["seq"]:
                return fail(
                    f"checkpoint {name} (#{number}) names event #{doc['seq']}, behind #{last_head[1]['seq']} "
                    f"named by {last_head[0]}: the chain was cut between them",
                    doc["seq"],
                )
            last_head = (name, doc)
        prev = (name, doc)

    for name, doc in result.legacy + result.chain:
        seq, hash_ = doc["seq"], doc["hash"]
        if seq in result.expected and result.expected[seq][0] != hash_:
            return fail(f"{result.expected[seq][1]} and checkpoint {name} disagree about event #{seq}", seq)
        result.expected.setdefault(seq, (hash_, f"checkpoint {name}"))
    return result


def read_checkpoint_files(paths: Iterable[str | Path]) -> list[tuple[str, dict]]:
    """(name, document) of each file, or of each ``checkpoint-*.json`` in a directory; ValueError if unreadable."""
    found = []
    for given in paths:
        given = Path(given)
        files = sorted(given.glob("checkpoint-*.json")) if given.is_dir() else [given]
        for path in files:
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"checkpoint {path.name} is unreadable: not JSON ({exc.msg})") from None
            found.append((path.name, doc))
    return found


# --- the chain walk --------------------------------------------------------------


@dataclass
class Problem:
    """The first bad event: its sequence number and what is wrong with it."""

    seq: int
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class ChainWalker:
    """Feed events in ``seq`` order; stops at the first problem.

    ``anchor_seq``/``anchor_hash`` name the event just before the first one
    fed: the genesis (0, zeros), or an archive seal.  ``expect(seq, hash)``
    adds a checkpoint: the event ``seq`` must carry ``hash`` and the walk must
    reach it, or a tail was cut off or rewritten.
    """

    anchor_seq: int = 0
    anchor_hash: str = GENESIS_HASH
    subset: bool = False
    count: int = 0
    last_seq: int = 0
    last_hash: str = ""
    last_time: str = ""
    expected: dict = field(default_factory=dict)
    problem: Problem | None = None

    def __post_init__(self) -> None:
        self.last_seq, self.last_hash = self.anchor_seq, self.anchor_hash

    def expect(self, seq: int, hash_: str, label: str) -> None:
        self.expected[seq] = (hash_, label)

    def feed(self, event) -> Problem | None:
        if self.problem is None:
            self.problem = self._check(event)
        return self.problem

    def _check(self, event) -> Problem | None:
        seq = event["seq"]
        wanted = self.last_seq + 1
        if self.subset:
            if seq <= self.last_seq:
                return Problem(seq, f"event #{seq} is out of order: it comes after #{self.last_seq}")
        elif seq > wanted:
            gone = f"#{wanted}" if seq == wanted + 1 else f"#{wanted}-#{seq - 1}"
            return Problem(wanted, f"event {gone} removed: the chain jumps from #{self.last_seq} to #{seq}")
        elif seq < wanted:
            return Problem(seq, f"event #{seq} is out of order or duplicated: expected #{wanted}")
        if chain_hash(event["prev_hash"], event) != event["hash"]:
            return Problem(seq, f"event #{seq} was modified: its content does not match its hash")
        if not self.subset and event["prev_hash"] != self.last_hash:
            if seq - 1 > self.anchor_seq:
                return Problem(
                    seq - 1,
                    f"event #{seq - 1} was rewritten, removed or reordered: "
                    f"#{seq} does not link to it (prev_hash differs)",
                )
            return Problem(
                seq,
                f"event #{seq} does not link to the start of the chain "
                f"(#{self.anchor_seq}, hash {self.anchor_hash[:16]}…)",
            )
        created_at = event["created_at"]
        if not isinstance(created_at, str):
            created_at = format_time(created_at)
        if created_at < self.last_time:
            return Problem(seq, f"event #{seq} is out of time order: {created_at} is before #{self.last_seq}'s time")
        if seq in self.expected and self.expected[seq][0] != event["hash"]:
            return Problem(
                seq, f"event #{seq} does not match {self.expected[seq][1]}: the chain was rewritten at or before #{seq}"
            )
        self.count += 1
        self.last_seq, self.last_hash, self.last_time = seq, event["hash"], created_at
        return None

    def finish(self) -> Problem | None:
        """Call after the last event: a checkpoint beyond the end means a tail was cut off."""
        if self.problem is None and self.expected and not self.subset:
            far = max(self.expected)
            if far > self.last_seq:
                gone = f"event #{far}" if far == self.last_seq + 1 else f"events #{self.last_seq + 1}-#{far}"
                self.problem = Problem(
                    self.last_seq + 1,
                    f"{gone} removed: {self.expected[far][1]} says the chain reached #{far}, "
                    f"but it ends at #{self.last_seq}",
                )
        return self.problem


# --- reading exports --------------------------------------------------------------

_INT_FIELDS = ("actor_id", "node_id")


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"line {number}: not JSON ({exc.msg})") from None


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            event = dict(row)
            event["seq"] = int(row["seq"])
            for name in _INT_FIELDS:
                event[name] = int(row[name]) if row[name] != "" else None
            event["source_ip"] = row["source_ip"] or None
            event["details"] = json.loads(row["details"])
            yield event


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="chain.py", description="Verify an audit trail export (CSV or JSON Lines) offline."
    )
    parser.add_argument("export", help="the exported file (.csv or .jsonl)")
    parser.add_argument("--format", choices=["csv", "jsonl"], help="default: from the file name")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="PATH",
        help="a signed checkpoint (or archive seal) the export must agree with, or a directory of them; repeatable",
    )
    parser.add_argument("--public-key", metavar="FILE", help="the panel's Ed25519 public key (PEM), for checkpoints")
    partial = parser.add_mutually_exclusive_group()
    partial.add_argument(
        "--slice",
        action="store_true",
        help="the export is a deliberate slice (audit export --since/--until): it may start after #1",
    )
    partial.add_argument(
        "--subset",
        action="store_true",
        help="the export is a filtered view: check each event's hash and order, not the links",
    )
    args = parser.parse_args(argv)

    fmt = args.format or ("csv" if args.export.endswith(".csv") else "jsonl")
    try:
        found = read_checkpoint_files(args.checkpoint)
        public = None
        if args.checkpoint:
            if not args.public_key:
                parser.error("--checkpoint needs --public-key")
            with open(args.public_key, encoding="utf-8") as fh:
                public = load_public_key(fh.read())
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checkpoints = CheckpointChain()
    if args.checkpoint:
        try:
            checkpoints = check_checkpoints(found, public, complete=False)
        except (KeyError, TypeError) as exc:
            print(f"error: a checkpoint lacks a field: {exc}", file=sys.stderr)
            return 2
        if checkpoints.problem:
            print(f"FAIL: {checkpoints.problem}")
            return 1
        if not found:
            print(f"error: no checkpoint in {', '.join(args.checkpoint)}", file=sys.stderr)
            return 2

    events = read_csv(args.export) if fmt == "csv" else read_jsonl(args.export)
    walker = None
    notes = list(checkpoints.notes)
    first = None
    try:
        for event in events:
            if walker is None:
                first = event
                walker = _start(event, checkpoints, args, notes)
            if walker.feed(event):
                break
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {args.export}: {exc}", file=sys.stderr)
        return 2
    if walker is None:
        walker = _start({"seq": 1, "prev_hash": GENESIS_HASH}, checkpoints, args, notes)
    if args.slice and walker.problem is None:
        # A slice ends where it was cut: checkpoints beyond its last event cannot be checked.
        beyond = [seq for seq in walker.expected if seq > walker.last_seq]
        for seq in beyond:
            del walker.expected[seq]
        if beyond:
            notes.append(f"{len(beyond)} checkpoint(s) beyond the slice's last event #{walker.last_seq} not checked")
    problem = walker.finish()
    for note in notes:
        print(note)
    if problem:
        print(f"FAIL: {problem}")
        return 1
    if args.subset:
        shape = " (filtered: each hash checked, links not checked)"
    elif args.slice and walker.count:
        shape = ", a slice: links intact within it"
    else:
        shape = ", chain intact"
    span = f"#{first['seq']}-#{walker.last_seq}" if walker.count and first else "#0-#0"
    print(f"OK: {walker.count} events, {span}{shape}; head hash {walker.last_hash}")
    checked = sorted(seq for seq in walker.expected if seq > walker.anchor_seq)
    if checked:
        print(f"checked against {len(checked)} checkpoint(s), up to #{checked[-1]}")
    return 0


def _start(first, checkpoints: CheckpointChain, args, notes: list) -> ChainWalker:
    """A walker anchored on the event before ``first``: genesis, an archive seal, or (``--slice``) trust."""
    anchor_seq, anchor_hash = first["seq"] - 1, first["prev_hash"]
    problem = None
    if args.subset:
        anchor_seq, anchor_hash = 0, ""
    elif anchor_seq == 0:
        anchor_hash = GENESIS_HASH
    elif checkpoints.seal(anchor_seq):
        name, seal = checkpoints.seal(anchor_seq)
        anchor_hash = seal["hash"]
        notes.append(f"starts after #{anchor_seq}, sealed by a signed checkpoint ({name})")
    elif args.slice:
        notes.append(
            f"slice: starts at event #{first['seq']} (prev_hash {first['prev_hash'][:16]}…); "
            f"its link to #{anchor_seq} and the events before it are not checked"
        )
    else:
        gone = "#1" if anchor_seq == 1 else f"#1-#{anchor_seq}"
        problem = Problem(
            1,
            f"event{'s' if anchor_seq > 1 else ''} {gone} missing: the export starts at #{first['seq']} "
            f"(pass the archive seal of #{anchor_seq} with --checkpoint if they were archived, "
            f"or --slice if the export is a deliberate slice)",
        )
    walker = ChainWalker(anchor_seq=anchor_seq, anchor_hash=anchor_hash, subset=args.subset)
    walker.problem = problem
    for seq, (hash_, label) in checkpoints.expected.items():
        if seq > anchor_seq or args.subset:
            walker.expect(seq, hash_, label)
    if checkpoints.chain or checkpoints.legacy:
        name, latest = checkpoints.latest
        notes.append(
            f"checkpoints: {len(checkpoints.chain)} chained, {len(checkpoints.legacy)} older-format, "
            f"signed by key {latest['key_id']}; latest {name} names #{latest['seq']}"
        )
    return walker


if __name__ == "__main__":
    sys.exit(main())
