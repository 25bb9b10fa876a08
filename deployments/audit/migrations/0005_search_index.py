import logging

from django.db import migrations, transaction

# Free text over object and node names (``?q=``) without scanning the table.
#
# PostgreSQL: pg_trgm GIN indexes on exactly the expressions Django's icontains
# compares (UPPER(col::text)), so the planner can answer ``LIKE '%term%'`` from
# them.  pg_trgm is a trusted extension (CREATE on the database suffices); if
# it cannot be created the indexes are skipped, search still works (by scanning),
# and the migration says so in the log.
#
# SQLite: an FTS5 table with the trigram tokenizer (SQLite 3.34+) over the same
# two columns, with external content (the audit table itself; nothing is copied),
# kept up to date by an AFTER INSERT trigger.  It is a derived index only:
# search uses it to narrow the rows and still applies the LIKE condition, and
# verification never reads it.  The AFTER UPDATE/DELETE triggers only ever run
# when the append-only triggers are lifted (archive, flush, a DBA), and keep it
# consistent then.  Copied from deployments/audit/db.py on purpose (history).
log = logging.getLogger("deployments.audit")

POSTGRES_UP = [
    "CREATE INDEX IF NOT EXISTS audit_object_repr_trgm ON audit_auditevent "
    "USING gin ((UPPER(object_repr::text)) gin_trgm_ops)",
    "CREATE INDEX IF NOT EXISTS audit_node_name_trgm ON audit_auditevent "
    "USING gin ((UPPER(node_name::text)) gin_trgm_ops)",
]
# Statistics on the indexed expressions, so the planner can tell a common term (walk seq and stop
# after a page) from a rare one (ask the index) before autovacuum gets round to it.  Only for a
# table with rows: statistics of an empty table would mislead the planner while it fills.
POSTGRES_ANALYZE = "ANALYZE audit_auditevent"
POSTGRES_DOWN = [
    "DROP INDEX IF EXISTS audit_object_repr_trgm",
    "DROP INDEX IF EXISTS audit_node_name_trgm",
]
SQLITE_UP = [
    "CREATE VIRTUAL TABLE IF NOT EXISTS audit_auditevent_search USING fts5(object_repr, node_name, "
    "content='audit_auditevent', content_rowid='id', tokenize='trigram')",
    "CREATE TRIGGER IF NOT EXISTS audit_auditevent_search_insert AFTER INSERT ON audit_auditevent BEGIN "
    "INSERT INTO audit_auditevent_search (rowid, object_repr, node_name) "
    "VALUES (new.id, new.object_repr, new.node_name); END",
    "CREATE TRIGGER IF NOT EXISTS audit_auditevent_search_update AFTER UPDATE ON audit_auditevent BEGIN "
    "INSERT INTO audit_auditevent_search (audit_auditevent_search, rowid, object_repr, node_name) "
    "VALUES ('delete', old.id, old.object_repr, old.node_name); "
    "INSERT INTO audit_auditevent_search (rowid, object_repr, node_name) "
    "VALUES (new.id, new.object_repr, new.node_name); END",
    "CREATE TRIGGER IF NOT EXISTS audit_auditevent_search_delete AFTER DELETE ON audit_auditevent BEGIN "
    "INSERT INTO audit_auditevent_search (audit_auditevent_search, rowid, object_repr, node_name) "
    "VALUES ('delete', old.id, old.object_repr, old.node_name); END",
    "INSERT INTO audit_auditevent_search (audit_auditevent_search) VALUES ('rebuild')",
]
SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS audit_auditevent_search_insert",
    "DROP TRIGGER IF EXISTS audit_auditevent_search_update",
    "DROP TRIGGER IF EXISTS audit_auditevent_search_delete",
    "DROP TABLE IF EXISTS audit_auditevent_search",
]


def up(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor == "postgresql":
        try:
            with transaction.atomic(using=connection.alias):
                schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm", params=None)
        except Exception as exc:  # noqa: BLE001  (no pg_trgm, or no right to create it)
            log.warning("audit: pg_trgm unavailable (%s); free-text search will scan the table", exc)
            return
        for sql in POSTGRES_UP:
            schema_editor.execute(sql, params=None)
        with connection.cursor() as cur:
            cur.execute("SELECT EXISTS (SELECT 1 FROM audit_auditevent)")
            if cur.fetchone()[0]:
                cur.execute(POSTGRES_ANALYZE)
    elif connection.vendor == "sqlite":
        import sqlite3

        if sqlite3.sqlite_version_info < (3, 34, 0):
            log.warning("audit: SQLite %s has no trigram tokenizer (3.34+); free-text search will scan the table",
                        sqlite3.sqlite_version)
            return
        try:
            with transaction.atomic(using=connection.alias):
                for sql in SQLITE_UP:
                    schema_editor.execute(sql, params=None)
        except Exception as exc:  # noqa: BLE001  (SQLite built without FTS5)
            log.warning("audit: no FTS5 trigram index (%s); free-text search will scan the table", exc)


def down(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    for sql in {"postgresql": POSTGRES_DOWN, "sqlite": SQLITE_DOWN}.get(vendor, []):
        schema_editor.execute(sql, params=None)


class Migration(migrations.Migration):
    dependencies = [("audit", "0004_append_function")]
    operations = [migrations.RunPython(up, down)]
