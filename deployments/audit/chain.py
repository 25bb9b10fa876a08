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

A filtered export is not a contiguous run of the chain: pass ``--subset`` to
check each event's own hash and order only (see docs/audit.md for how to tie
a filtered export to a verified full one).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from json.encoder import encode_basestring

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
CHECKPOINT_FORMAT = "nixos-panel-audit-checkpoint/1"


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
    return checkpoint.get("format") == CHECKPOINT_FORMAT and ed25519_verify(
        public, checkpoint_message(checkpoint), signature
    )


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
                self.problem = Problem(
                    self.last_seq + 1,
                    f"events #{self.last_seq + 1}-#{far} removed: {self.expected[far][1]} "
                    f"says the chain reached #{far}, but it ends at #{self.last_seq}",
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
        metavar="FILE",
        help="a signed checkpoint (or archive seal) the export must agree with; repeatable",
    )
    parser.add_argument("--public-key", metavar="FILE", help="the panel's Ed25519 public key (PEM), for checkpoints")
    parser.add_argument(
        "--subset",
        action="store_true",
        help="the export is a filtered view: check each event's hash and order, not the links",
    )
    args = parser.parse_args(argv)

    fmt = args.format or ("csv" if args.export.endswith(".csv") else "jsonl")
    try:
        checkpoints = []
        for name in args.checkpoint:
            with open(name, encoding="utf-8") as fh:
                checkpoints.append((name, json.load(fh)))
        public = None
        if checkpoints:
            if not args.public_key:
                parser.error("--checkpoint needs --public-key")
            with open(args.public_key, encoding="utf-8") as fh:
                public = load_public_key(fh.read())
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, cp in checkpoints:
        if not checkpoint_is_signed_by(cp, public):
            print(f"FAIL: checkpoint {name} is not validly signed by key {key_id(public)}")
            return 1

    events = read_csv(args.export) if fmt == "csv" else read_jsonl(args.export)
    walker = None
    notes = []
    try:
        for event in events:
            if walker is None:
                walker = _start(event, checkpoints, args.subset, notes)
            if walker.feed(event):
                break
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {args.export}: {exc}", file=sys.stderr)
        return 2
    if walker is None:
        walker = _start({"seq": 1, "prev_hash": GENESIS_HASH}, checkpoints, args.subset, notes)
    problem = walker.finish()
    if problem:
        print(f"FAIL: {problem}")
        return 1
    print(
        f"OK: {walker.count} events, #{walker.anchor_seq + 1 if walker.count else 0}-#{walker.last_seq}"
        f"{' (filtered: each hash checked, links not checked)' if args.subset else ', chain intact'}; "
        f"head hash {walker.last_hash}"
    )
    for note in notes:
        print(note)
    return 0


def _start(first, checkpoints, subset: bool, notes: list) -> ChainWalker:
    """A walker anchored on the event before ``first``: genesis, a matching archive seal, or trust."""
    anchor_seq, anchor_hash = first["seq"] - 1, first["prev_hash"]
    if subset:
        anchor_seq, anchor_hash = 0, ""
    elif anchor_seq == 0:
        anchor_hash = GENESIS_HASH
    else:
        seals = [cp for _, cp in checkpoints if cp.get("seq") == anchor_seq]
        if seals:
            anchor_hash = seals[0]["hash"]
            notes.append(f"starts after #{anchor_seq}, sealed by a signed checkpoint")
        else:
            notes.append(
                f"note: starts at #{first['seq']}; its link to #{anchor_seq} is not checked "
                f"(pass the archive seal of #{anchor_seq} with --checkpoint to check it)"
            )
    walker = ChainWalker(anchor_seq=anchor_seq, anchor_hash=anchor_hash, subset=subset)
    for name, cp in checkpoints:
        if cp["seq"] > anchor_seq or subset:
            walker.expect(cp["seq"], cp["hash"], f"checkpoint {name}")
        notes.append(f"checkpoint {name}: #{cp['seq']} signed by key {cp.get('key_id', '?')}")
    return walker


if __name__ == "__main__":
    sys.exit(main())
