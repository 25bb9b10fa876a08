"""The log writer persists every line once, in order, with gap-free sequence numbers."""

import hashlib
import threading

import pytest

from deployments import logstream
from deployments.models import Deployment, LogChunk

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def deployment(inventory):
    return Deployment.objects.create(
        node=inventory["node"], action="switch", commit_sha=inventory["sha"], flake_attr="devm", status="running"
    )


def test_every_line_is_stored_once_in_order(deployment):
    writer = logstream.LogWriter(deployment.pk, flush_interval=0.01, max_batch=777)
    for i in range(10_000):
        writer.write("out" if i % 3 else "err", f"line {i}".encode())
    summary = writer.close()
    lines = logstream.lines_after(deployment.pk)
    assert [seq for seq, _, _ in lines] == list(range(10_000))
    assert [text for _, _, text in lines] == [f"line {i}" for i in range(10_000)]
    assert [stream for _, stream, _ in lines][:3] == ["e", "o", "o"]
    assert summary.line_count == 10_000


def test_chunks_tile_the_sequence_without_gaps(deployment):
    writer = logstream.LogWriter(deployment.pk, flush_interval=0.001, max_batch=100)
    for _i in range(2_345):
        writer.write("out", b"x")
    writer.close()
    chunks = list(
        LogChunk.objects.filter(deployment=deployment).order_by("seq_start").values_list("seq_start", "seq_end")
    )
    assert chunks[0][0] == 0 and chunks[-1][1] == 2_345
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))


def test_the_log_hash_matches_the_downloadable_text(deployment):
    writer = logstream.LogWriter(deployment.pk)
    for text in ["héllo", "\x1b[31mred\x1b[0m", "", "tab\tand trailing  "]:
        writer.write("out", text.encode())
    writer.write("sys", "panel note")
    summary = writer.close()
    text = "".join(logstream.iter_log_text(deployment.pk))
    assert hashlib.sha256(text.encode()).hexdigest() == summary.sha256
    assert len(text.encode()) == summary.byte_count
    assert text.splitlines()[0] == "héllo"


def test_invalid_utf8_and_nul_bytes_do_not_corrupt_the_log(deployment):
    writer = logstream.LogWriter(deployment.pk)
    writer.write("out", b"bad \xff\xfe bytes")
    writer.write("out", b"nul\x00here\r")
    writer.write("out", b"after")
    writer.close()
    texts = [t for _, _, t in logstream.lines_after(deployment.pk)]
    assert texts == ["bad \ufffd\ufffd bytes", "nul\ufffdhere", "after"]


def test_resuming_after_a_sequence_number_returns_only_newer_lines(deployment):
    writer = logstream.LogWriter(deployment.pk, max_batch=10, flush_interval=0.001)
    for i in range(95):
        writer.write("out", str(i).encode())
    writer.close()
    assert [s for s, _, _ in logstream.lines_after(deployment.pk, after=41)] == list(range(42, 95))
    assert len(logstream.lines_after(deployment.pk, after=-1, limit=7)) == 7


def test_a_slow_database_holds_the_reader_back_instead_of_buffering(deployment, monkeypatch):
    gate = threading.Event()
    real_persist = logstream.LogWriter._persist

    def slow_persist(self, batch):
        gate.wait(5)
        real_persist(self, batch)

    monkeypatch.setattr(logstream.LogWriter, "_persist", slow_persist)
    writer = logstream.LogWriter(deployment.pk, max_batch=10, max_pending=50, flush_interval=0.001)
    done = threading.Event()

    def produce():
        for _i in range(500):
            writer.write("out", b"y")
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    assert not done.wait(0.3), "the reader should block while 50 lines are pending"
    assert len(writer._pending) <= 50
    gate.set()
    t.join(10)
    assert writer.close().line_count == 500


def test_a_second_writer_continues_the_sequence(deployment):
    w = logstream.LogWriter(deployment.pk)
    w.write("out", b"a")
    w.close()
    w = logstream.LogWriter(deployment.pk, start_seq=logstream.next_seq(deployment.pk))
    w.write("out", b"b")
    w.close()
    assert [(s, t) for s, _, t in logstream.lines_after(deployment.pk)] == [(0, "a"), (1, "b")]


def test_the_pause_between_batches_follows_how_long_storing_takes(deployment):
    writer = logstream.LogWriter(deployment.pk, flush_interval=0.025)
    try:
        writer._paced(0.002)
        assert writer.pause == 0.025, "a quiet database: every flush interval"
        writer._paced(0.06)
        assert writer.pause == pytest.approx(0.12), "a slow commit: wait twice as long, gather more lines"
        writer._paced(5.0)
        assert writer.pause == logstream.MAX_FLUSH_PAUSE
        writer._paced(0.001)
        assert writer.pause == 0.025, "back to the flush interval as soon as commits are quick again"
    finally:
        writer.close()


def test_while_another_writer_holds_the_database_lines_gather_into_fewer_rows(deployment):
    """Group commit while the writer's INSERT waits for a lock: the lines that waited are stored together,
    none lost. SQLite: another connection holds its one write lock; PostgreSQL: the log table's lock."""
    held, release = threading.Event(), threading.Event()

    def hold_the_write_lock():
        from django.db import connection as own
        from django.db import transaction

        with transaction.atomic():  # SQLite: BEGIN IMMEDIATE, the write lock until commit
            if own.vendor == "postgresql":
                with own.cursor() as cursor:  # INSERTs wait for it; reads do not
                    cursor.execute(f"LOCK TABLE {LogChunk._meta.db_table} IN EXCLUSIVE MODE")
            else:
                Deployment.objects.filter(pk=deployment.pk).update(worker="holding the lock")
            held.set()
            release.wait(10)
        own.close()

    writer = logstream.LogWriter(deployment.pk, flush_interval=0.01)
    writer.write("out", "before")
    while LogChunk.objects.filter(deployment=deployment).count() < 1:
        threading.Event().wait(0.01)
    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    assert held.wait(10)
    for i in range(40):  # 0.4 s of lines, a flush interval's worth each
        writer.write("out", f"line {i}")
        threading.Event().wait(0.01)
    release.set()
    holder.join()
    for i in range(40, 60):
        writer.write("out", f"line {i}")
        threading.Event().wait(0.01)
    summary = writer.close()
    stored = logstream.lines_after(deployment.pk)
    assert [text for _, _, text in stored] == ["before", *[f"line {i}" for i in range(60)]]
    assert summary.line_count == 61
    rows = LogChunk.objects.filter(deployment=deployment).count()
    # Flushing every 10 ms, the 20 lines written after the release would take ~20 rows; after a commit
    # that waited 0.4 s, the writer pauses MAX_FLUSH_PAUSE and they gather in one or two.
    assert rows <= 8, f"{rows} rows for 61 lines"
