"""The rollout pages and API: what they show, the JSON they take and give, and who may do what.

The permission matrix (tests/access/test_matrix.py) covers every route for every persona; here, the
rollout-specific cases: a viewer sees only the rows of nodes they see, cancelling needs DEPLOY on
every node, a forbidden node refuses the whole request once.
"""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from deployments import lifecycle, rollouts
from deployments.audit.models import AuditEvent
from deployments.models import Deployment, Rollout
from deployments.rollouts import Options
from tests.support import personas

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def no_queue(monkeypatch):
    handed = []
    monkeypatch.setattr(rollouts, "hand_out", lambda *pks: handed.extend(pks))
    return handed


@pytest.fixture
def nodes(world):
    """The world's web-1 (tag web) and db-1 (tag db-main), free of active deployments."""
    return world.nodes


def post_json(client, url, body, content_type="application/json"):
    return client.generic("POST", url, json.dumps(body) if not isinstance(body, bytes) else body, content_type)


def test_the_api_starts_a_rollout_and_reports_it(alice_client, nodes, no_queue):
    response = post_json(alice_client, reverse("deployments:api-rollouts"), {"tags": ["web", "db-main"], "canary": 1})
    assert response.status_code == 201, response.content
    body = response.json()["rollout"]
    assert body["node_count"] == 2 and body["canary_count"] == 1 and body["status"] == "running"
    assert [row["node"] for row in body["nodes"]] == ["db-1", "web-1"]
    assert len(no_queue) == 1, "only the canary is handed to the worker"
    got = alice_client.get(reverse("deployments:api-rollout", args=[body["id"]])).json()["rollout"]
    assert got["counts"] == {"queued": 2, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    listed = alice_client.get(reverse("deployments:api-rollouts")).json()["rollouts"]
    assert [r["id"] for r in listed] == [body["id"]]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"tags": "web"}, "tags must be a list"),
        ({"tags": [1]}, "list of strings"),
        ({"tags": ["web"], "parallelism": True}, "parallelism must be an integer"),
        ({"tags": ["web"], "parallelism": "10"}, "parallelism must be an integer"),
        ({"tags": ["web"], "timeout": "1"}, "timeout must be an integer or null"),
        ({"tags": ["web"], "node_timeouts": {"web-1": "x"}}, "node_timeouts"),
        ({"tags": ["web"], "colour": "red"}, "unknown field"),
        ({"all": True}, "explicit confirmation"),
        ({"nodes": ["web-1", "nope"]}, "No node named nope"),
        ({"tags": ["web"], "parallelism": 0}, "Parallelism"),
    ],
)
def test_bad_input_is_a_400_that_says_why_and_starts_nothing(alice_client, nodes, body, message):
    response = post_json(alice_client, reverse("deployments:api-rollouts"), body)
    assert response.status_code == 400 and message in response.json()["error"], response.content
    assert not Rollout.objects.exists() and not Deployment.objects.filter(rollout__isnull=False).exists()


def test_a_request_naming_a_forbidden_node_is_refused_whole_and_audited_once(client, world, no_queue):
    deployer = world.persona("deployer-tag")  # deployer of the nodes tagged web
    personas.grant(deployer, "viewer", node=world.nodes["db-1"], team_name="db-viewers")
    client.force_login(deployer)
    before = AuditEvent.objects.filter(outcome="denied").count()
    response = post_json(client, reverse("deployments:api-rollouts"), {"nodes": ["web-1", "db-1"]})
    assert response.status_code == 403 and "db-1" in response.json()["error"]
    assert AuditEvent.objects.filter(outcome="denied").count() == before + 1
    assert not Rollout.objects.exists() and not no_queue


def test_a_viewer_sees_only_their_nodes_rows_and_may_not_cancel(client, world, alice):
    rollout = rollouts.request_rollout(Options(tags=["web", "db-main"]), user=alice)
    viewer = world.persona("viewer-tag")
    client.force_login(viewer)
    page = client.get(rollout.get_absolute_url())
    assert page.status_code == 200
    assert b"web-1" in page.content and b"db-1" not in page.content and b"1 more node" in page.content
    assert b"cancel-button" not in page.content
    data = client.get(reverse("deployments:api-rollout", args=[rollout.pk])).json()["rollout"]
    assert [row["node"] for row in data["nodes"]] == ["web-1"] and sum(data["counts"].values()) == 1
    response = client.post(reverse("deployments:api-rollout-cancel", args=[rollout.pk]))
    assert response.status_code == 403
    assert AuditEvent.objects.filter(action="rollout.cancel", outcome="denied").count() == 1
    assert Rollout.objects.get(pk=rollout.pk).status == "running"


def test_a_rollout_of_nodes_the_user_cannot_see_does_not_exist_for_them(client, world, alice):
    rollout = rollouts.request_rollout(Options(tags=["db-main"]), user=alice)
    client.force_login(world.persona("viewer-tag"))
    assert client.get(rollout.get_absolute_url()).status_code == 404
    assert client.get(reverse("deployments:api-rollout", args=[rollout.pk])).status_code == 404
    assert b"No rollouts yet" in client.get(reverse("deployments:rollout-list")).content


def test_the_page_shows_counts_rows_and_a_failed_nodes_last_lines(alice_client, nodes, alice):
    rollout = rollouts.request_rollout(Options(tags=["web", "db-main"]), user=alice)
    failed = rollout.deployments.get(node__name="db-1")
    lifecycle.claim(failed.pk)
    from deployments import logstream

    writer = logstream.LogWriter(failed.pk, start_seq=0, max_batch=7)  # several chunks: only the last are read
    for i in range(30):
        writer.write("err", f"line {i}")
    summary = writer.close()
    lifecycle.finish(
        failed.pk, "failed", exit_code=4, error_message="exited with code 4", line_count=summary.line_count
    )
    page = alice_client.get(rollout.get_absolute_url())
    text = page.content.decode()
    assert 'data-count="failed">1<' in text and 'data-count="queued">1<' in text
    assert "line 29" in text and "line 10" in text and "line 9<" not in text, "the last 20 lines, inline"
    assert f'href="/deployments/{failed.pk}/"' in text
    assert "rollout.js" in text and "<script>" not in text.replace('<script id="rollout-terminal-statuses"', "")
    tails = alice_client.get(reverse("deployments:api-rollout", args=[rollout.pk]) + f"?tails={failed.pk}").json()
    row = next(r for r in tails["rollout"]["nodes"] if r["node"] == "db-1")
    assert [t for _, _, t in row["tail"]][-1] == "line 29" and len(row["tail"]) == 20


def test_the_web_form_starts_a_rollout_and_cancel_stops_it(alice_client, nodes, no_queue):
    response = alice_client.post(
        reverse("deployments:rollout-add"), {"action": "switch", "tags": "web, db-main", "parallelism": "1"}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    rollout = Rollout.objects.get()
    assert response["Location"] == rollout.get_absolute_url() and len(no_queue) == 1
    response = alice_client.post(reverse("deployments:rollout-cancel", args=[rollout.pk]))
    assert response.status_code == 302
    rollout.refresh_from_db()
    assert rollout.status == "cancelled", "nothing was running: it ends at once"
    list_page = alice_client.get(reverse("deployments:rollout-list"))
    assert f"#{rollout.pk}" in list_page.content.decode()


def test_the_web_form_says_what_is_wrong(alice_client, nodes):
    response = alice_client.post(reverse("deployments:rollout-add"), {"action": "switch", "all_nodes": "on"})
    assert response.status_code == 400 and b"explicit confirmation" in response.content
    response = alice_client.post(reverse("deployments:rollout-add"), {"action": "switch", "tags": "a;b"})
    assert response.status_code == 400
    assert not Rollout.objects.exists()
