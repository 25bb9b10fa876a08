"""Audit settings, read from Django settings or the environment (in that order).

``PANEL_AUDIT_SIGNING_KEY_FILE``   Ed25519 private key (PEM) that signs checkpoints;
                                   created 0600 on first use.  Default DATA_DIR/audit-signing.key.
``PANEL_AUDIT_CHECKPOINT_DIR``     where checkpoints are written, one file each, never rewritten.
                                   Default DATA_DIR/audit-checkpoints.
``PANEL_AUDIT_CHECKPOINT_URL``     optional: every checkpoint is also POSTed here (JSON).
``PANEL_AUDIT_CHECKPOINT_MINUTES`` how often the periodic checkpoint runs; 0 disables it.  Default 15.
``PANEL_AUDIT_ASYNC_COMMIT``       PostgreSQL only: commit transactions that write an audit event with
                                   ``synchronous_commit = off`` (docs/audit.md: the trade-off).  Default off.

They are functions, not constants, so tests (and ``override_settings``) can
point them elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def _get(setting: str, env: str, default):
    value = getattr(settings, setting, None)
    if value is None or value == "":
        value = os.environ.get(env, "")
    return value if value != "" else default


def signing_key_file() -> Path:
    return Path(_get("AUDIT_SIGNING_KEY_FILE", "PANEL_AUDIT_SIGNING_KEY_FILE", settings.DATA_DIR / "audit-signing.key"))


def checkpoint_dir() -> Path:
    return Path(_get("AUDIT_CHECKPOINT_DIR", "PANEL_AUDIT_CHECKPOINT_DIR", settings.DATA_DIR / "audit-checkpoints"))


def checkpoint_url() -> str:
    return str(_get("AUDIT_CHECKPOINT_URL", "PANEL_AUDIT_CHECKPOINT_URL", ""))


def checkpoint_minutes() -> int:
    value = _get("AUDIT_CHECKPOINT_MINUTES", "PANEL_AUDIT_CHECKPOINT_MINUTES", 15)
    try:
        minutes = int(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"PANEL_AUDIT_CHECKPOINT_MINUTES={value!r} is not an integer") from None
    if minutes < 0:
        raise ImproperlyConfigured("PANEL_AUDIT_CHECKPOINT_MINUTES must be 0 (off) or more")
    return minutes


def async_commit() -> bool:
    value = _get("AUDIT_ASYNC_COMMIT", "PANEL_AUDIT_ASYNC_COMMIT", False)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"PANEL_AUDIT_ASYNC_COMMIT={value!r}: use on or off")
