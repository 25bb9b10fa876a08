"""Append-only at every layer: model, queryset, admin, and the database's own triggers (SQLite's REPLACE too)."""

import pytest
from django.db import DatabaseError, connection, transaction

from deployments.audit.models import AuditEvent
from deployments.audit.verify import verify_chain

from .conftest import add_events, is_postgres, tamper

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


# --- SQLite REPLACE, upserts and the like cannot rewrite an event either --------------------------------

_COPY = (
    "id, seq, created_at, actor_kind, actor_id, 'mallory', action, object_type, object_id, object_repr, "
    "node_id, node_name, outcome, details, source_ip, user_agent, request_id, prev_hash, hash"
)
_ALL = _COPY.replace("'mallory'", "actor_name")
SQLITE_REWRITES = [
    f"INSERT OR REPLACE INTO audit_auditevent ({_ALL}) SELECT {_COPY} FROM audit_auditevent WHERE seq = 3",
    f"REPLACE INTO audit_auditevent ({_ALL}) SELECT {_COPY} FROM audit_auditevent WHERE seq = 3",
    # a new id, but the seq (or only the hash) of an existing event: REPLACE would delete that event
    f"INSERT OR REPLACE INTO audit_auditevent ({_ALL}) SELECT {_COPY.replace('id, ', '9999, ', 1)} "
    "FROM audit_auditevent WHERE seq = 3",
    f"INSERT OR REPLACE INTO audit_auditevent ({_ALL}) SELECT "
    f"{_COPY.replace('id, seq, ', '9999, 9999, ', 1)} FROM audit_auditevent WHERE seq = 3",
    f"INSERT INTO audit_auditevent ({_ALL}) SELECT {_COPY.replace('id, ', '9999, ', 1)} FROM audit_auditevent "
    "WHERE seq = 3 ON CONFLICT (seq) DO UPDATE SET actor_name = 'mallory'",
    "UPDATE OR REPLACE audit_auditevent SET actor_name = 'mallory' WHERE seq = 3",
]


@pytest.mark.parametrize("sql", SQLITE_REWRITES)
def test_sqlite_refuses_every_insert_that_would_replace_an_event(events, sql):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's REPLACE")
    before = AuditEvent.objects.values().get(seq=3)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cur:
        cur.execute(sql)
    assert AuditEvent.objects.values().get(seq=3) == before and AuditEvent.objects.count() == 8
    with connection.cursor() as cur:  # the search index was not touched either
        cur.execute("INSERT INTO audit_auditevent_search (audit_auditevent_search) VALUES ('integrity-check')")


@pytest.mark.django_db(transaction=True)
def test_sqlite_refuses_a_replace_from_any_connection_like_the_sqlite3_shell(settings):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's REPLACE")
    import sqlite3

    add_events(4)
    shell = sqlite3.connect(connection.settings_dict["NAME"])  # no Django, no PRAGMA of the panel's
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            shell.execute(SQLITE_REWRITES[0])
        shell.rollback()
    finally:
        shell.close()
    assert AuditEvent.objects.get(seq=3).actor_name == "" and verify_chain().ok


def test_the_replace_trigger_is_installed_and_survives_lifting(events):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's trigger")
    from deployments.audit.db import installed_triggers

    assert "audit_auditevent_no_replace" in installed_triggers(connection)
    tamper("UPDATE audit_auditevent SET actor_name = actor_name WHERE seq = 1")  # lifted and put back
    assert "audit_auditevent_no_replace" in installed_triggers(connection)
    add_events(1)  # the writer's plain INSERT still appends


@pytest.mark.postgres
@pytest.mark.parametrize(
    "sql",
    [
        f"INSERT INTO audit_auditevent ({_ALL}) SELECT {_COPY.replace('id, ', '9999, ', 1)} FROM audit_auditevent "
        "WHERE seq = 3 ON CONFLICT (seq) DO UPDATE SET actor_name = 'mallory'",
        "MERGE INTO audit_auditevent t USING (SELECT 3 AS seq) s ON t.seq = s.seq "
        "WHEN MATCHED THEN UPDATE SET actor_name = 'mallory'",
        "MERGE INTO audit_auditevent t USING (SELECT 3 AS seq) s ON t.seq = s.seq WHEN MATCHED THEN DELETE",
    ],
)
def test_postgresql_refuses_upserts_and_merges(events, sql):
    if not is_postgres():
        pytest.skip("PostgreSQL's ON CONFLICT and MERGE; run with DATABASE_URL=postgres://…")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cur:
        cur.execute(sql)
    assert AuditEvent.objects.get(seq=3).actor_name == ""
