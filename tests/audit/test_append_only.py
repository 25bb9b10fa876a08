"""Append-only at every layer: model, queryset, admin, and the database's own triggers."""

import pytest
from django.db import DatabaseError, connection, transaction

from deployments.audit.models import AuditEvent

from .conftest import is_postgres

pytestmark = pytest.mark.django_db


def raw(sql: str, params=()) -> None:
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(sql, params)


def test_the_model_refuses_to_save_an_existing_event(events):
    event = AuditEvent.objects.get(seq=1)
    event.action = "rewritten"
    with pytest.raises(PermissionError):
        event.save()


def test_the_model_refuses_to_delete_an_event(events):
    with pytest.raises(PermissionError):
        AuditEvent.objects.get(seq=1).delete()


def test_querysets_refuse_update_and_delete(events):
    with pytest.raises(PermissionError):
        AuditEvent.objects.filter(seq=1).update(action="rewritten")
    with pytest.raises(PermissionError):
        AuditEvent.objects.all().delete()


def test_the_database_refuses_a_raw_update(events):
    with pytest.raises(DatabaseError, match="append-only"):
        raw("UPDATE audit_auditevent SET action = 'rewritten' WHERE seq = 1")
    assert AuditEvent.objects.get(seq=1).action == "test.event"


def test_the_database_refuses_a_raw_delete(events):
    with pytest.raises(DatabaseError, match="append-only"):
        raw("DELETE FROM audit_auditevent WHERE seq = 8")
    assert AuditEvent.objects.count() == 8


@pytest.mark.postgres
def test_postgresql_refuses_truncate(events):
    if not is_postgres():
        pytest.skip("TRUNCATE triggers exist on PostgreSQL only; run with DATABASE_URL=postgres://…")
    with pytest.raises(DatabaseError, match="append-only"):
        raw("TRUNCATE audit_auditevent")
    assert AuditEvent.objects.count() == 8


@pytest.mark.postgres
def test_postgresql_refuses_raw_update_and_delete():
    # The same refusals as above, asserted to have run on PostgreSQL itself.
    if not is_postgres():
        pytest.skip("needs PostgreSQL: run with DATABASE_URL=postgres://…")
    from .conftest import add_events

    add_events(2)
    for sql in ("UPDATE audit_auditevent SET outcome = 'denied'", "DELETE FROM audit_auditevent"):
        with pytest.raises(DatabaseError, match="append-only"):
            raw(sql)
    assert AuditEvent.objects.filter(outcome="success").count() == 2


def test_the_admin_is_read_only(client, alice, events):
    client.force_login(alice)
    assert client.get("/admin/audit/auditevent/").status_code == 200
    pk = AuditEvent.objects.get(seq=1).pk
    page = client.get(f"/admin/audit/auditevent/{pk}/change/")
    assert page.status_code == 200 and b'name="_save"' not in page.content
    assert client.get("/admin/audit/auditevent/add/").status_code == 403
    assert client.post(f"/admin/audit/auditevent/{pk}/delete/", {"post": "yes"}).status_code == 403
    assert AuditEvent.objects.filter(seq__lte=8).count() == 8


def test_flush_still_empties_the_table_for_throwaway_databases(events):
    from django.core.management import call_command

    call_command("flush", interactive=False, verbosity=0)
    assert not AuditEvent.objects.exists()
    # ... and the triggers are back afterwards.
    from .conftest import add_events

    add_events(1)
    with pytest.raises(DatabaseError, match="append-only"):
        raw("DELETE FROM audit_auditevent")
