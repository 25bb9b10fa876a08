"""API tokens: create, revoke, and check one a request presents.  Every change is atomic and audited.

A token is ``npt_<prefix>_<secret>``: 8 hex characters that find its row (unique, indexed, shown on
the page) and 43 URL-safe characters of secret (256 bits).  Only SHA-256 of the secret is stored;
the check compares digests with ``hmac.compare_digest``.  A plain hash suffices (no slow KDF): the
secret is random and 256 bits long, so nothing can be guessed from the hash.

Cost of a request: one indexed query (the token and its user, joined).  ``last_used_at`` is written,
and ``api_token.used`` recorded, at most once a minute per token (``USE_RECORDED_EVERY``), by a
conditional UPDATE that only one of many concurrent requests wins; so the trail says which tokens
were used and when to the minute, without one event per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from deployments.audit.writer import record
from deployments.errors import RequestError
from deployments.validators import validate_search_text

from .models import ApiToken

TOKEN_PREFIX = "npt_"
TOKEN_RE = re.compile(r"\Anpt_(?P<prefix>[0-9a-f]{8})_(?P<secret>[A-Za-z0-9_-]{43})\Z")
USE_RECORDED_EVERY = timedelta(minutes=1)
MAX_EXPIRY_DAYS = 3650
# What a token may be called: it identifies the token to its owner and in the audit trail.
NAME_RE = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9 _.:-]{0,98}[A-Za-z0-9_.-])?\Z")
# Compared against when no token has the prefix, so a miss costs what a hit costs.
_NO_HASH = "0" * 64


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def validate_token_name(value: str) -> None:
    """Letters, digits, space and ``_.:-``, up to 100 characters, starting and ending visibly."""
    validate_search_text(value, max_length=100)
    if not NAME_RE.match(value or ""):
        raise ValidationError(
            "Use letters, digits, spaces and _ . : - (at most 100 characters, starting with a letter or digit).",
            code="invalid_token_name",
        )


def validate_expiry_days(value: int | None) -> None:
    if value is not None and not 1 <= value <= MAX_EXPIRY_DAYS:
        raise ValidationError(f"Expiry must be between 1 and {MAX_EXPIRY_DAYS} days, or none.", code="invalid_expiry")


def create_token(user, *, name: str, expires_in_days: int | None = None) -> tuple[ApiToken, str]:
    """A new token for ``user``: the row and the whole token text, which is never available again."""
    try:
        validate_token_name(name)
        validate_expiry_days(expires_in_days)
    except ValidationError as exc:
        raise RequestError(exc.messages[0]) from None
    now = timezone.now()
    with transaction.atomic():
        while True:  # a prefix is 32 bits: a clash is rare, but the unique index must never reject a new token
            prefix = secrets.token_hex(4)
            if not ApiToken.objects.filter(prefix=prefix).exists():
                break
        secret = secrets.token_urlsafe(32)
        token = ApiToken.objects.create(
            user=user,
            name=name,
            prefix=prefix,
            secret_hash=hash_secret(secret),
            created_at=now,
            expires_at=now + timedelta(days=expires_in_days) if expires_in_days else None,
        )
        record(
            "api_token.created",
            user=user,
            obj=token,
            object_repr=token.display,
            details={
                "name": name,
                "prefix": prefix,
                "expires_at": token.expires_at.isoformat() if token.expires_at else None,
            },
        )
    return token, f"{TOKEN_PREFIX}{prefix}_{secret}"


def revoke_token(token: ApiToken, *, user) -> ApiToken:
    """Revoke ``token`` (its owner's own only: callers look it up among ``user``'s tokens).  RequestError if it
    was revoked already."""
    now = timezone.now()
    with transaction.atomic():
        if not ApiToken.objects.filter(pk=token.pk, user=user, revoked_at__isnull=True).update(revoked_at=now):
            raise RequestError(f"The token {token.name!r} was already revoked.")
        token.revoked_at = now
        record(
            "api_token.revoked",
            user=user,
            obj=token,
            object_repr=token.display,
            details={"name": token.name, "prefix": token.prefix},
        )
    return token


class Refused(Exception):
    """A token that does not let its bearer in; the message is what the client is told."""


def authenticate(raw: str) -> tuple[object, ApiToken]:
    """The user and token ``raw`` stands for, or ``Refused`` (recorded as ``api_token.refused``).

    Refused: malformed, unknown prefix, wrong secret, revoked, expired, or the user deactivated.  The
    event names the prefix (if there is one) and the reason, never what was sent after it.
    """
    match = TOKEN_RE.match(raw)
    if match is None:
        _refuse("malformed", None, "malformed token")
    prefix, secret = match["prefix"], match["secret"]
    token = ApiToken.objects.select_related("user").filter(prefix=prefix).first()
    if not hmac.compare_digest(token.secret_hash if token else _NO_HASH, hash_secret(secret)) or token is None:
        _refuse("unknown", None, "invalid token", prefix=prefix)
    now = timezone.now()
    if token.revoked_at is not None:
        _refuse("revoked", token, "this token was revoked")
    if token.expires_at is not None and token.expires_at <= now:
        _refuse("expired", token, "this token has expired")
    if not token.user.is_active:
        _refuse("user inactive", token, "the token's user is deactivated")
    _note_use(token, now)
    return token.user, token


def still_valid(token_id: int) -> bool:
    """Whether the token may still be used (for a long response, asked again while it runs)."""
    now = timezone.now()
    return (
        ApiToken.objects.filter(pk=token_id, revoked_at__isnull=True, user__is_active=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .exists()
    )


def _note_use(token: ApiToken, now) -> None:
    if token.last_used_at is not None and now - token.last_used_at < USE_RECORDED_EVERY:
        return  # recorded within the minute: no write at all
    with transaction.atomic():
        stale = Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - USE_RECORDED_EVERY)
        if not ApiToken.objects.filter(stale, pk=token.pk).update(last_used_at=now):
            return  # a concurrent request recorded it
        token.last_used_at = now
        record(
            "api_token.used",
            user=token.user,
            obj=token,
            object_repr=token.display,
            details={"name": token.name, "prefix": token.prefix},
        )


def _refuse(reason: str, token: ApiToken | None, message: str, *, prefix: str = "") -> None:
    with transaction.atomic():
        record(
            "api_token.refused",
            actor_kind="anonymous",
            actor_name=token.user.get_username() if token else "",
            obj=token,
            object_type="apitoken",
            object_repr=token.display if token else (f"npt_{prefix}_…" if prefix else ""),
            outcome="denied",
            details={"reason": reason, **({"prefix": token.prefix if token else prefix} if token or prefix else {})},
        )
    raise Refused(message)
