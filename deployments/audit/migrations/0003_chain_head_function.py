from django.db import migrations

# One round trip instead of two for the writer, on PostgreSQL: take the chain
# lock, then read the head and the clock.  VOLATILE, so the SELECT takes its
# snapshot after the lock is granted and sees the previous writer's commit.
POSTGRES_UP = """
CREATE OR REPLACE FUNCTION audit_lock_chain_head(lock_key bigint,
    OUT now timestamptz, OUT head_seq bigint, OUT head_hash text, OUT head_time timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    now := clock_timestamp();
    SELECT seq, hash, created_at INTO head_seq, head_hash, head_time
      FROM audit_auditevent ORDER BY seq DESC LIMIT 1;
END
$$"""
POSTGRES_DOWN = "DROP FUNCTION IF EXISTS audit_lock_chain_head(bigint)"


def up(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(POSTGRES_UP, params=None)


def down(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(POSTGRES_DOWN, params=None)


class Migration(migrations.Migration):
    dependencies = [("audit", "0002_indexes_and_append_only_triggers")]
    operations = [migrations.RunPython(up, down)]
