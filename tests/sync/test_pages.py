"""The sync status on pages and the buttons, from the side of people with fewer rights; subscription pages."""

from __future__ import annotations

import pytest
from django.test import Client

from deployments.access.models import Grant, Team
from deployments.audit.models import AuditEvent
from deployments.models import Deployment
from deployments.sync import status
from deployments.sync.models import NodeSync, Subscription

pytestmark = pytest.mark.django_db


def client_for(user, csrf=False) -> Client:
    c = Client(enforce_csrf_checks=csrf)
    c.force_login(user)
    return c


def team_with(user, name, role, **scope) -> Team:
    team = Team.objects.create(name=name)
    team.members.add(user)
    Grant.objects.create(team=team, role=role, **scope)
    return team


@pytest.fixture
def drifted(inventory):
    node = inventory["node"]
    state = status.State(
        "drifted", "by hand", inventory["sha"], "/nix/store/x-exp", "/nix/store/x-act", "/nix/store/x-dep"
    )
    status.record_states({node.pk: state})
    return node


def test_the_node_page_shows_status_since_expected_actual_and_the_commit(drifted, alice_client):
    html = alice_client.get(f"/nodes/{drifted.name}/").content.decode()
    for text in (
        "Drifted",
        "/nix/store/x-exp",
        "/nix/store/x-act",
        "/nix/store/x-dep",
        NodeSync.objects.get().commit_sha,
    ):
        assert text in html
    assert 'id="redeploy"' in html


def test_a_viewer_sees_the_status_but_no_button_and_cannot_redeploy_or_refresh(drifted, bob):
    team_with(bob, "viewers", "viewer", scope="node", node=drifted)
    c = client_for(bob)
    html = c.get(f"/nodes/{drifted.name}/").content.decode()
    assert "Drifted" in html and 'id="redeploy"' not in html
    assert c.post(f"/nodes/{drifted.name}/sync/redeploy/").status_code == 403
    assert c.post(f"/nodes/{drifted.name}/sync/refresh/").status_code == 403
    assert not Deployment.objects.exists()
    assert AuditEvent.objects.filter(actor_name="bob", outcome="denied").count() == 2


def test_someone_who_cannot_see_the_node_gets_404(drifted, charlie):
    c = client_for(charlie)
    assert c.post(f"/nodes/{drifted.name}/sync/redeploy/").status_code == 404
    assert c.get(f"/nodes/{drifted.name}/").status_code == 404


def test_a_deployer_redeploys_the_branch_head_in_one_click_with_csrf(drifted, bob, monkeypatch):
    from deployments import lifecycle

    monkeypatch.setattr(lifecycle, "enqueue", lambda pk: None)  # no worker here: the row is what we check
    team_with(bob, "deployers", "deployer", scope="node", node=drifted)
    assert client_for(bob, csrf=True).post(f"/nodes/{drifted.name}/sync/redeploy/").status_code == 403  # no token
    r = client_for(bob).post(f"/nodes/{drifted.name}/sync/redeploy/")
    d = Deployment.objects.get()
    assert r.status_code == 302 and r["Location"] == d.get_absolute_url()
    assert (d.commit_sha, d.action, d.requested_by) == (NodeSync.objects.get().commit_sha, "switch", bob)


def test_an_in_sync_node_has_nothing_to_redeploy(inventory, alice_client):
    node = inventory["node"]
    status.record_states({node.pk: status.State("in_sync", "", inventory["sha"], "/nix/store/a", "/nix/store/a")})
    r = alice_client.post(f"/nodes/{node.name}/sync/redeploy/", follow=True)
    assert "nothing to redeploy" in r.content.decode()
    assert not Deployment.objects.exists()


def test_the_dashboard_shows_and_filters_by_sync_status(drifted, alice_client, django_assert_max_num_queries):
    html = alice_client.get("/").content.decode()
    assert "Drifted" in html
    assert "web1" in alice_client.get("/?sync=drifted").content.decode()
    assert "web1" not in alice_client.get("/?sync=in_sync").content.decode()
    assert alice_client.get("/?sync=bogus").status_code == 400


def test_a_never_checked_node_is_listed_under_unknown(inventory, alice_client):
    assert "web1" in alice_client.get("/?sync=unknown").content.decode()


def test_a_team_admin_manages_their_teams_subscriptions_only(inventory, bob, charlie):
    mine = team_with(bob, "mine", "admin", scope="node", node=inventory["node"])
    theirs = team_with(charlie, "theirs", "viewer", scope="all")
    c = client_for(bob)
    r = c.post(
        "/notifications/new/",
        {"team": mine.pk, "name": "chat", "kind": "slack", "target": "https://hooks.slack.com/services/T1/B2/s3cret",
         "events": ["deployment.failed", "node.drifted"], "enabled": "on"},
    )  # fmt: skip
    assert r.status_code == 302
    sub = Subscription.objects.get()
    page = c.get("/notifications/").content.decode()
    assert "https://hooks.slack.com/services/T…/***" in page and "s3cret" not in page
    assert "s3cret" not in c.get(f"/notifications/{sub.pk}/").content.decode()
    assert AuditEvent.objects.get(action="subscription.changed").details["target"].endswith("/T…/***")
    # A forged team: not among the choices (400), nothing written.
    forged = {
        "team": theirs.pk,
        "name": "spy",
        "kind": "webhook",
        "target": "https://evil.example/x",
        "events": ["node.drifted"],
    }
    assert c.post("/notifications/new/", forged).status_code == 400
    # A viewer team member (not its admin) may not touch another team's subscription.
    other = Subscription.objects.create(
        team=theirs, name="t", kind="email", target_encrypted="x", events=["node.drifted"]
    )
    assert c.post(f"/notifications/{other.pk}/", forged).status_code == 403
    assert c.post(f"/notifications/{other.pk}/delete/").status_code == 403
    assert client_for(charlie).get(f"/notifications/{other.pk}/").status_code == 403
    assert Subscription.objects.count() == 2
    # Editing without a new target keeps the old one.
    r = c.post(
        f"/notifications/{sub.pk}/", {"team": mine.pk, "name": "chat2", "kind": "slack", "events": ["node.drifted"]}
    )
    assert r.status_code == 302
    sub.refresh_from_db()
    assert sub.name == "chat2" and sub.target() == "https://hooks.slack.com/services/T1/B2/s3cret"


def test_someone_in_no_team_cannot_add_a_subscription(db, bob):
    assert client_for(bob).get("/notifications/new/").status_code == 403


def test_a_subscription_form_refuses_a_bad_target(inventory, alice):
    team = Team.objects.create(name="t")
    r = client_for(alice).post(
        "/notifications/new/",
        {"team": team.pk, "name": "x", "kind": "webhook", "target": "file:///etc/passwd", "events": ["node.drifted"]},
    )
    assert r.status_code == 400 and "https://" in r.content.decode()
    assert not Subscription.objects.exists()


def test_a_subscription_form_refuses_a_target_inside_the_panels_network(inventory, alice):
    team = Team.objects.create(name="t")
    r = client_for(alice).post(
        "/notifications/new/",
        {
            "team": team.pk,
            "name": "x",
            "kind": "webhook",
            "target": "http://10.0.0.5:8080/",
            "events": ["node.drifted"],
        },
    )
    assert r.status_code == 400 and "PANEL_NOTIFY_ALLOWED_NETWORKS" in r.content.decode()
    assert not Subscription.objects.exists()
