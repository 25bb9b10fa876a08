"""Credentials and repositories are used only by the teams granted their use, seen from the attacker's side.

The attack this closes: an admin of the ``web`` tag edits web-1 to point at a
machine they control with another team's credential (or keeps the one a
superuser attached and only changes the host), pins that machine's key,
deploys, and receives the password in clear, the sudo password, or another
team's source.
"""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.management import CommandError, call_command

from deployments import inventory, lifecycle
from deployments.access import gate
from deployments.access.models import CredentialUse, Grant, RepositoryUse, Team
from deployments.audit.models import AuditEvent
from deployments.errors import RequestError
from deployments.models import Credential, Deployment, Node, Repository
from tests.support.forms import node_form_data

OTHER_SECRET = "the-ops-teams-root-password"


@pytest.fixture
def others(world):
    """Another team's credential and repository, granted to the team ``ops`` only."""
    credential = Credential(name="ops-root", kind=Credential.Kind.PASSWORD)
    credential.set_secret(OTHER_SECRET)
    credential.save()
    repository = Repository.objects.create(name="ops-flakes", url=world.repository.url, branch="main")
    CredentialUse.objects.create(team=world.ops, credential=credential)
    RepositoryUse.objects.create(team=world.ops, repository=repository)
    return {"credential": credential, "repository": repository}


def allow(user, *objs):
    """Let the team of ``user`` use ``objs``."""
    team = user.teams.get()
    for obj in objs:
        model = CredentialUse if isinstance(obj, Credential) else RepositoryUse
        model.objects.create(team=team, **{obj._meta.model_name: obj})


def state(node: Node) -> tuple:
    node.refresh_from_db()
    return (node.host, node.port, node.ssh_user, node.credential_id, node.repository_id, node.host_key)


def denials(event: str) -> int:
    return AuditEvent.objects.filter(action=event, outcome="denied").count()


# --- the gate ------------------------------------------------------------------


def test_superusers_may_use_every_credential_and_repository(world, others, alice):
    assert set(gate.usable_credentials(alice)) == set(Credential.objects.all())
    assert set(gate.usable_repositories(alice)) == set(Repository.objects.all())
    assert gate.can_use(alice, others["credential"])


def test_a_user_may_use_only_what_one_of_their_teams_was_granted(world, others, wendy):
    assert not gate.usable_credentials(wendy).exists()
    assert not gate.can_use(wendy, others["credential"])
    assert gate.can_use(world.zed, others["credential"]) and gate.can_use(world.zed, others["repository"])
    allow(wendy, world.repository)
    assert list(gate.usable_repositories(wendy)) == [world.repository]


def test_node_grants_give_no_use_of_credentials(world, others):
    """Even an admin of all nodes uses only the credentials granted to their team."""
    user = get_user_model().objects.create_user("ada", password="ada-password-12")
    team = Team.objects.create(name="admins")
    team.members.add(user)
    Grant.objects.create(team=team, role="admin", scope="all")
    assert not gate.usable_credentials(user).exists() and not gate.can_use(user, others["credential"])


def test_inactive_and_anonymous_users_may_use_nothing(world, others):
    from django.contrib.auth.models import AnonymousUser

    world.zed.is_active = False
    assert not gate.can_use(world.zed, others["credential"])
    assert not gate.usable_credentials(AnonymousUser()).exists()


def test_usable_credentials_is_one_query_however_many_teams_grant_them(world, others, django_assert_num_queries):
    for i in range(3):
        team = Team.objects.create(name=f"extra-{i}")
        team.members.add(world.zed)
        CredentialUse.objects.create(team=team, credential=others["credential"])
    with django_assert_num_queries(1):
        assert list(gate.usable_credentials(world.zed)) == [others["credential"]]


# --- the node form, as the tag admin would use it and forge it --------------------


def test_the_node_form_offers_only_what_the_admins_teams_may_use(client, world, others, wendy):
    mine = Credential(name="web-deploy", kind=Credential.Kind.PASSWORD)
    mine.set_secret("web-password")
    mine.save()
    allow(wendy, mine)
    client.force_login(wendy)
    page = client.get("/nodes/web-1/edit/").content.decode()
    assert "web-deploy" in page
    assert "ops-root" not in page and "ops-flakes" not in page
    # The node's current ones stay offered, so its other fields can be edited.
    assert "root-pw" in page and "flakes" in page


@pytest.mark.parametrize("field", ["credential", "repository"])
def test_a_forged_choice_of_another_teams_object_is_403_audited_and_changes_nothing(
    client, world, others, wendy, field
):
    node = world.nodes["web-1"]
    before = state(node)
    client.force_login(wendy)
    response = client.post(
        "/nodes/web-1/edit/", node_form_data(node, host="attacker.example.test", **{field: others[field].pk})
    )
    assert response.status_code == 403
    assert state(node) == before
    event = AuditEvent.objects.get(action=f"{field}.use", outcome="denied")
    assert event.actor_name == "wendy" and event.object_id == str(others[field].pk) and event.node_name == "web-1"
    assert not AuditEvent.objects.filter(action="node.changed").exists()


def test_a_forged_id_that_does_not_exist_is_refused_the_same_way(client, world, wendy):
    node = world.nodes["web-1"]
    before = state(node)
    client.force_login(wendy)
    assert client.post("/nodes/web-1/edit/", node_form_data(node, credential=987654)).status_code == 403
    assert state(node) == before and denials("credential.use") == 1


def test_the_refusal_comes_before_the_input_is_validated(client, world, others, wendy):
    node = world.nodes["web-1"]
    client.force_login(wendy)
    data = node_form_data(node, host="$(reboot)", port="x", credential=others["credential"].pk)
    assert client.post("/nodes/web-1/edit/", data).status_code == 403
    assert denials("credential.use") == 1


@pytest.mark.parametrize(
    "change", [{"host": "attacker.example.test"}, {"port": 2222}, {"ssh_user": "deploy"}], ids=lambda c: next(iter(c))
)
def test_moving_a_node_with_a_credential_the_team_may_not_use_is_refused(client, world, wendy, change):
    """The superuser attached root-pw; the tag admin may not take it to another machine or login."""
    node = world.nodes["web-1"]
    before = state(node)
    client.force_login(wendy)
    assert client.post("/nodes/web-1/edit/", node_form_data(node, **change)).status_code == 403
    assert state(node) == before
    assert denials("credential.use") == 1 and not AuditEvent.objects.filter(action="node.changed").exists()


def test_moving_a_node_needs_the_use_of_its_repository_too(client, world, wendy):
    node = world.nodes["web-1"]
    allow(wendy, node.credential)
    client.force_login(wendy)
    assert client.post("/nodes/web-1/edit/", node_form_data(node, host="elsewhere.example.test")).status_code == 403
    assert denials("repository.use") == 1 and state(node)[0] == "web-1.example.test"


def test_editing_other_fields_keeps_what_a_superuser_attached(client, world, wendy):
    node = world.nodes["web-1"]
    client.force_login(wendy)
    response = client.post("/nodes/web-1/edit/", node_form_data(node, flake_attr="web-1-v2", tag_names="web, prod"))
    assert response.status_code == 302
    node.refresh_from_db()
    assert node.flake_attr == "web-1-v2" and node.host_key, "same machine, same login: the pin stays"


def test_with_use_granted_the_admin_may_move_the_node_but_must_pin_again_before_deploying(client, world, wendy):
    node = world.nodes["web-1"]
    allow(wendy, node.credential, node.repository)
    client.force_login(wendy)
    assert client.post("/nodes/web-1/edit/", node_form_data(node, host="new-web-1.example.test")).status_code == 302
    node.refresh_from_db()
    assert node.host == "new-web-1.example.test"
    assert (node.host_key, node.host_key_fingerprint, node.host_key_pinned_at) == ("", "", None)
    change = AuditEvent.objects.get(action="node.changed")
    assert change.details["changes"]["host_key_fingerprint"]["after"] == ""
    with pytest.raises(RequestError, match="no pinned host key"):
        lifecycle.request_deployment(node, action="switch", user=wendy)
    response = client.post("/nodes/web-1/deploy/", {"action": "switch"}, follow=True)
    assert "no pinned host key" in response.content.decode()
    assert not Deployment.objects.filter(status="queued").exists()
    # Pinning again is the explicit, audited step that lets deploys through.
    inventory.pin_host_key(node, world.nodes["db-1"].host_key, user=wendy)
    assert AuditEvent.objects.filter(action="hostkey.pinned", actor_name="wendy").exists()
    assert lifecycle.request_deployment(node, action="switch", user=wendy).status == "queued"


@pytest.mark.parametrize("field,value", [("host", "192.0.2.99"), ("port", 2200), ("ssh_user", "nixos")])
def test_changing_host_port_or_ssh_user_clears_the_pin(world, alice, field, value):
    node = world.nodes["db-1"]
    setattr(node, field, value)
    inventory.save_object(node, user=alice)
    node.refresh_from_db()
    assert node.host_key == "" and node.host_key_pinned_by is None


def test_a_new_node_needs_the_use_of_its_credential(world, others, wendy):
    node = Node(name="web-2", host="web-2.example.test", flake_attr="web-2")
    node.credential, node.repository = others["credential"], world.repository
    with pytest.raises(PermissionDenied):
        inventory.save_object(node, user=wendy, tags=["web"])
    assert not Node.objects.filter(name="web-2").exists() and denials("credential.use") == 1


def test_the_command_line_acting_as_the_admin_is_refused_too(world, others, wendy):
    before = state(world.nodes["web-1"])
    with pytest.raises(CommandError) as exc:
        call_command(
            "addnode",
            "web-1",
            "attacker.example.test",
            "--attr",
            "web-1",
            "--repo",
            "flakes",
            "--credential",
            "ops-root",
            "--as",
            "wendy",
        )
    assert exc.value.returncode == 2 and "may not use" in str(exc.value)
    assert state(world.nodes["web-1"]) == before and denials("credential.use") == 1


def test_the_django_admin_node_form_offers_the_users_usable_credentials(client, world, others, alice):
    client.force_login(alice)
    page = client.get(f"/admin/deployments/node/{world.nodes['web-1'].pk}/change/").content.decode()
    assert "ops-root" in page and "root-pw" in page  # a superuser may use all


def test_no_response_of_the_attack_carries_the_other_teams_secret(client, world, others, wendy):
    client.force_login(wendy)
    node = world.nodes["web-1"]
    responses = [
        client.get("/nodes/web-1/edit/"),
        client.post("/nodes/web-1/edit/", node_form_data(node, credential=others["credential"].pk)),
        client.get("/nodes/web-1/"),
    ]
    for response in responses:
        assert OTHER_SECRET not in response.content.decode()
    assert not any(OTHER_SECRET in json.dumps(d) for d in AuditEvent.objects.values_list("details", flat=True))
