from django.db import migrations

# The whole critical section of the PostgreSQL writer in one call: take the
# chain lock, read the head, read the clock (never before the head's time),
# finish the hash and insert.  The caller encodes the event's own fields
# before the lock (verify_export.canonical_parts: the canonical JSON cut around
# created_at and seq), so the lock is held for this one round trip plus the
# caller's COMMIT.  The hashed string is exactly verify_export.canonical():
#   SHA-256(prev_hash || head || created_at as YYYY-MM-DDTHH:MM:SS.ffffffZ || middle || seq || tail)
# VOLATILE, READ COMMITTED: each statement takes its snapshot after the lock is
# granted, so it sees the previous writer's commit.  ``async_commit`` is the
# operator's PANEL_AUDIT_ASYNC_COMMIT (docs/audit.md): SET LOCAL
# synchronous_commit = off for the caller's transaction.
POSTGRES_UP = """
CREATE OR REPLACE FUNCTION audit_append(lock_key bigint, async_commit boolean,
    head text, middle text, tail text,
    p_actor_kind text, p_actor_id bigint, p_actor_name text, p_action text, p_object_type text,
    p_object_id text, p_object_repr text, p_node_id bigint, p_node_name text, p_outcome text,
    p_details text, p_source_ip text, p_user_agent text, p_request_id text,
    OUT new_id bigint, OUT new_seq bigint, OUT new_time timestamptz, OUT new_prev text, OUT new_hash text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    head_time timestamptz;
BEGIN
    IF async_commit THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT seq, hash, created_at INTO new_seq, new_prev, head_time
      FROM audit_auditevent ORDER BY seq DESC LIMIT 1;
    new_seq := coalesce(new_seq, 0) + 1;
    new_prev := coalesce(new_prev, repeat('0', 64));
    new_time := greatest(clock_timestamp(), head_time);
    new_hash := encode(sha256(convert_to(
        new_prev || head || to_char(new_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
        || middle || new_seq::text || tail, 'UTF8')), 'hex');
    INSERT INTO audit_auditevent (seq, created_at, actor_kind, actor_id, actor_name, action, object_type,
                                  object_id, object_repr, node_id, node_name, outcome, details, source_ip,
                                  user_agent, request_id, prev_hash, hash)
    VALUES (new_seq, new_time, p_actor_kind, p_actor_id, p_actor_name, p_action, p_object_type,
            p_object_id, p_object_repr, p_node_id, p_node_name, p_outcome, p_details::jsonb, p_source_ip::inet,
            p_user_agent, p_request_id, new_prev, new_hash)
    RETURNING id INTO new_id;
END
$$"""
POSTGRES_DOWN = ("DROP FUNCTION IF EXISTS audit_append(bigint, boolean, text, text, text, text, bigint, text, text, "
                 "text, text, text, bigint, text, text, text, text, text, text)")


def up(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(POSTGRES_UP, params=None)


def down(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(POSTGRES_DOWN, params=None)


class Migration(migrations.Migration):
    dependencies = [("audit", "0003_chain_head_function")]
    operations = [migrations.RunPython(up, down)]
