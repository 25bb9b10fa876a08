"""The audit page, an event's page and the export view: auditors only, keyset pages, filters."""

import json

import pytest
from django.db import transaction

from deployments.audit import views
from deployments.audit.models import AuditEvent
from deployments.audit.writer import record

from .conftest import add_events

pytestmark = pytest.mark.django_db
PAGES = ["/audit/", "/audit/events/1/", "/audit/export.csv", "/audit/export.jsonl"]


@pytest.mark.parametrize("url", PAGES)
def test_anonymous_users_are_sent_to_log_in(client, events, url):
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.parametrize("url", PAGES)
def test_users_without_the_auditor_role_are_refused(client, bob, events, url):
    client.force_login(bob)
    assert client.get(url).status_code == 403


def test_an_auditor_sees_events_newest_first(client, carol, events):
    client.force_login(carol)
    page = client.get("/audit/")
    assert page.status_code == 200
    seqs = [e.seq for e in page.context["events"]]
    assert seqs == sorted(seqs, reverse=True) and seqs[0] >= 8


def test_superusers_may_audit(client, alice, events):
    client.force_login(alice)
    assert client.get("/audit/").status_code == 200


def test_pages_follow_seq_cursors(client, carol, db, monkeypatch):
    monkeypatch.setattr(views, "PAGE_SIZE", 3)
    add_events(7)
    client.force_login(carol)
    top = AuditEvent.objects.get(action="auth.login").seq  # the newest event (carol's account came first)
    first = client.get("/audit/").context
    assert [e.seq for e in first["events"]] == [top, top - 1, top - 2]
    assert first["has_older"] and not first["has_newer"]
    second = client.get(f"/audit/?before={top - 2}").context
    assert [e.seq for e in second["events"]] == [top - 3, top - 4, top - 5] and second["has_newer"]
    back = client.get(f"/audit/?after={top - 3}").context
    assert [e.seq for e in back["events"]] == [top, top - 1, top - 2]


def test_filters_narrow_the_page(client, carol, inventory):
    node = inventory["node"]
    with transaction.atomic():
        record(
            "deployment.requested",
            actor_kind="system",
            node=node,
            object_type="deployment",
            object_id="41",
            object_repr="#41 switch web1",
            outcome="denied",
        )
    client.force_login(carol)
    for query in ("node=web1", "action=deployment.*", "outcome=denied", "q=switch", "actor=carol&action=auth.login"):
        events = client.get(f"/audit/?{query}").context["events"]
        assert events, query
        assert all(e.action in ("deployment.requested", "auth.login") for e in events), query
    assert not client.get("/audit/?q=nothing-like-this").context["events"]


def test_a_time_range_selects_events_between(client, carol, db):
    add_events(3)
    first, last = AuditEvent.objects.get(seq=1), AuditEvent.objects.get(seq=3)
    client.force_login(carol)
    since, until = first.created_at.isoformat(), last.created_at.isoformat()
    events = client.get("/audit/", {"since": since, "until": until}).context["events"]
    assert [e.seq for e in events] == [3, 2, 1] or [e.seq for e in events] == [2, 1]
    assert not client.get("/audit/", {"since": "2999-01-01"}).context["events"]
    # A bare date as "until" includes that whole day.
    day = str(last.created_at.date())
    assert [e.seq for e in client.get("/audit/", {"since": day, "until": day}).context["events"]][-3:] == [3, 2, 1]
    assert client.get("/audit/", {"since": "yesterday"}).context["errors"]


def test_deployment_events_link_to_the_deployment_and_its_log(client, carol, inventory):
    with transaction.atomic():
        record(
            "deployment.finished",
            actor_kind="system",
            node=inventory["node"],
            object_type="deployment",
            object_id="12",
            object_repr="#12",
            details={"log_sha256": "ab" * 32, "commit": "c" * 40},
        )
    client.force_login(carol)
    seq = AuditEvent.objects.get(action="deployment.finished").seq
    page = client.get(f"/audit/events/{seq}/")
    assert page.status_code == 200
    assert b"/deployments/12/log.txt" in page.content and b"ab" * 32 in page.content
    assert b"/nodes/web1/" in page.content


def test_an_unknown_event_is_404(client, carol, events):
    client.force_login(carol)
    assert client.get("/audit/events/999/").status_code == 404


def test_the_export_view_streams_the_filtered_view_and_is_audited(client, carol, events):
    client.force_login(carol)
    response = client.get("/audit/export.jsonl?action=test.event")
    assert response.streaming
    lines = [json.loads(x) for x in b"".join(response.streaming_content).decode().splitlines()]
    assert [x["seq"] for x in lines] == [e.seq for e in events]
    exported = AuditEvent.objects.get(action="audit.exported")
    assert exported.actor_name == "carol" and exported.details["filters"] == {"action": "test.event"}


def test_the_csv_export_has_a_header_and_hashes(client, carol, events):
    client.force_login(carol)
    body = b"".join(client.get("/audit/export.csv").streaming_content).decode()
    header = body.splitlines()[0].split(",")
    assert header[0] == "seq" and header[-2:] == ["prev_hash", "hash"]


def test_every_response_carries_a_request_id(client, carol):
    client.force_login(carol)
    assert len(client.get("/audit/")["X-Request-ID"]) == 32


def test_under_asgi_the_export_streams_batch_by_batch(carol, events, monkeypatch):
    # Under daphne a sync iterator would be read whole before sending; the view hands over an async one.
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    from deployments.audit import export

    monkeypatch.setattr(export, "BATCH", 3)

    async def fetch():
        client = AsyncClient()
        await client.aforce_login(carol)
        response = await client.get("/audit/export.jsonl")
        assert response.is_async
        return [chunk async for chunk in response.streaming_content]

    chunks = async_to_sync(fetch)()
    assert len(chunks) >= 3
    assert [json.loads(x)["seq"] for x in b"".join(chunks).decode().splitlines()][:8] == list(range(1, 9))
