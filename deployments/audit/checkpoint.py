"""Signed checkpoints of the chain head, kept where the panel cannot rewrite them.

A checkpoint is a small JSON file: the head's ``seq`` and ``hash``, the time,
the kind (``periodic``, ``manual``, or ``archive`` for the seal left by
``audit archive``), signed with an Ed25519 key that lives in a file, not in
the database.  Files are created once (O_EXCL, read-only) and never rewritten;
an operator can make the directory append-only (``chattr +a``) or ship each
one elsewhere via ``PANEL_AUDIT_CHECKPOINT_URL`` (settings: ``AUDIT_*``).  Whoever rewrites the
database cannot forge a checkpoint, so cutting off the chain's tail or
re-hashing it shows at the next verification.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.utils import timezone

from .chain import (
    CHECKPOINT_FORMAT,
    GENESIS_HASH,
    checkpoint_is_signed_by,
    checkpoint_message,
    format_time,
    key_id,
)
from .models import AuditEvent

log = logging.getLogger(__name__)


def signing_key() -> Ed25519PrivateKey:
    """The checkpoint signing key, created (0600, in a 0700 directory) on first use."""
    path = Path(settings.AUDIT_SIGNING_KEY_FILE)
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        pass
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
    public_key_file().write_bytes(public_key_pem(key.public_key()))
    return key


def public_key_file() -> Path:
    path = Path(settings.AUDIT_SIGNING_KEY_FILE)
    return path.with_name(path.name.removesuffix(".key") + ".pub")


def public_key_pem(public: Ed25519PublicKey | None = None) -> bytes:
    public = public or signing_key().public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


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


def head() -> tuple[int, str]:
    """(seq, hash) of the last committed event; (0, genesis) for an empty chain."""
    last = AuditEvent.objects.order_by("-seq").values_list("seq", "hash").first()
    return last or (0, GENESIS_HASH)


def sign(payload: dict) -> dict:
    key = signing_key()
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
) -> Path | None:
    """Sign the chain head (or ``seq``/``hash_``) and write it as a new file; return its path.

    A periodic run with no new event since the last checkpoint writes nothing.
    This is the django-q2 schedule's entry point (``deployments.audit.checkpoint.write_checkpoint``).
    """
    if seq is None:
        seq, hash_ = head()
    latest = latest_checkpoint()
    if kind == "periodic" and not force and latest is not None and latest.seq == seq and latest.hash == hash_:
        return None
    now = timezone.now()
    doc = sign({"kind": kind, "seq": seq, "hash": hash_, "created_at": format_time(now), **(extra or {})})
    directory = Path(settings.AUDIT_CHECKPOINT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    path = directory / f"checkpoint-{seq:012d}-{stamp}-{kind}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _ship(doc)
    log.info("audit checkpoint %s at #%s", path.name, seq)
    return path


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


def read_checkpoint(path: Path) -> Checkpoint:
    return Checkpoint(Path(path), json.loads(Path(path).read_text()))


def checkpoints(kind: str | None = None) -> list[Checkpoint]:
    """Every checkpoint in the directory, oldest chain position first."""
    directory = Path(settings.AUDIT_CHECKPOINT_DIR)
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("checkpoint-*.json")):
        try:
            cp = read_checkpoint(path)
        except (OSError, ValueError):
            log.warning("unreadable audit checkpoint %s", path)
            continue
        if kind is None or cp.kind == kind:
            found.append(cp)
    return found


def latest_checkpoint() -> Checkpoint | None:
    """The checkpoint furthest along the chain (file names sort by seq, then time)."""
    directory = Path(settings.AUDIT_CHECKPOINT_DIR)
    if not directory.is_dir():
        return None
    for path in sorted(directory.glob("checkpoint-*.json"), reverse=True):
        try:
            return read_checkpoint(path)
        except (OSError, ValueError):
            log.warning("unreadable audit checkpoint %s", path)
    return None


def is_authentic(cp: Checkpoint) -> bool:
    return checkpoint_is_signed_by(cp.data, _raw(signing_key().public_key()))
