from django.db import migrations

# SQLite: INSERT OR REPLACE (REPLACE INTO) deletes the row it collides with without firing the
# BEFORE DELETE trigger (SQLite fires delete triggers for REPLACE only with PRAGMA
# recursive_triggers on, which a connection of the sqlite3 shell does not set), so it could rewrite an
# event in place.  This trigger refuses any insert that names an existing event's id, seq or hash,
# whoever connects.  PostgreSQL has no REPLACE; its INSERT … ON CONFLICT DO UPDATE fires the UPDATE
# trigger.  Copied from deployments/audit/db.py on purpose (history).
SQLITE_UP = (
    "CREATE TRIGGER IF NOT EXISTS audit_auditevent_no_replace BEFORE INSERT ON audit_auditevent "
    "WHEN EXISTS (SELECT 1 FROM audit_auditevent WHERE seq = NEW.seq) "
    "OR EXISTS (SELECT 1 FROM audit_auditevent WHERE hash = NEW.hash) "
    "OR EXISTS (SELECT 1 FROM audit_auditevent WHERE id = NEW.id) "
    "BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END"
)
SQLITE_DOWN = "DROP TRIGGER IF EXISTS audit_auditevent_no_replace"


def up(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(SQLITE_UP, params=None)


def down(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(SQLITE_DOWN, params=None)


class Migration(migrations.Migration):
    dependencies = [("audit", "0005_search_index")]
    operations = [migrations.RunPython(up, down)]
