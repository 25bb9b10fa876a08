"""Signed checkpoints: a key outside the database, files never rewritten, a periodic schedule."""

import stat

import pytest

from deployments.audit import checkpoint
from deployments.audit.apps import SCHEDULE_FUNC

from .conftest import add_events

pytestmark = pytest.mark.django_db


def test_a_new_panels_first_checkpoint_creates_the_signing_key_private(events, audit_dirs):
    key = audit_dirs / "keys" / "audit-signing.key"
    key.unlink()  # (the fixture made one)
    (audit_dirs / "keys" / "audit-signing.pub").unlink()
    checkpoint.write_checkpoint()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (audit_dirs / "keys" / "audit-signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_a_checkpoint_signs_the_chain_head(events):
    cp = checkpoint.read_checkpoint(checkpoint.write_checkpoint())
    assert (cp.seq, cp.hash) == (8, events[-1].hash)
    chain = checkpoint.load_chain(checkpoint.verification_key()[0])
    assert chain.problem is None and chain.latest == (cp.path.name, cp.data)


def test_checkpoint_files_are_read_only_and_never_rewritten(events):
    path = checkpoint.write_checkpoint()
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    add_events(1)
    second = checkpoint.write_checkpoint()
    assert second != path and path.exists()


def test_a_periodic_checkpoint_with_nothing_new_writes_nothing(events):
    assert checkpoint.write_checkpoint() is not None
    assert checkpoint.write_checkpoint() is None


def test_the_periodic_checkpoint_is_scheduled_after_migrate(db):
    from django_q.models import Schedule

    schedule = Schedule.objects.get(name="audit-checkpoint")
    assert schedule.func == SCHEDULE_FUNC and schedule.schedule_type == Schedule.MINUTES


def test_checkpoints_are_also_posted_to_the_operators_url(events, settings, monkeypatch):
    sent = []

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b""

    monkeypatch.setattr(checkpoint.urllib.request, "urlopen", lambda req, timeout: sent.append(req) or Response())
    settings.AUDIT_CHECKPOINT_URL = "https://audit.example.com/checkpoints"
    checkpoint.write_checkpoint()
    assert sent and sent[0].full_url == "https://audit.example.com/checkpoints"
