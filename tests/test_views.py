"""Pages and API: login required, CSRF on every change, clear errors for bad input."""

import hashlib
import json

import pytest
from django.test import Client

from deployments import logstream
from deployments.models import Deployment
from tests.support.forms import node_form_data

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("url", ["/", "/nodes/web1/", "/deployments/", "/nodes/web1/hostkey/"])
def test_pages_redirect_anonymous_users_to_login(client, inventory, url):
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_the_api_answers_401_to_anonymous_users(client, inventory):
    assert client.get("/api/nodes/").status_code == 401


def test_the_dashboard_lists_nodes_with_their_last_deployment(alice_client, inventory, alice):
    Deployment.objects.create(
        node=inventory["node"],
        action="switch",
        commit_sha=inventory["sha"],
        flake_attr="devm",
        status="succeeded",
        requested_by_name="alice",
    )
    page = alice_client.get("/").content.decode()
    assert "web1" in page and inventory["sha"][:10] in page


def test_every_response_carries_a_request_id(alice_client, inventory):
    assert len(alice_client.get("/").headers["X-Request-ID"]) == 32


def test_deploying_needs_a_csrf_token(alice, inventory):
    c = Client(enforce_csrf_checks=True)
    c.force_login(alice)
    assert c.post("/nodes/web1/deploy/", {"action": "switch"}).status_code == 403
    assert c.post("/api/nodes/web1/deploy/", "{}", content_type="application/json").status_code == 403
    assert not Deployment.objects.exists()


def test_the_deploy_form_queues_a_deployment_and_shows_it(alice_client, inventory):
    response = alice_client.post("/nodes/web1/deploy/", {"action": "dry-activate", "revision": ""})
    d = Deployment.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/deployments/{d.pk}/"
    assert d.action == "dry-activate" and d.trigger == "web"


def test_the_deploy_form_explains_a_bad_revision(alice_client, inventory):
    response = alice_client.post("/nodes/web1/deploy/", {"action": "switch", "revision": "main;reboot"}, follow=True)
    assert "not allowed" in response.content.decode()
    assert not Deployment.objects.exists()


def test_the_deploy_form_refuses_a_busy_node_clearly(alice_client, inventory):
    alice_client.post("/nodes/web1/deploy/", {"action": "switch"})
    response = alice_client.post("/nodes/web1/deploy/", {"action": "switch"}, follow=True)
    assert "already has a deployment in progress" in response.content.decode()
    assert Deployment.objects.count() == 1


@pytest.mark.parametrize(
    "body,status",
    [
        ("not json", 400),
        ("[1, 2]", 400),
        ('{"action": "explode"}', 400),
        ('{"revision": "$(id)"}', 400),
    ],
)
def test_the_api_rejects_malformed_input_with_a_reason(alice_client, inventory, body, status):
    response = alice_client.post("/api/nodes/web1/deploy/", body, content_type="application/json")
    assert response.status_code == status and "error" in response.json()
    assert not Deployment.objects.exists()


def test_the_api_deploys_and_reports_409_when_busy(alice_client, inventory):
    first = alice_client.post(
        "/api/nodes/web1/deploy/", json.dumps({"action": "test"}), content_type="application/json"
    )
    assert first.status_code == 201 and first.json()["deployment"]["commit_sha"] == inventory["sha"]
    second = alice_client.post("/api/nodes/web1/deploy/", "{}", content_type="application/json")
    assert second.status_code == 409


def test_an_unknown_node_is_404_on_pages_and_api(alice_client, inventory):
    assert alice_client.get("/nodes/nope/").status_code == 404
    assert alice_client.post("/api/nodes/nope/deploy/", "{}", content_type="application/json").status_code == 404


def test_get_is_not_allowed_on_state_changes(alice_client, inventory):
    assert alice_client.get("/nodes/web1/deploy/").status_code == 405


def running_with_log(inventory, lines) -> tuple[Deployment, logstream.LogSummary]:
    """A running deployment on the inventory's node whose stored log is ``lines``, (stream, text) pairs."""
    d = Deployment.objects.create(
        node=inventory["node"], action="switch", commit_sha=inventory["sha"], flake_attr="devm", status="running"
    )
    writer = logstream.LogWriter(d.pk)
    for stream, text in lines:
        writer.write(stream, text)
    return d, writer.close()


@pytest.mark.django_db(transaction=True)
def test_the_full_log_download_matches_the_recorded_hash(alice_client, inventory):
    d, summary = running_with_log(
        inventory, [("err" if i % 2 else "out", f"\x1b[1mline\x1b[0m {i}".encode()) for i in range(1000)]
    )
    body = b"".join(alice_client.get(f"/deployments/{d.pk}/log.txt").streaming_content)
    assert hashlib.sha256(body).hexdigest() == summary.sha256
    assert body.count(b"\n") == 1000


@pytest.mark.django_db(transaction=True)
def test_the_api_log_resumes_after_a_sequence_number(alice_client, inventory):
    d, _ = running_with_log(inventory, [("out", str(i)) for i in range(10)])
    lines = alice_client.get(f"/api/deployments/{d.pk}/log/?after=6").json()["lines"]
    assert [line[0] for line in lines] == [7, 8, 9]
    assert alice_client.get(f"/api/deployments/{d.pk}/log/?after=x").status_code == 400


@pytest.mark.parametrize(
    "field,value",
    [("name", "web;1"), ("host", "$(reboot)"), ("flake_attr", "a b"), ("ssh_user", "root;id"), ("port", "70000")],
)
def test_the_node_form_rejects_hostile_values(alice_client, inventory, field, value):
    node = inventory["node"]
    response = alice_client.post("/nodes/web1/edit/", node_form_data(node, tag_names="web", **{field: value}))
    assert response.status_code == 400, "the form is shown again with its error"
    node.refresh_from_db()
    assert getattr(node, field) != value


def test_the_node_form_saves_tags(alice_client, inventory):
    node = inventory["node"]
    assert alice_client.post("/nodes/web1/edit/", node_form_data(node, tag_names="web, prod")).status_code == 302
    assert sorted(node.tags.values_list("name", flat=True)) == ["prod", "web"]


def test_history_tables_show_outcome_commit_and_trigger(alice_client, inventory):
    d = Deployment.objects.create(
        node=inventory["node"],
        action="boot",
        commit_sha=inventory["sha"],
        flake_attr="devm",
        status="failed",
        exit_code=1,
        requested_revision="main",
        trigger="cli",
        requested_by_name="alice",
    )
    for url in ["/deployments/", "/nodes/web1/"]:
        page = alice_client.get(url).content.decode()
        assert f"#{d.pk}" in page and "exit 1" in page and "via Command line" in page
        assert inventory["sha"][:10] in page
    assert 'class="node-link" href="/nodes/web1/"' in alice_client.get("/deployments/").content.decode()


def test_the_admin_shows_deployments_but_never_adds_changes_or_deletes_them(alice_client, inventory, alice):
    from deployments import lifecycle

    d = lifecycle.request_deployment(inventory["node"], action="switch", user=alice)
    assert alice_client.get("/admin/deployments/deployment/").status_code == 200
    assert alice_client.get("/admin/deployments/deployment/add/").status_code == 403
    assert alice_client.post(f"/admin/deployments/deployment/{d.pk}/delete/", {"post": "yes"}).status_code == 403
    page = alice_client.get(f"/admin/deployments/deployment/{d.pk}/change/").content.decode()
    assert 'name="status"' not in page  # shown, not editable
