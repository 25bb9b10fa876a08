"""The log writer across a database outage: it retries, never stores a line twice, and says when it lost lines."""

import time

import pytest
from django.db import OperationalError

from deployments import logstream
from deployments.models import Deployment, LogChunk

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def deployment(inventory):
    return Deployment.objects.create(
        node=inventory["node"], action="switch", commit_sha=inventory["sha"], flake_attr="devm", status="running"
    )


class Outage:
    """LogChunk.objects.create failing as an unreachable database does, ``failures`` times in a row.

    ``after_commit``: the row is written and only then the error raised, as when the connection drops
    between COMMIT and its answer.
    """

    def __init__(self, monkeypatch, failures: int, *, after_commit: bool = False) -> None:
        self.left = failures
        self.calls = 0
        real = LogChunk.objects.create

        def create(**kwargs):
            self.calls += 1
            if self.left > 0:
                self.left -= 1
                if after_commit:
                    real(**kwargs)
                raise OperationalError("connection to server at 127.0.0.1 failed: Connection refused")
            return real(**kwargs)

        monkeypatch.setattr(LogChunk.objects, "create", create)


def stored(deployment):
    return [(seq, text) for seq, _, text in logstream.lines_after(deployment.pk)]


def test_an_outage_delays_the_lines_and_loses_none(deployment, monkeypatch):
    outage = Outage(monkeypatch, failures=6)
    writer = logstream.LogWriter(deployment.pk, flush_interval=0.001, max_batch=10)
    for i in range(50):
        writer.write("out", f"line {i}")
    summary = writer.close()
    assert stored(deployment) == [(i, f"line {i}") for i in range(50)]
    assert summary.line_count == 50 and summary.unrecorded_lost_lines == 0
    assert writer.outages >= 1 and outage.calls > 6
    deployment.refresh_from_db()
    assert deployment.log_gaps == []


def test_a_batch_whose_commit_answer_was_lost_is_not_stored_twice(deployment, monkeypatch):
    Outage(monkeypatch, failures=1, after_commit=True)
    writer = logstream.LogWriter(deployment.pk, flush_interval=0.001, max_batch=1000)
    for i in range(20):
        writer.write("out", f"line {i}")
    writer.close()
    assert stored(deployment) == [(i, f"line {i}") for i in range(20)]
    chunks = LogChunk.objects.filter(deployment=deployment).values_list("seq_start", "seq_end")
    assert all(a[1] == b[0] for a, b in zip(list(chunks), list(chunks)[1:], strict=False))


def test_a_chunk_another_writer_stored_at_our_place_is_an_error_not_a_silent_skip(deployment):
    LogChunk.objects.create(deployment=deployment, seq_start=0, seq_end=1, data="oother")
    writer = logstream.LogWriter(deployment.pk, start_seq=0)
    writer.write("out", "mine")
    with pytest.raises(RuntimeError, match="log writer failed"):
        writer.close()


def test_lines_that_cannot_be_stored_in_time_are_marked_as_a_gap_never_silently(deployment, monkeypatch):
    writer = logstream.LogWriter(deployment.pk, flush_interval=0.001, max_batch=1000, give_up_after=0.2)
    writer.write("out", "before")
    # Wait until "before" is stored, then make the database unreachable for longer than the writer waits.
    from tests.support.wait import wait_for

    wait_for(lambda: stored(deployment), timeout=5, what="the first line to be stored")
    Outage(monkeypatch, failures=10_000)
    for i in range(3):
        writer.write("out", f"lost {i}")
    wait_for(lambda: writer._lost == 3, timeout=5, what="the writer to give up")
    monkeypatch.undo()
    writer.write("out", "after")
    summary = writer.close()
    texts = stored(deployment)
    assert [t for _, t in texts][0] == "before" and [t for _, t in texts][-1] == "after"
    assert texts[1][1].startswith("[panel] 3 lines of output were lost here: database unreachable from ")
    assert [seq for seq, _ in texts] == [0, 1, 2], "the sequence stays gap-free"
    deployment.refresh_from_db()
    assert deployment.log_gaps == [{"after_seq": 0, "lines": 3, "reason": deployment.log_gaps[0]["reason"]}]
    assert summary.unrecorded_lost_lines == 0 and summary.line_count == 3


def test_a_heartbeat_that_fails_in_an_outage_does_not_stop_the_log(deployment):
    beats = []

    def heartbeat():
        beats.append(1)
        if len(beats) < 3:
            raise OperationalError("server closed the connection unexpectedly")

    writer = logstream.LogWriter(deployment.pk, flush_interval=0.001, max_batch=1, on_flush=heartbeat)
    for i in range(10):
        writer.write("out", f"line {i}")
    assert writer.close().line_count == 10
    assert len(beats) >= 3


def test_the_page_says_the_log_is_incomplete(deployment, alice_client):
    Deployment.objects.filter(pk=deployment.pk).update(
        log_gaps=[
            {"after_seq": 41, "lines": 7, "reason": "database unreachable from 2026-11-30 10:00:00 to 10:05:00 UTC"}
        ]
    )
    page = alice_client.get(deployment.get_absolute_url()).content.decode()
    assert "Log incomplete" in page and "7 lines lost after line 41" in page


def test_a_status_change_is_retried_across_a_blip_but_not_inside_a_transaction(settings):
    from django.db import transaction

    from deployments.dbretry import retrying

    settings.DB_RETRY_FOR = 5
    calls = []

    @retrying
    def change():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("terminating connection due to administrator command")
        return "done"

    assert change() == "done" and len(calls) == 3
    calls.clear()
    with transaction.atomic(), pytest.raises(OperationalError):
        change()  # the caller's transaction is gone: only the caller can start it again
    assert len(calls) == 1


def test_a_blip_gives_up_after_its_time(settings):
    from deployments.dbretry import retrying

    settings.DB_RETRY_FOR = 0.2

    @retrying
    def never():
        raise OperationalError("connection refused")

    with pytest.raises(OperationalError):
        never()


def test_after_giving_up_later_batches_are_dropped_at_once_and_counted_in_one_gap(deployment, monkeypatch):
    from tests.support.wait import wait_for

    writer = logstream.LogWriter(deployment.pk, flush_interval=0.001, max_batch=10, give_up_after=0.3)
    writer.write("out", "before")
    wait_for(lambda: stored(deployment), timeout=5, what="the first line to be stored")
    Outage(monkeypatch, failures=10**9)
    started = time.monotonic()
    for i in range(95):
        writer.write("out", f"lost {i}")
    wait_for(lambda: writer._lost == 95, timeout=10, what="every held line to be dropped")
    assert time.monotonic() - started < 3, "one give-up period for the whole outage, not one per batch"
    monkeypatch.undo()
    writer.write("out", "after")
    writer.close()
    texts = [t for _, t in stored(deployment)]
    assert texts[0] == "before" and texts[-1] == "after" and texts[1].startswith("[panel] 95 lines of output were lost")
    deployment.refresh_from_db()
    assert [(g["after_seq"], g["lines"]) for g in deployment.log_gaps] == [(0, 95)]
