"""record(): one writer, inside the caller's transaction, a gap-free hash chain."""

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from deployments.audit.chain import GENESIS_HASH, chain_hash
from deployments.audit.models import AuditEvent
from deployments.audit.verify import verify_chain
from deployments.audit.writer import record

from .conftest import add_events

pytestmark = pytest.mark.django_db


@pytest.mark.django_db(transaction=True)
def test_it_refuses_to_write_outside_a_transaction():
    with pytest.raises(RuntimeError, match="inside the transaction"):
        record("test.event")
    assert not AuditEvent.objects.exists()


def test_events_form_a_gap_free_chain_from_genesis():
    events = add_events(5)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == GENESIS_HASH
    for before, after in zip(events, events[1:], strict=False):
        assert after.prev_hash == before.hash
    assert verify_chain().ok


def test_the_stored_hash_covers_the_event_as_read_back():
    record_ = add_events(1)[0]
    stored = AuditEvent.objects.values().get(seq=record_.seq)
    assert chain_hash(stored["prev_hash"], stored) == stored["hash"]


def test_an_event_rolled_back_with_its_change_leaves_no_gap():
    add_events(1)
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        record("test.event")
        1 / 0  # noqa: B018  (the change fails after its event was written)
    assert [e.seq for e in add_events(1)] == [2]
    assert verify_chain().ok


def test_time_never_goes_backwards_along_the_chain(monkeypatch):
    add_events(1)
    # A clock stepping back an hour must not put #2 before #1.
    monkeypatch.setattr(timezone, "now", lambda: AuditEvent.objects.get(seq=1).created_at - timedelta(hours=1))
    second = add_events(1)[0]
    assert second.created_at >= AuditEvent.objects.get(seq=1).created_at
    assert verify_chain().ok


def test_the_actor_snapshot_survives_the_users_deletion(django_user_model):
    dave = django_user_model.objects.create_user("dave", "dave@example.com", "dave-password-1")
    with transaction.atomic():
        record("test.event", user=dave)
    dave.delete()
    event = AuditEvent.objects.get(action="test.event")
    assert (event.actor_kind, event.actor_name) == ("user", "dave")
    assert event.actor_id is not None


def test_awkward_details_still_verify():
    with transaction.atomic():
        record(
            "test.event",
            details={
                "big": 1e20,
                "small": 0.1,
                "nul": "a\x00b",
                "nested": {"z": [1, "x"]},
                "unicode": "é ✓",
                "inf": float("inf"),
            },
        )
    assert verify_chain().ok


def test_long_fields_are_cut_to_fit_before_hashing():
    with transaction.atomic():
        record("test.event", object_repr="x" * 1000)
    assert len(AuditEvent.objects.get(seq=1).object_repr) == 300
    assert verify_chain().ok


def test_the_chain_verifies_whatever_the_local_time_zone(monkeypatch):
    import time

    add_events(2)
    monkeypatch.setenv("TZ", "America/St_Johns")  # UTC-3:30: any mix-up of local and UTC shows
    time.tzset()
    try:
        assert verify_chain().ok
    finally:
        monkeypatch.undo()
        time.tzset()


def test_an_unregistered_event_name_is_refused_before_anything_is_written(db):
    # The review page's filter offers the registry's names: an event outside it would be unfindable.
    with transaction.atomic(), pytest.raises(ValueError, match="unregistered audit event 'deployment.exploded'"):
        record("deployment.exploded", actor_kind="system")
    assert not AuditEvent.objects.exists()


def test_every_name_the_panel_writes_is_registered_and_offered_to_reviewers(db):
    from deployments.audit.events import EVENT_NAMES
    from deployments.audit.views import EVENT_NAMES as offered

    assert offered is EVENT_NAMES
    assert {"deployment.finished", "hostkey.mismatch", "hostkey.viewed", "team.grant_added"} <= set(EVENT_NAMES)
