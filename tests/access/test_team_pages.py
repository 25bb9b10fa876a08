"""Team and grant pages, used as alice (a superuser) would; nobody else may use them."""

import pytest
from django.contrib.auth import get_user_model

from deployments.access.models import Grant, Team
from deployments.audit.models import AuditEvent

pytestmark = pytest.mark.django_db


def last_event(action: str) -> AuditEvent:
    return AuditEvent.objects.filter(action=action).order_by("-seq").first()


def test_alice_creates_a_team_gives_it_bob_and_a_tag_grant_and_bob_can_deploy(alice_client, client, world, users):
    _, bob, _ = users
    response = alice_client.post("/teams/new/", {"name": "web-team", "description": "Runs the web tier"})
    team = Team.objects.get(name="web-team")
    assert response.status_code == 302 and response["Location"] == f"/teams/{team.pk}/"

    assert alice_client.post(f"/teams/{team.pk}/members/", {"username": "bob"}).status_code == 302
    assert (
        alice_client.post(f"/teams/{team.pk}/grants/", {"role": "deployer", "scope": "tag", "tag": "web"}).status_code
        == 302
    )

    page = alice_client.get(f"/teams/{team.pk}/").content.decode()
    assert "bob" in page and "Deployer" in page and "web" in page
    # Each remove button says what it removes, and posts to its own URL.
    grant = team.grants.get()
    assert 'aria-label="Remove bob from web-team"' in page
    assert f'aria-label="Remove grant {grant}"' in page
    assert f'action="/teams/{team.pk}/grants/{grant.pk}/remove/"' in page

    client.force_login(bob)
    response = client.post("/api/nodes/web-1/deploy/", "{}", content_type="application/json")
    assert response.status_code == 201
    assert client.get("/nodes/db-1/").status_code == 404


def test_the_team_list_shows_each_team_with_its_member_and_grant_counts(alice_client, world, users):
    world.ops.members.add(users[1])
    response = alice_client.get("/teams/")
    assert [(t.name, t.member_count, t.grant_count) for t in response.context["teams"]] == [("ops", 2, 1)]
    assert f'href="/teams/{world.ops.pk}/"' in response.content.decode()


def test_every_change_is_audited_with_the_team_before_and_after(alice_client, world, users):
    _, bob, _ = users
    ops = world.ops
    alice_client.post(f"/teams/{ops.pk}/members/", {"username": "bob"})
    event = last_event("team.member_added")
    assert event.actor_name == "alice" and event.object_type == "team" and event.object_id == str(ops.pk)
    assert event.details["before"]["members"] == ["zed"]
    assert event.details["after"]["members"] == ["bob", "zed"]

    alice_client.post(f"/teams/{ops.pk}/grants/", {"role": "admin", "scope": "node", "node": "db-1"})
    event = last_event("team.grant_added")
    assert event.node_name == "db-1"
    assert event.details["grant"] == {
        "id": Grant.objects.get(role="admin").pk,
        "role": "admin",
        "scope": "node",
        "node": "db-1",
        "tag": None,
    }
    assert len(event.details["after"]["grants"]) == len(event.details["before"]["grants"]) + 1

    alice_client.post(f"/teams/{ops.pk}/grants/{world.ops_grant.pk}/remove/")
    event = last_event("team.grant_removed")
    assert {"id": world.ops_grant.pk, "role": "viewer", "scope": "all", "node": None, "tag": None} in event.details[
        "before"
    ]["grants"]
    assert world.ops_grant.pk not in [g["id"] for g in event.details["after"]["grants"]]

    alice_client.post(f"/teams/{ops.pk}/members/{bob.pk}/remove/")
    assert last_event("team.member_removed").details["after"]["members"] == ["zed"]

    alice_client.post(f"/teams/{ops.pk}/edit/", {"name": "operations", "description": ""})
    event = last_event("team.changed")
    assert (event.details["before"]["name"], event.details["after"]["name"]) == ("ops", "operations")

    alice_client.post(f"/teams/{ops.pk}/delete/")
    event = last_event("team.deleted")
    assert event.details["before"]["name"] == "operations" and event.details["after"] == {}
    assert not Team.objects.filter(pk=ops.pk).exists()


@pytest.mark.parametrize(
    "data,error",
    [
        ({"role": "auditor", "scope": "tag", "tag": "web"}, "global"),
        ({"role": "viewer", "scope": "tag", "tag": ""}, "Enter a tag"),
        ({"role": "viewer", "scope": "tag", "tag": "d*b"}, "prefix ending in *"),
        ({"role": "viewer", "scope": "node", "node": "nowhere"}, "No node with this name"),
        ({"role": "viewer", "scope": "all"}, "already has this grant"),
    ],
)
def test_a_wrong_grant_is_shown_back_with_its_error_and_not_saved(alice_client, world, data, error):
    before = Grant.objects.count()
    response = alice_client.post(f"/teams/{world.ops.pk}/grants/", data)
    assert response.status_code == 400
    assert error in response.content.decode()
    assert Grant.objects.count() == before


def test_adding_an_unknown_user_says_so(alice_client, world):
    response = alice_client.post(f"/teams/{world.ops.pk}/members/", {"username": "mallory"})
    assert response.status_code == 400 and "No active user named" in response.content.decode()


def test_bob_may_neither_see_nor_change_teams_and_his_attempts_are_audited(client, world, users):
    _, bob, _ = users
    client.force_login(bob)
    assert client.get("/teams/").status_code == 403
    assert client.get(f"/teams/{world.ops.pk}/").status_code == 403
    assert client.post(f"/teams/{world.ops.pk}/members/", {"username": "bob"}).status_code == 403
    assert not world.ops.members.filter(pk=bob.pk).exists()
    event = last_event("team.member_added")
    assert event.outcome == "denied" and event.actor_name == "bob"


def test_a_staff_user_with_every_model_permission_still_cannot_manage_teams_in_the_admin(client, world):
    from django.contrib.auth.models import Permission

    staff = get_user_model().objects.create_user("dave", password="dave-password-1", is_staff=True)
    staff.user_permissions.set(Permission.objects.filter(content_type__app_label="access"))
    client.force_login(staff)
    # The whole admin is for superusers: a staff user is sent to the admin login, never shown the page.
    response = client.get("/admin/access/team/")
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    response = client.post("/admin/access/team/add/", {"name": "sneaky"})
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    assert not Team.objects.filter(name="sneaky").exists()


def test_alice_edits_a_team_in_the_admin_and_it_is_audited(alice_client, world, users):
    _, bob, _ = users
    data = {
        "name": "ops",
        "description": "",
        "members": [world.zed.pk, bob.pk],
        "grants-TOTAL_FORMS": "1",
        "grants-INITIAL_FORMS": "1",
        "grants-MIN_NUM_FORMS": "0",
        "grants-MAX_NUM_FORMS": "1000",
        "grants-0-id": world.ops_grant.pk,
        "grants-0-team": world.ops.pk,
        "grants-0-role": "deployer",
        "grants-0-scope": "all",
        "grants-0-node": "",
        "grants-0-tag": "",
    }
    response = alice_client.post(f"/admin/access/team/{world.ops.pk}/change/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    event = last_event("team.changed")
    assert event.details["before"]["members"] == ["zed"] and event.details["after"]["members"] == ["bob", "zed"]
    assert event.details["after"]["grants"][0]["role"] == "deployer"
