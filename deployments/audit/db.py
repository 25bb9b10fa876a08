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
