"""Jump hosts (bastions) in the inventory, seen from the side of a node admin who wants more.

The attack this closes: wendy administers the nodes tagged ``web``. She may not reach db-1, nor use the
credential the panel logs in to a bastion with. If she could route web-1 through such a node, every
deployment of web-1 would make the panel log in there with that credential on her behalf (and forward
connections from it). So choosing a jump host needs DEPLOY on it and the use of its credential, for every
bastion on the way; the refusal is audited; the chain is validated (not itself, no cycles, bounded).
"""

from __future__ import annotations

import io

import pytest
from django.core.exceptions import PermissionDenied
from django.core.management import CommandError, call_command
from django.db.models import ProtectedError

from deployments import inventory, lifecycle, tasks
from deployments.access import gate
from deployments.access.models import CredentialUse
from deployments.audit.models import AuditEvent
from deployments.errors import RequestError
from deployments.models import Credential, Node
from deployments.remote import MAX_JUMP_HOPS
from tests.support.forms import node_form_data
from tests.support.keys import HOST_KEY

GW_SECRET = "the-gateway-password"


def make_node(name: str, world, *, tag: str = "", credential=None, jump_host=None) -> Node:
    node = Node(
        name=name,
        host=f"{name}.example.test",
        flake_attr="devm",
        repository=world.repository,
        credential=credential or Credential.objects.get(name="root-pw"),
        host_key=HOST_KEY,
        host_key_fingerprint="SHA256:test",
        jump_host=jump_host,
    )
    return inventory.save_object(node, tags=[tag] if tag else None)


@pytest.fixture
def gw_credential(world):
    cred = Credential(name="gw-pw", kind=Credential.Kind.PASSWORD)
    cred.set_secret(GW_SECRET)
    cred.save()
    return cred


@pytest.fixture
def gw_web(world, gw_credential):
    """A bastion tagged ``web`` (wendy may deploy on it), logged in to with ``gw-pw``."""
    return make_node("gw-web", world, tag="web", credential=gw_credential)


def allow(user, credential) -> None:
    CredentialUse.objects.create(team=user.teams.get(), credential=credential)


def refusals() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action="jump_host.use", outcome="denied"))


def jump_of(node: Node):
    node.refresh_from_db()
    return node.jump_host_id


# --- the gate -------------------------------------------------------------------


def test_routing_through_a_node_she_may_not_deploy_on_is_refused_and_audited(client, world, wendy):
    node, db = world.nodes["web-1"], world.nodes["db-1"]
    client.force_login(wendy)
    response = client.post("/nodes/web-1/edit/", node_form_data(node, jump_host=db.pk))
    assert response.status_code == 403
    assert jump_of(node) is None
    (event,) = refusals()
    assert event.actor_name == "wendy" and event.node_name == "web-1"
    assert event.details["required"] == gate.JUMP
    assert not AuditEvent.objects.filter(action="node.changed").exists()


def test_routing_through_a_bastion_whose_credential_she_may_not_use_is_refused(client, world, wendy, gw_web):
    assert gate.can(wendy, gate.DEPLOY, gw_web)  # she may deploy there: the credential is what she lacks
    node = world.nodes["web-1"]
    client.force_login(wendy)
    assert client.post("/nodes/web-1/edit/", node_form_data(node, jump_host=gw_web.pk)).status_code == 403
    assert jump_of(node) is None and len(refusals()) == 1
    assert refusals()[0].object_id == str(gw_web.pk)


def test_with_deploy_and_the_credential_she_may_and_the_change_is_audited_before_and_after(
    client, world, wendy, gw_web, gw_credential
):
    allow(wendy, gw_credential)
    node = world.nodes["web-1"]
    client.force_login(wendy)
    response = client.post("/nodes/web-1/edit/", node_form_data(node, jump_host=gw_web.pk))
    assert response.status_code == 302
    assert jump_of(node) == gw_web.pk
    node.refresh_from_db()
    assert node.host_key == HOST_KEY  # the pinned key stays: only that machine is accepted, whatever the way
    event = AuditEvent.objects.filter(action="node.changed", object_id=str(node.pk)).latest("seq")
    assert event.actor_name == "wendy"
    assert event.details["changes"]["jump_path"] == {"before": [], "after": ["gw-web"]}
    assert event.details["changes"]["jump_host_id"] == {"before": None, "after": gw_web.pk}
    assert set(event.details["changes"]) == {"jump_path", "jump_host_id"}  # nothing else changed or was lost


def test_the_whole_way_is_asked_not_only_the_first_bastion(client, world, wendy, gw_web, gw_credential, alice):
    """gw-web itself goes through db-1 (a superuser set that up): wendy may not route through db-1."""
    allow(wendy, gw_credential)
    gw_web.jump_host = world.nodes["db-1"]
    inventory.save_object(gw_web, user=alice)
    client.force_login(wendy)
    node = world.nodes["web-1"]
    assert client.post("/nodes/web-1/edit/", node_form_data(node, jump_host=gw_web.pk)).status_code == 403
    assert jump_of(node) is None
    (event,) = refusals()
    assert event.details["id"] == world.nodes["db-1"].pk  # the auditor learns which; wendy is told "this node"


def test_the_form_offers_only_bastions_she_may_route_through(client, world, wendy, gw_web, gw_credential):
    client.force_login(wendy)
    page = jump_select(client.get("/nodes/web-1/edit/").content.decode())
    assert "gw-web" not in page and ">db-1<" not in page
    allow(wendy, gw_credential)
    page = jump_select(client.get("/nodes/web-1/edit/").content.decode())
    assert "gw-web" in page and ">db-1<" not in page
    assert '<option value="' + str(world.nodes["web-1"].pk) + '">web-1<' not in page  # not itself


def jump_select(page: str) -> str:
    """The jump host field of the node form (the page also offers build hosts: nodes she may deploy)."""
    start = page.index('<select name="jump_host"')
    return page[start : page.index("</select>", start)]


def test_a_forged_id_that_does_not_exist_is_refused_the_same_way(client, world, wendy):
    client.force_login(wendy)
    node = world.nodes["web-1"]
    assert client.post("/nodes/web-1/edit/", node_form_data(node, jump_host=987654)).status_code == 403
    assert jump_of(node) is None and len(refusals()) == 1
    assert refusals()[0].object_id == ""  # nothing said about which ids exist


def test_removing_the_jump_host_needs_no_rights_on_the_bastion(client, world, wendy, alice, gw_web):
    node = world.nodes["web-1"]
    node.jump_host = gw_web
    inventory.save_object(node, user=alice)
    client.force_login(wendy)
    assert client.post("/nodes/web-1/edit/", node_form_data(node, jump_host="")).status_code == 302
    assert jump_of(node) is None
    event = AuditEvent.objects.filter(action="node.changed", object_id=str(node.pk)).latest("seq")
    assert event.details["changes"]["jump_path"] == {"before": ["gw-web"], "after": []}


def test_other_edits_keep_the_jump_host_she_could_not_have_chosen(client, world, wendy, alice, gw_web):
    node = world.nodes["web-1"]
    node.jump_host = gw_web
    inventory.save_object(node, user=alice)
    client.force_login(wendy)
    data = node_form_data(node, flake_attr="web-2-config")
    assert client.post("/nodes/web-1/edit/", data).status_code == 302
    assert jump_of(node) == gw_web.pk and not refusals()


# --- the chain ------------------------------------------------------------------


def test_a_node_cannot_be_its_own_jump_host(client, world, alice):
    node = world.nodes["web-1"]
    client.force_login(alice)
    response = client.post("/nodes/web-1/edit/", node_form_data(node, jump_host=node.pk))
    assert response.status_code == 400
    assert jump_of(node) is None


def test_a_cycle_is_refused(client, world, alice):
    web, db = world.nodes["web-1"], world.nodes["db-1"]
    web.jump_host = db
    inventory.save_object(web, user=alice)
    client.force_login(alice)
    response = client.post("/nodes/db-1/edit/", node_form_data(db, jump_host=web.pk))
    assert response.status_code == 400
    assert "circle" in response.content.decode()
    assert jump_of(db) is None
    db.jump_host = web  # and the state change itself refuses it, whoever calls it
    with pytest.raises(RequestError, match="circle"):
        inventory.save_object(db, user=alice)


def test_a_chain_longer_than_the_limit_is_refused(world, alice):
    previous = None
    for i in range(MAX_JUMP_HOPS + 1):  # the last of these is MAX_JUMP_HOPS bastions away: allowed
        previous = make_node(f"hop-{i}", world, jump_host=previous)
    node = Node(
        name="deep", host="deep.example.test", flake_attr="devm", repository=world.repository,
        credential=previous.credential, jump_host=previous,
    )  # fmt: skip
    with pytest.raises(RequestError, match=f"At most {MAX_JUMP_HOPS} jump hosts"):
        inventory.save_object(node, user=alice)
    assert [n.name for n in previous.jump_path()] == [f"hop-{i}" for i in range(MAX_JUMP_HOPS)]


def test_a_bastion_with_nodes_behind_it_cannot_be_deleted(world, alice, gw_web):
    node = world.nodes["web-1"]
    node.jump_host = gw_web
    inventory.save_object(node, user=alice)
    with pytest.raises(ProtectedError):
        inventory.delete_object(gw_web, user=alice)


# --- what the worker gets, and what a deployment asks -------------------------------


def test_the_worker_target_goes_through_each_bastion_with_its_own_credential(world, alice, gw_web):
    outer = make_node("gw-outer", world)
    gw_web.jump_host = outer
    inventory.save_object(gw_web, user=alice)
    node = world.nodes["web-1"]
    node.jump_host = gw_web
    inventory.save_object(node, user=alice)
    target = tasks.target_for(node)
    assert [h.name for h in target.hops()] == ["gw-outer", "gw-web"]
    assert target.via.password == GW_SECRET and target.via.host == "gw-web.example.test"
    assert target.via.via.password == "correct horse battery staple" and target.via.via.via is None
    assert GW_SECRET not in repr(target)


def test_a_deployment_through_a_bastion_without_a_pinned_key_is_refused(world, alice, gw_web):
    Node.objects.filter(pk=gw_web.pk).update(host_key="", host_key_fingerprint="")
    node = world.nodes["web-1"]
    node.jump_host = gw_web
    inventory.save_object(node, user=alice)
    with pytest.raises(RequestError, match="Jump host gw-web of web-1 has no pinned host key"):
        lifecycle.request_deployment(node, action="switch", revision="", user=alice)


# --- addnode --jump-host -----------------------------------------------------------


def test_addnode_sets_and_clears_the_jump_host(world, gw_web):
    out = io.StringIO()
    call_command(
        "addnode", "app-1", "10.0.0.5", "--attr", "devm", "--repo", "flakes", "--credential", "root-pw",
        "--jump-host", "gw-web", stdout=out,
    )  # fmt: skip
    assert Node.objects.get(name="app-1").jump_host == gw_web
    assert "via gw-web" in out.getvalue()
    call_command(
        "addnode", "app-1", "10.0.0.5", "--attr", "devm", "--repo", "flakes", "--credential", "root-pw",
        "--jump-host", "", stdout=io.StringIO(),
    )  # fmt: skip
    assert Node.objects.get(name="app-1").jump_host is None


def test_addnode_refuses_an_unknown_jump_host_and_one_the_user_may_not_route_through(world, wendy):
    args = ["addnode", "web-1", "web-1.example.test", "--attr", "web-1", "--repo", "flakes", "--credential", "root-pw"]
    with pytest.raises(CommandError, match="no node 'nowhere' to use as jump host") as e:
        call_command(*args, "--jump-host", "nowhere")
    assert e.value.returncode == 2
    with pytest.raises(CommandError, match="no node 'db-1' to use as jump host"):  # unseen: as if not there
        call_command(*args, "--jump-host", "db-1", "--as", "wendy")
    seen_db = world.nodes["db-1"]
    from tests.support.personas import grant

    grant(wendy, "viewer", node=seen_db, team_name="web-team")
    with pytest.raises(CommandError, match="refused: You may not route nodes through db-1") as e:
        call_command(*args, "--jump-host", "db-1", "--as", "wendy")
    assert e.value.returncode == 2 and len(refusals()) == 1
    assert jump_of(world.nodes["web-1"]) is None


def test_the_gate_answers_for_a_stand_in_of_an_id_that_does_not_exist(world, alice):
    assert not gate.can_jump_through(alice, Node(pk=987654, name=""))
    with pytest.raises(PermissionDenied):
        gate.require_jump_through(alice, [Node(pk=987654, name="")], node=world.nodes["web-1"])


# --- the node page -----------------------------------------------------------------


def test_the_node_page_names_the_bastions_the_viewer_sees_and_hides_the_others(client, world, alice, wendy, gw_web):
    outer = world.nodes["db-1"]  # wendy does not see it
    gw_web.jump_host = outer
    inventory.save_object(gw_web, user=alice)
    node = world.nodes["web-1"]
    node.jump_host = gw_web
    inventory.save_object(node, user=alice)
    client.force_login(wendy)
    page = client.get("/nodes/web-1/").content.decode()
    assert "a node you do not see" in page and 'href="/nodes/gw-web/"' in page
    assert "db-1" not in page
    client.force_login(alice)
    page = client.get("/nodes/web-1/").content.decode()
    assert 'href="/nodes/db-1/"' in page and "a node you do not see" not in page


def test_a_rollout_through_a_bastion_without_a_pinned_key_is_refused_naming_it(world, alice, gw_web):
    from deployments import rollouts

    Node.objects.filter(pk=gw_web.pk).update(host_key="", host_key_fingerprint="")
    node = world.nodes["web-1"]
    node.jump_host = gw_web
    inventory.save_object(node, user=alice)
    with pytest.raises(RequestError, match="No pinned host key on jump host gw-web: pin it first"):
        rollouts.request_rollout(rollouts.Options(nodes=["web-1"]), user=alice)


def test_the_django_admin_sets_the_jump_host_through_the_audited_change(client, world, alice, gw_web):
    client.force_login(alice)
    node = world.nodes["web-1"]
    url = f"/admin/deployments/node/{node.pk}/change/"
    assert "gw-web" in client.get(url).content.decode()
    data = {**node_form_data(node, jump_host=gw_web.pk), "_save": "Save"}
    response = client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert jump_of(node) == gw_web.pk
    event = AuditEvent.objects.filter(action="node.changed", object_id=str(node.pk)).latest("seq")
    assert event.details["changes"]["jump_path"] == {"before": [], "after": ["gw-web"]}
    assert client.get("/admin/deployments/node/").status_code == 200
