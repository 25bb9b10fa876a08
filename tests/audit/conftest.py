"""Fixtures for the audit trail: a private checkpoint directory, events, tampering, `audit verify`.

The auditor carol is a persona (tests/support/personas.py).
"""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from deployments.audit import events as registry
from deployments.audit.db import triggers_lifted
from deployments.audit.writer import record


class _WithTestEvents(dict):
    """The registry, plus the ``test.*`` names these tests write to exercise the chain itself."""

    def __contains__(self, name) -> bool:
        return str(name).startswith("test.") or super().__contains__(name)


@pytest.fixture(autouse=True)
def test_event_names(monkeypatch):
    monkeypatch.setattr(registry, "EVENTS", _WithTestEvents(registry.EVENTS))


@pytest.fixture(autouse=True)
def audit_dirs(settings, tmp_path):
    """Each test signs with its own key (made here: verification never makes one) and its own checkpoint directory."""
    from deployments.audit import checkpoint

    settings.AUDIT_SIGNING_KEY_FILE = str(tmp_path / "keys" / "audit-signing.key")
    settings.AUDIT_CHECKPOINT_DIR = str(tmp_path / "checkpoints")
    settings.AUDIT_PUBLIC_KEY = ""
    checkpoint.signing_key(create=True)
    return tmp_path


def add_events(n: int, *, action: str = "test.event", **kwargs) -> list:
    events = []
    for i in range(n):
        with transaction.atomic():
            events.append(
                record(
                    action,
                    actor_kind="system",
                    object_type="thing",
                    object_id=str(i),
                    object_repr=f"thing {i}",
                    details={"i": i},
                    **kwargs,
                )
            )
    return events


@pytest.fixture
def events(db):
    """Eight events on the chain, #1-#8."""
    return add_events(8)


def verify(*args) -> tuple[int, str]:
    """Run ``manage.py audit verify *args``: (exit status, what it wrote and its error)."""
    out = io.StringIO()
    try:
        call_command("audit", "verify", *args, stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def tamper(sql: str, params=()) -> None:
    """Change the table behind the triggers' back, as a database administrator could."""
    with transaction.atomic(), triggers_lifted(connection), connection.cursor() as cur:
        cur.execute(sql, params)


def is_postgres() -> bool:
    return connection.vendor == "postgresql"
