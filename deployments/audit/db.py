"""The database half of "append-only": triggers that refuse UPDATE, DELETE and TRUNCATE.

Migration 0002 installs the same SQL (copied there, as migrations are history).
``triggers_lifted`` is for the two sanctioned exceptions only: ``flush`` (tests
and throwaway databases) and ``audit archive`` (after the archived events are
exported and sealed by a signed checkpoint).  On PostgreSQL it needs the table
owner's rights, which the application role should not have (docs/audit.md).
"""

from __future__ import annotations

from contextlib import contextmanager

TABLE = "audit_auditevent"
REFUSAL = "audit events are append-only"

SQLITE_TRIGGERS = {
    "audit_auditevent_no_update": f"CREATE TRIGGER IF NOT EXISTS audit_auditevent_no_update BEFORE UPDATE ON {TABLE} "
    f"BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END",
    "audit_auditevent_no_delete": f"CREATE TRIGGER IF NOT EXISTS audit_auditevent_no_delete BEFORE DELETE ON {TABLE} "
    f"BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END",
    # INSERT OR REPLACE (and REPLACE INTO) deletes the row it collides with without firing the DELETE
    # trigger (unless PRAGMA recursive_triggers is on, which a connection of the sqlite3 shell does
    # not set): refuse any insert naming an existing event's id, seq or hash, whoever connects.
    # Migration 0006; each lookup is one index probe.
    "audit_auditevent_no_replace": f"CREATE TRIGGER IF NOT EXISTS audit_auditevent_no_replace BEFORE INSERT ON {TABLE} "
    f"WHEN EXISTS (SELECT 1 FROM {TABLE} WHERE seq = NEW.seq) "
    f"OR EXISTS (SELECT 1 FROM {TABLE} WHERE hash = NEW.hash) "
    f"OR EXISTS (SELECT 1 FROM {TABLE} WHERE id = NEW.id) "
    f"BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END",
}
POSTGRES_FUNCTION = f"""
CREATE OR REPLACE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '{REFUSAL} (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$"""
POSTGRES_TRIGGERS = {
    "audit_auditevent_append_only": f"CREATE TRIGGER audit_auditevent_append_only BEFORE UPDATE OR DELETE ON {TABLE} "
    f"FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()",
    "audit_auditevent_no_truncate": f"CREATE TRIGGER audit_auditevent_no_truncate BEFORE TRUNCATE ON {TABLE} "
    f"FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()",
}


def installed_triggers(connection) -> set[str]:
    with connection.cursor() as cur:
        if connection.vendor == "sqlite":
            cur.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = %s", [TABLE])
        elif connection.vendor == "postgresql":
            cur.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal", [TABLE])
        else:
            return set()
        return {row[0] for row in cur.fetchall()}


@contextmanager
def triggers_lifted(connection):
    """Suspend the append-only triggers for the enclosed block, and put them back.

    Run it inside a transaction where possible (``audit archive`` does): the
    triggers then never look lifted to any other session.
    """
    known = SQLITE_TRIGGERS if connection.vendor == "sqlite" else POSTGRES_TRIGGERS
    present = installed_triggers(connection) & set(known) if TABLE in connection.introspection.table_names() else set()
    if not present:
        yield
        return
    with connection.cursor() as cur:
        if connection.vendor == "sqlite":
            for name in present:
                cur.execute(f"DROP TRIGGER IF EXISTS {name}")
        else:
            for name in present:
                cur.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER {name}")
    try:
        yield
    finally:
        with connection.cursor() as cur:
            if connection.vendor == "sqlite":
                for name in present:
                    cur.execute(SQLITE_TRIGGERS[name])
            else:
                for name in present:
                    cur.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER {name}")


# --- the free-text search index (migration 0005) ------------------------------------------
#
# SQLite: an FTS5 trigram table over object_repr and node_name, external content (the audit
# table), fed by triggers.  A derived index: search narrows with it and still applies the LIKE
# condition; verification never reads it.  PostgreSQL: pg_trgm GIN indexes, used by the planner
# for Django's icontains as is (nothing to do here).

SEARCH_TABLE = "audit_auditevent_search"
SQLITE_SEARCH_TRIGGERS = {
    "audit_auditevent_search_insert": f"CREATE TRIGGER IF NOT EXISTS audit_auditevent_search_insert AFTER INSERT ON {TABLE} BEGIN "
    f"INSERT INTO {SEARCH_TABLE} (rowid, object_repr, node_name) "
    f"VALUES (new.id, new.object_repr, new.node_name); END",
    "audit_auditevent_search_update": f"CREATE TRIGGER IF NOT EXISTS audit_auditevent_search_update AFTER UPDATE ON {TABLE} BEGIN "
    f"INSERT INTO {SEARCH_TABLE} ({SEARCH_TABLE}, rowid, object_repr, node_name) "
    f"VALUES ('delete', old.id, old.object_repr, old.node_name); "
    f"INSERT INTO {SEARCH_TABLE} (rowid, object_repr, node_name) "
    f"VALUES (new.id, new.object_repr, new.node_name); END",
    "audit_auditevent_search_delete": f"CREATE TRIGGER IF NOT EXISTS audit_auditevent_search_delete AFTER DELETE ON {TABLE} BEGIN "
    f"INSERT INTO {SEARCH_TABLE} ({SEARCH_TABLE}, rowid, object_repr, node_name) "
    f"VALUES ('delete', old.id, old.object_repr, old.node_name); END",
}
SEARCH_MIN_LENGTH = 3  # a trigram index finds substrings of 3 characters or more
_search_tables: dict[tuple, bool] = {}


def has_search_table(connection) -> bool:
    """Whether this SQLite database has the FTS5 search table (asked once per database)."""
    if connection.vendor != "sqlite":
        return False
    key = (connection.alias, str(connection.settings_dict["NAME"]))
    if key not in _search_tables:
        with connection.cursor() as cur:
            cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = %s", [SEARCH_TABLE])
            found = cur.fetchone() is not None
        if not found:
            return False  # not cached: a migrate may add it later
        _search_tables[key] = True
    return _search_tables[key]


def search_phrase(text: str) -> str:
    """``text`` as one FTS5 phrase: a substring to find, whatever characters it holds."""
    return '"' + text.replace('"', '""') + '"'
