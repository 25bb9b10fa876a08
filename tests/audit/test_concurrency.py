"""Concurrent writers never fork the chain: 8 writers, seqs 1..8N gap-free, and it verifies."""

import threading

import pytest
from django.db import connection, connections, transaction

from deployments.audit.models import AuditEvent
from deployments.audit.verify import verify_chain
from deployments.audit.writer import record

WRITERS, EACH = 8, 50


def write_many(errors: list) -> None:
    try:
        for i in range(EACH):
            with transaction.atomic():
                record("test.concurrent", actor_kind="system", details={"i": i})
    except Exception as exc:  # noqa: BLE001  (reported to the test below)
        errors.append(exc)
    finally:
        connections.close_all()


def run_writers() -> None:
    errors: list = []
    threads = [threading.Thread(target=write_many, args=(errors,)) for _ in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_eight_writers_on_postgresql_do_not_fork_the_chain():
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL to test concurrent writers: set DATABASE_URL=postgres://…")
    run_writers()
    assert list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True)) == list(range(1, WRITERS * EACH + 1))
    assert verify_chain().ok


@pytest.mark.django_db(transaction=True)
def test_eight_writers_on_sqlite_do_not_fork_the_chain():
    if connection.vendor != "sqlite":
        pytest.skip("the SQLite variant of the PostgreSQL test above")
    run_writers()
    assert AuditEvent.objects.count() == WRITERS * EACH
    assert verify_chain().ok
