"""Signed checkpoints of the chain head, chained to each other, kept where the panel cannot rewrite them.

A checkpoint is a small JSON file: the head's ``seq`` and ``hash``, the time,
the kind (``periodic``, ``manual``, or ``archive`` for the seal left by
``audit archive``), its ``number`` and the digest and event seq of the
checkpoint before it (``prev_checkpoint``, ``prev_checkpoint_seq``), signed
with an Ed25519 key that lives in a file, not in the database.  Files are
created once (O_EXCL, read-only) and never rewritten; an operator ships each
one elsewhere too (``PANEL_AUDIT_CHECKPOINT_URL``, or a write-once directory;
docs/audit.md).

Before signing, a checkpoint verifies the events since the previous one
against it (``write_checkpoint``): a rewritten or cut chain is never signed
again; the refusal is an ``audit.checkpoint_refused`` event and a log error.
Verification (``verification_key``) uses the configured public key, or the
one derived from the signing key file; it never creates a key.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .chain import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMATS,
    GENESIS_HASH,
    SEAL_KIND,
    CheckpointChain,
    check_checkpoints,
    checkpoint_digest,
    checkpoint_message,
    format_time,
    key_id,
    load_public_key,
)

log = logging.getLogger(__name__)


class KeyUnavailable(Exception):
    """No key to sign or verify with, or the keys disagree: the message says what to do."""


class CheckpointRefused(Exception):
    """The chain (or the checkpoints) did not verify: nothing was signed; the refusal is on the trail."""


# --- keys --------------------------------------------------------------------------------


def signing_key(*, create: bool = False) -> Ed25519PrivateKey:
    """The checkpoint signing key; with ``create``, made (0600, in a 0700 directory) if the file is absent.

    Only the first checkpoint of a new panel creates it (``write_checkpoint``):
    never verification, and never once checkpoints exist.
    """
    path = Path(settings.AUDIT_SIGNING_KEY_FILE)
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        if not create:
            raise KeyUnavailable(f"no audit signing key: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise KeyUnavailable(f"audit signing key {path} is unreadable: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # O_EXCL: two processes starting together must not each write a different key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    # For the operator to hand to reviewers; nothing in the panel reads it back.
    public_key_file().write_bytes(public_key_pem(key.public_key()))
    log.warning("audit signing key created: %s (key id %s)", path, key_id(_raw(key.public_key())))
    return key


def public_key_file() -> Path:
    path = Path(settings.AUDIT_SIGNING_KEY_FILE)
    return path.with_name(path.name.removesuffix(".key") + ".pub")


def verification_key() -> tuple[Ed25519PublicKey, str]:
    """The public key checkpoints are verified with, and where it came from.

    ``PANEL_AUDIT_PUBLIC_KEY[_FILE]`` if set; otherwise derived from the signing
    key file if that exists; otherwise ``KeyUnavailable``.  Never creates a key.
    """
    configured = settings.AUDIT_PUBLIC_KEY
    if configured:
        try:
            raw = load_public_key(configured)
        except ValueError as exc:
            raise KeyUnavailable(f"PANEL_AUDIT_PUBLIC_KEY: {exc}") from None
        return Ed25519PublicKey.from_public_bytes(raw), "PANEL_AUDIT_PUBLIC_KEY"
    try:
        private = signing_key()
    except KeyUnavailable as exc:
        raise KeyUnavailable(
            f"no public key to verify checkpoints with: PANEL_AUDIT_PUBLIC_KEY is not set and {exc}. "
            f"Set PANEL_AUDIT_PUBLIC_KEY (or _FILE) to the key reviewers were given; "
            f"a new panel gets its key from its first `audit checkpoint`"
        ) from None
    return private.public_key(), f"derived from {settings.AUDIT_SIGNING_KEY_FILE}"


def public_key_pem(public: Ed25519PublicKey | None = None) -> bytes:
    public = public or verification_key()[0]
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _signed_by(doc: dict, public: bytes) -> bool:
    """``chain.checkpoint_is_signed_by``, with the ``cryptography`` library (fast: a chain has thousands)."""
    if doc.get("format") not in CHECKPOINT_FORMATS:
        return False
    try:
        signature = base64.b64decode(doc.get("signature", ""), validate=True)
        Ed25519PublicKey.from_public_bytes(public).verify(signature, checkpoint_message(doc))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    data: dict

    @property
    def seq(self) -> int:
        return self.data["seq"]

    @property
    def hash(self) -> str:
        return self.data["hash"]

    @property
    def kind(self) -> str:
        return self.data.get("kind", "")

    @property
    def number(self) -> int | None:
        """Its place in the checkpoint chain; None for a checkpoint written before the chain (/1)."""
        return self.data.get("number")

    @cached_property
    def digest(self) -> str:
        return checkpoint_digest(self.data)


def read_checkpoint(path: Path) -> Checkpoint:
    return Checkpoint(Path(path), json.loads(Path(path).read_text()))


def checkpoint_files(directory: Path | None = None) -> list[Path]:
    directory = Path(directory or settings.AUDIT_CHECKPOINT_DIR)
    return sorted(directory.glob("checkpoint-*.json")) if directory.is_dir() else []


def load_chain(public: Ed25519PublicKey, *, directory: Path | None = None, extra=()) -> CheckpointChain:
    """Every checkpoint in the directory (plus ``extra`` files), checked as one chain (``chain.check_checkpoints``).

    An unreadable file is a problem, not something to skip: hiding the newest
    checkpoint would hide a cut tail.
    """
    found = []
    for path in [*checkpoint_files(directory), *map(Path, extra)]:
        try:
            found.append((path.name, json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            return CheckpointChain(problem=f"checkpoint {path.name} is unreadable: {exc}")
    try:
        return check_checkpoints(found, _raw(public), signed_by=_signed_by)
    except (KeyError, TypeError) as exc:  # signed, so written by a panel, yet malformed: not ours to guess
        return CheckpointChain(problem=f"a checkpoint lacks the field {exc}")


# --- writing -----------------------------------------------------------------------------


def sign(payload: dict, key: Ed25519PrivateKey | None = None) -> dict:
    key = key or signing_key()
    doc = {"format": CHECKPOINT_FORMAT, **payload, "key_id": key_id(_raw(key.public_key()))}
    doc["signature"] = base64.b64encode(key.sign(checkpoint_message(doc))).decode()
    return doc


def write_checkpoint(
    kind: str = "periodic",
    *,
    force: bool = False,
    seq: int | None = None,
    hash_: str | None = None,
    extra: dict | None = None,
    actor_kind: str = "system",
) -> Path | None:
    """Verify the events since the last checkpoint, sign the head (or ``seq``/``hash_``), write it; return its path.

    Refuses (``CheckpointRefused``, after an ``audit.checkpoint_refused``
    event and a log error) when the events since the last checkpoint do not
    verify against it, when the checkpoints themselves do not, or when the
    signing key is missing or is not the configured public key's.  A periodic
    run with nothing new since the last checkpoint writes nothing.  ``seq``/
    ``hash_`` (the archive seal) are vouched for by the caller, which has just
    verified the whole chain.  This is the django-q2 schedule's entry point
    (``deployments.audit.checkpoint.write_checkpoint``).
    """
    for _attempt in range(3):
        try:
            return _write_once(kind, force=force, seq=seq, hash_=hash_, extra=extra or {})
        except CheckpointRefused as exc:
            _refused(str(exc), kind=kind, actor_kind=actor_kind)
            raise
        except FileExistsError:
            continue  # another process wrote this number first: verify against its checkpoint and retry
    raise CheckpointRefused("three other checkpoints were written meanwhile; try again")


def _write_once(kind: str, *, force: bool, seq: int | None, hash_: str | None, extra: dict) -> Path | None:
    key = _key_for_signing()
    public = key.public_key()
    chain = load_chain(public)
    if chain.problem:
        raise CheckpointRefused(f"the checkpoints do not verify: {chain.problem}")
    latest = chain.latest
    if seq is None:
        seq, hash_ = _verified_head(chain)
        if kind == "periodic" and not force and latest is not None:
            if latest[1].get("kind") != SEAL_KIND and (latest[1]["seq"], latest[1]["hash"]) == (seq, hash_):
                return None
    previous = latest[1] if latest else None
    number = previous["number"] + 1 if previous and previous["format"] == CHECKPOINT_FORMAT else 1
    now = timezone.now()
    doc = sign(
        {
            "number": number,
            "kind": kind,
            "seq": seq,
            "hash": hash_,
            "created_at": format_time(now),
            "prev_checkpoint": checkpoint_digest(previous) if previous else GENESIS_HASH,
            "prev_checkpoint_seq": previous["seq"] if previous else 0,
            **extra,
        },
        key,
    )
    directory = Path(settings.AUDIT_CHECKPOINT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    # Named by number alone: O_EXCL lets exactly one writer have each number, even across hosts.
    path = directory / f"checkpoint-n{number:08d}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _ship(doc)
    log.info("audit checkpoint %s (#%s) at event #%s", path.name, number, seq)
    return path


def _key_for_signing() -> Ed25519PrivateKey:
    """The signing key, checked against the configured public key; created only for a new panel's first checkpoint."""
    fresh = not checkpoint_files() and not settings.AUDIT_PUBLIC_KEY
    try:
        key = signing_key(create=fresh)
    except KeyUnavailable as exc:
        if fresh:  # there, but unreadable
            raise CheckpointRefused(str(exc)) from None
        raise CheckpointRefused(
            f"{exc}; checkpoints exist (or PANEL_AUDIT_PUBLIC_KEY is set), so a new key would be a different "
            f"signer: restore the key file (PANEL_AUDIT_SIGNING_KEY_FILE)"
        ) from None
    if settings.AUDIT_PUBLIC_KEY:
        try:
            configured, _ = verification_key()
        except KeyUnavailable as exc:
            raise CheckpointRefused(str(exc)) from None
        if _raw(configured) != _raw(key.public_key()):
            raise CheckpointRefused(
                f"the signing key {settings.AUDIT_SIGNING_KEY_FILE} (key id {key_id(_raw(key.public_key()))}) "
                f"is not the one PANEL_AUDIT_PUBLIC_KEY names (key id {key_id(_raw(configured))})"
            )
    return key


def _verified_head(chain: CheckpointChain) -> tuple[int, str]:
    """The head, after verifying every event since the last checkpoint (the whole chain if there is none) against it."""
    from .verify import verify_since

    report = verify_since(chain)
    if not report.ok:
        where = f"checkpoint {chain.latest[0]}" if chain.latest else "the start of the chain"
        raise CheckpointRefused(f"the events since {where} do not verify: {report.problem}")
    return (report.last_seq, report.head_hash) if report.last_seq else (0, GENESIS_HASH)


def _refused(problem: str, *, kind: str, actor_kind: str) -> None:
    """The alert: a log error and an event on the trail (in its own transaction)."""
    from .writer import record

    log.error("audit checkpoint refused: %s", problem)
    try:
        with transaction.atomic():
            record(
                "audit.checkpoint_refused",
                actor_kind=actor_kind,
                outcome="failure",
                object_type="checkpoint",
                details={"kind": kind, "problem": problem},
            )
    except Exception:  # noqa: BLE001  (the refusal stands and is logged even if the database refuses the event)
        log.exception("audit checkpoint refusal could not be recorded")


def _ship(doc: dict) -> None:
    url = settings.AUDIT_CHECKPOINT_URL
    if not url:
        return
    request = urllib.request.Request(
        url, data=json.dumps(doc).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310  (operator's URL)
            response.read()
    except OSError as exc:
        # The local file is written; a failed upload must not stop the panel.
        log.error("audit checkpoint not delivered to %s: %s", url, exc)
