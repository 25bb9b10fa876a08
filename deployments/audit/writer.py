"""The one writer of audit events.

``record()`` must run inside the transaction of the change it records, so a
change never lands without its event, nor an event without its change.
Inserts are serialised so that concurrent writers cannot fork the chain: an
advisory transaction lock on PostgreSQL (held until the caller commits, so the
next writer reads this event as the head), SQLite's single write lock (taken
at BEGIN IMMEDIATE) otherwise.  On PostgreSQL everything under the lock is one
call of ``audit_append()`` (migration 0004): the event's fields are encoded
before it, and the database fills in seq, time and hash.

Time comes from one clock: the database's (``clock_timestamp()``, read after
the lock is taken) on PostgreSQL, where workers on several machines write; and
never goes backwards along the chain, so ordering by ``seq`` and by time agree.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import pwd
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection
from django.dispatch import Signal
from django.utils import timezone
from django.utils.ipv6 import clean_ipv6_address

from . import events
from .chain import GENESIS_HASH, HASHED_FIELDS, canonical_json, canonical_parts, chain_hash
from .context import current
from .models import AuditEvent

# Arbitrary constant naming the chain's advisory lock on PostgreSQL.
CHAIN_LOCK_KEY = 0x6E69786F73  # "nixos"

_INSERT_FIELDS = [f for f in AuditEvent._meta.concrete_fields if not f.primary_key]
_INSERT_SQL = (
    "INSERT INTO {} ({}) VALUES ({})".format(
        AuditEvent._meta.db_table, ", ".join(f.column for f in _INSERT_FIELDS), ", ".join(["%s"] * len(_INSERT_FIELDS))
    )
    + " RETURNING id"
)
# PostgreSQL: lock, head, clock, hash and INSERT in one call (migration 0004).
_APPEND_SQL = (
    "SELECT new_id, new_seq, new_time, new_prev, new_hash FROM audit_append("
    "%s::bigint, %s::boolean, %s::text, %s::text, %s::text, "
    "%s::text, %s::bigint, %s::text, %s::text, %s::text, %s::text, %s::text, %s::bigint, %s::text, "
    "%s::text, %s::text, %s::text, %s::text, %s::text)"
)
_ATTNAMES = tuple(f.attname for f in AuditEvent._meta.concrete_fields)
# What the caller gives, in the order audit_append() takes it: every hashed field but the two the chain assigns.
_APPEND_FIELDS = tuple(f for f in HASHED_FIELDS if f not in ("seq", "created_at"))
# Sent with ``event=`` (the stored AuditEvent) by ``record()``, inside the caller's transaction: receivers
# that act on the event (notifications) defer to ``transaction.on_commit``, so a rolled-back change is
# never announced.  record() writes with a plain INSERT (the chain's lock), so ``post_save`` never fires.
recorded = Signal()

_MAX = {f.name: f.max_length for f in AuditEvent._meta.concrete_fields if getattr(f, "max_length", None)}


def _clean(value: Any) -> Any:
    """JSON that reads back from any backend exactly as written (so its hash stays valid).

    PostgreSQL's jsonb refuses NUL characters, turns ``1e+20`` into an
    integer (such floats are stored as their text) and ``-0.0`` into ``0.0``.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, float):
        text = repr(value)
        return (value + 0.0) if math.isfinite(value) and "e" not in text else text  # + 0.0: -0.0 is 0.0
    if isinstance(value, dict):
        return {_clean(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _text(name: str, value: Any) -> str:
    return _clean(str(value or ""))[: _MAX[name]]


def _ip(value: str | None) -> str | None:
    """The address as the database will give it back, or None if it is not one."""
    try:
        address = ipaddress.ip_address((value or "").strip())
    except ValueError:
        return None
    return clean_ipv6_address(str(address)) if address.version == 6 else str(address)


def _actor(user, actor_kind: str | None, actor_name: str) -> tuple[str, int | None, str]:
    if user is not None and getattr(user, "is_authenticated", False):
        return actor_kind or AuditEvent.ActorKind.USER, user.pk, user.get_username()
    kind = actor_kind or AuditEvent.ActorKind.SYSTEM
    return kind, None, actor_name or ("cli" if kind == AuditEvent.ActorKind.CLI else "")


def command_line_origin() -> dict[str, str]:
    """Where a command-line event comes from: the OS user it runs as, the host, and the human behind them.

    ``login_user`` is the kernel's login uid (``/proc/self/loginuid``), which
    ``sudo`` and ``su`` keep and the process cannot change; ``sudo_user`` is
    what sudo says (an environment variable: informative, not proof).
    """
    origin = {"os_user": _user_name(os.geteuid()), "host": socket.gethostname()}
    try:
        login_uid = int(Path("/proc/self/loginuid").read_text())
    except (OSError, ValueError):
        login_uid = -1
    if 0 <= login_uid < 0xFFFFFFFF:  # 4294967295: not set (a service, a container)
        origin["login_user"] = _user_name(login_uid)
    if os.environ.get("SUDO_USER"):
        origin["sudo_user"] = os.environ["SUDO_USER"][:150]
    return origin


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _read_head_sqlite() -> tuple[int, str, datetime | None, datetime]:
    """The head's (seq, hash, time) and the clock's time now, under SQLite's write lock.

    The caller's transaction holds the write lock from BEGIN IMMEDIATE (the
    settings' ``transaction_mode``), so no other writer can append meanwhile.
    """
    head = AuditEvent.objects.order_by("-seq").values_list("seq", "hash", "created_at").first()
    seq, hash_, last_time = head or (None, None, None)
    return (seq or 0), (hash_ or GENESIS_HASH), last_time, timezone.now()


def record(
    event: str,
    *,
    user=None,
    actor_kind: str | None = None,
    actor_name: str = "",
    obj=None,
    object_type: str = "",
    object_id: str = "",
    object_repr: str = "",
    node=None,
    outcome: str = AuditEvent.Outcome.SUCCESS,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one ``event`` (a name registered in ``events.py``) to the chain, inside the caller's transaction.

    ``user`` is the acting user (its id and username are kept); without one,
    ``actor_kind`` says who acted (system, cli, webhook, anonymous) and
    ``actor_name`` may name them (a failed login's username).  A ``cli``
    event's details also get ``command_line_origin()`` (OS user, host).
    ``details`` must never hold secrets; callers pass non-secret fields only.
    """
    events.check_event(event)
    if not connection.in_atomic_block:
        raise RuntimeError("audit.record() must run inside the transaction of the change it records")
    ctx = current.get()
    kind, actor_id, actor_name = _actor(user, actor_kind, actor_name)
    if kind == AuditEvent.ActorKind.CLI:
        details = {**command_line_origin(), **(details or {})}
    if obj is not None:
        object_type = object_type or obj._meta.model_name
        object_id = object_id or str(obj.pk)
        object_repr = object_repr or str(obj)
    if node is None and obj is not None and obj._meta.model_name == "node":
        node = obj
    fields = dict(
        actor_kind=kind,
        actor_id=actor_id,
        actor_name=_text("actor_name", actor_name),
        action=_text("action", event),  # the stored field keeps its name: it is hashed
        object_type=_text("object_type", object_type),
        object_id=_text("object_id", object_id),
        object_repr=_text("object_repr", object_repr),
        node_id=node.pk if node is not None else None,
        node_name=_text("node_name", node.name if node is not None else ""),
        outcome=outcome,
        details=_clean(json.loads(json.dumps(details or {}, default=str))),
        source_ip=_ip(ctx.source_ip),
        user_agent=_text("user_agent", ctx.user_agent),
        request_id=_text("request_id", ctx.request_id),
    )
    if connection.vendor == "postgresql":
        return _announce(_append_postgresql(fields))
    seq, prev_hash, last_time, now = _read_head_sqlite()
    fields["seq"] = seq + 1
    # Never before the previous event, even if a clock stepped back.
    fields["created_at"] = max(now, last_time) if last_time else now
    event = AuditEvent(prev_hash=prev_hash, hash=chain_hash(prev_hash, fields), **fields)
    # A plain INSERT: the lock is held until the caller commits, so time spent here is everyone's.
    with connection.cursor() as cur:
        cur.execute(_INSERT_SQL, [f.get_db_prep_save(getattr(event, f.attname), connection) for f in _INSERT_FIELDS])
        event.pk = cur.fetchone()[0]
    return _announce(_saved(event))


def _append_postgresql(fields: dict) -> AuditEvent:
    """Everything under the chain lock in one round trip: ``audit_append()`` (migration 0004).

    The event's own fields are encoded here, before the lock; the function
    fills in seq and created_at, hashes and inserts.  The lock is then held
    until the caller's COMMIT, as before, but for one round trip instead of two.
    """
    head, middle, tail = canonical_parts(fields)
    params = [CHAIN_LOCK_KEY, bool(settings.AUDIT_ASYNC_COMMIT), head, middle, tail]
    params += [canonical_json(fields[name]) if name == "details" else fields[name] for name in _APPEND_FIELDS]
    with connection.cursor() as cur:
        cur.execute(_APPEND_SQL, params)
        pk, seq, created_at, prev_hash, hash_ = cur.fetchone()
    # Positional: Django's fast path (the caller's COMMIT, and so the chain lock's release, waits for this).
    values = {**fields, "id": pk, "seq": seq, "created_at": created_at, "prev_hash": prev_hash, "hash": hash_}
    return _saved(AuditEvent(*[values[name] for name in _ATTNAMES]))


def _announce(event: AuditEvent) -> AuditEvent:
    recorded.send(sender=AuditEvent, event=event)
    return event


def _saved(event: AuditEvent) -> AuditEvent:
    event._state.adding = False
    event._state.db = connection.alias
    return event
