"""The paths that keep the trail fast at a million events say the same as the simple ones.

* the PostgreSQL writer finishes the hash in the database from ``canonical_parts``
  (test_chain.py proves the pieces agree);
* verify reads raw rows, builds the canonical form field by field and splits the
  chain across processes, and still names the same first bad event;
* free text is narrowed by a search index (pg_trgm / FTS5) and a window next to
  the cursor, and finds exactly what ``icontains`` finds.
"""

import pytest
from django.db import connection, transaction

from deployments.audit import query, verify
from deployments.audit.chain import chain_hash
from deployments.audit.models import AuditEvent
from deployments.audit.query import AuditFilter
from deployments.audit.verify import verify_chain
from deployments.audit.writer import record

from .conftest import add_events, is_postgres, tamper
from .test_chain import AWKWARD


@pytest.mark.django_db
def test_awkward_events_written_by_either_backend_verify():
    with transaction.atomic():
        first = record(
            "test.awkward",
            actor_kind="cli",
            actor_name='a"b\\c',
            object_repr='"seq":1, "x"',
            node=None,
            details=AWKWARD,
        )
    event = AuditEvent.objects.values().get(seq=first.seq)
    assert event["hash"] == first.hash == chain_hash(event["prev_hash"], event)
    assert (first.seq, first.created_at) == (event["seq"], event["created_at"])
    add_events(2)
    assert verify_chain().ok


@pytest.mark.django_db(transaction=True)
def test_async_commit_is_off_unless_the_operator_turns_it_on(settings):
    if not is_postgres():
        pytest.skip("PostgreSQL only: SQLite has no synchronous_commit")

    def setting():
        with transaction.atomic():
            record("test.event", actor_kind="system")
            with connection.cursor() as cur:
                cur.execute("SHOW synchronous_commit")
                return cur.fetchone()[0]

    assert setting() == "on"
    settings.AUDIT_ASYNC_COMMIT = True
    assert setting() == "off"
    settings.AUDIT_ASYNC_COMMIT = False
    # SET LOCAL: the next transaction is back to the server's setting.
    with connection.cursor() as cur:
        cur.execute("SHOW synchronous_commit")
        assert cur.fetchone()[0] == "on"


TAMPERING = [
    None,
    ("UPDATE audit_auditevent SET actor_name = 'mallory' WHERE seq = 9", "event #9 was modified"),
    ("UPDATE audit_auditevent SET actor_name = 'mallory' WHERE seq IN (5, 13)", "event #5 was modified"),
    ("DELETE FROM audit_auditevent WHERE seq = 6", "event #6 removed"),
    ("DELETE FROM audit_auditevent WHERE seq IN (10, 11)", "event #10-#11 removed"),
    ("UPDATE audit_auditevent SET prev_hash = hash WHERE seq = 8", "event #8 was modified"),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("tampering", TAMPERING)
def test_verify_split_across_processes_names_the_same_first_bad_event(tampering, monkeypatch):
    add_events(16)
    if tampering:
        tamper(tampering[0])
    serial = verify_chain(workers=1)
    monkeypatch.setattr(verify, "SEGMENTS_PER_WORKER", 3)
    for workers in (2, 3):
        split = verify_chain(workers=workers, batch=2)
        assert (split.ok, split.count, split.last_seq, split.head_hash) == (
            serial.ok,
            serial.count,
            serial.last_seq,
            serial.head_hash,
        )
        assert str(split.problem) == str(serial.problem)
    if tampering:
        assert tampering[1] in str(serial.problem)
    else:
        assert serial.ok and serial.count == 16


@pytest.mark.django_db(transaction=True)
def test_a_segment_boundary_link_is_checked(monkeypatch):
    add_events(12)
    # #7 re-hashed consistently with its new content: only #8's link to it shows the change.
    row = AuditEvent.objects.values().get(seq=7)
    row["object_repr"] = "innocent"
    tamper(
        "UPDATE audit_auditevent SET object_repr = %s, hash = %s WHERE seq = 7",
        ["innocent", chain_hash(row["prev_hash"], row)],
    )
    monkeypatch.setattr(verify, "SEGMENTS_PER_WORKER", 2)
    for workers in (1, 2, 3):  # with 2 workers x 2 segments, #8 starts a segment
        report = verify_chain(workers=workers, batch=3)
        assert "event #7 was rewritten" in str(report.problem), workers


@pytest.mark.timeout(180)
@pytest.mark.django_db(transaction=True)
def test_stopping_at_the_first_bad_segment_never_hangs(monkeypatch):
    # A forked Pool hung in terminate() on this early exit, in about half the runs.
    add_events(40)
    tamper("UPDATE audit_auditevent SET actor_name = 'mallory' WHERE seq = 3")
    monkeypatch.setattr(verify, "SEGMENTS_PER_WORKER", 4)  # 8 segments: 7 are pending or running at the stop
    for attempt in range(20):
        report = verify_chain(workers=2, batch=2)
        assert not report.ok and "event #3 was modified" in str(report.problem), attempt
        assert report.count == 2, attempt


def search(**params) -> list[int]:
    f, errors = AuditFilter.from_data(params)
    assert not errors
    return [e.seq for e in f.page(limit=1000)]


def plain(q: str) -> list[int]:
    from django.db.models import Q

    return list(
        AuditEvent.objects.filter(Q(object_repr__icontains=q) | Q(node_name__icontains=q))
        .order_by("-seq")
        .values_list("seq", flat=True)
    )


@pytest.mark.django_db
def test_free_text_finds_what_icontains_finds_near_and_far(monkeypatch):
    monkeypatch.setattr(query, "SEARCH_WINDOW", 5)  # most events are "far": found through the index
    with transaction.atomic():
        for i, name in enumerate(["Web-17 switch", "web-170", 'say "hi"', "100%_done", "x", "wéb-1", "WEB-17"] * 3):
            record("test.search", actor_kind="system", object_repr=name, object_id=str(i))
    for q in ("web-17", "WEB-1", "eb", "x", '"hi"', "%_d", "no-such-node", "switch", "wéb"):
        assert search(q=q) == plain(q), q
    assert search(q="web-17", outcome="denied") == []
    f, _ = AuditFilter.from_data({"q": "web-17"})
    assert [e.seq for e in f.page(below=15, limit=2)] == [s for s in plain("web-17") if s < 15][:2]
    assert [e.seq for e in f.page(above=2, limit=2)] == sorted(s for s in plain("web-17") if s > 2)[:2]


@pytest.mark.django_db
def test_sqlite_search_index_is_derived_and_follows_the_table(tmp_path):
    if connection.vendor != "sqlite":
        pytest.skip("the FTS5 table is SQLite's")
    add_events(3)
    with connection.cursor() as cur:
        cur.execute("SELECT rowid FROM audit_auditevent_search WHERE audit_auditevent_search MATCH '\"thing 1\"'")
        assert [r[0] for r in cur.fetchall()] == [AuditEvent.objects.get(seq=2).pk]
    # Changed or removed behind the triggers' back (an archive, a DBA): the index follows.
    tamper("UPDATE audit_auditevent SET object_repr = 'renamed' WHERE seq = 2")
    tamper("DELETE FROM audit_auditevent WHERE seq = 3")
    assert search(q="thing") == [1] and search(q="renamed") == [2]
    with connection.cursor() as cur:
        cur.execute("INSERT INTO audit_auditevent_search (audit_auditevent_search) VALUES ('integrity-check')")
