"""Rollbacks and generations from the side of the people asking: the node page, the JSON API and
``manage.py rollback``: who may, what is refused (and how), what is queued.  Nothing here connects to a
node (tests/integration/test_generations_over_ssh.py does, on the testbed)."""

from __future__ import annotations

import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from deployments.audit.models import AuditEvent
from deployments.models import Deployment, NodeGenerations
from deployments.remote.generations import Generation, Generations
from tests.support.personas import grant
from tests.support.world import COMMIT, IN_SCOPE, OUT_OF_SCOPE

pytestmark = pytest.mark.django_db

HOSTILE = ["1; reboot", "1$(reboot)", "`id`", "1 2", "-1", "0", "1\n", " 3", "1e3", "0x10", "9999999999", "３"]


def client_of(user, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


def keep_read(node, *gens: tuple[int, str], profile: int) -> None:
    """A kept read of ``node``'s generations, as ``read_node_generations`` would store it."""
    from django.utils import timezone

    found = Generations(
        [
            Generation(n, 1_700_000_000 + n, path, default=n == profile, current=n == profile, booted=n == gens[0][0])
            for n, path in gens
        ],
        profile_generation=profile,
        current_system=dict(gens)[profile],
        booted_system=gens[0][1],
    )
    NodeGenerations.objects.create(node=node, data=found.as_dict(), read_at=timezone.now(), read_by_name="test")


def rollbacks_of(node) -> list[Deployment]:
    return list(Deployment.objects.filter(node=node, kind="rollback"))


@pytest.fixture
def deployer(world, bob):
    """bob: deployer of web-1 (tag web), viewer of every node."""
    grant(bob, "deployer", tag="web")
    grant(bob, "viewer", team_name="everyone-viewers")
    return bob


def test_the_node_page_queues_a_rollback_to_a_chosen_generation_with_its_commit(world, alice):
    node = world.nodes[IN_SCOPE]
    made = world.finished[IN_SCOPE]
    Deployment.objects.filter(pk=made.pk).update(generation_after=2, toplevel="/nix/store/b-sys")
    keep_read(node, (1, "/nix/store/a-sys"), (2, "/nix/store/b-sys"), (3, "/nix/store/c-sys"), profile=3)
    response = client_of(alice).post(f"/nodes/{IN_SCOPE}/rollback/", {"generation": "2", "action": "boot"})
    [d] = rollbacks_of(node)
    assert response.status_code == 302 and response["Location"] == d.get_absolute_url()
    assert (d.status, d.action, d.target_generation, d.commit_sha) == ("queued", "boot", 2, made.commit_sha)
    event = AuditEvent.objects.get(action="deployment.requested", object_id=str(d.pk))
    assert event.details["kind"] == "rollback" and event.details["generation"] == 2
    assert event.details["commit"] == COMMIT and event.actor_name == "alice"


def test_the_previous_generation_is_the_default(world, alice):
    client_of(alice).post(f"/nodes/{IN_SCOPE}/rollback/", {"generation": "", "action": "switch"})
    [d] = rollbacks_of(world.nodes[IN_SCOPE])
    assert (d.target_generation, d.action, d.commit_sha) == (None, "switch", "")
    assert AuditEvent.objects.get(action="deployment.requested", object_id=str(d.pk)).details["generation"] == (
        "previous"
    )


def test_the_node_page_lists_the_kept_generations_with_who_made_them(world, alice):
    node = world.nodes[IN_SCOPE]
    made = world.finished[IN_SCOPE]
    Deployment.objects.filter(pk=made.pk).update(generation_after=2, toplevel="/nix/store/b-sys")
    keep_read(node, (1, "/nix/store/a-sys"), (2, "/nix/store/b-sys"), profile=2)
    page = client_of(alice).get(f"/nodes/{IN_SCOPE}/")
    rows = page.context["generations"].rows
    assert [(r.generation.number, r.deployment) for r in rows] == [(2, made), (1, None)]
    html = page.content.decode()
    assert "/nix/store/b-sys" in html and f'href="/deployments/{made.pk}/"' in html
    # The boot default gets no rollback buttons: it is where the node goes already.
    assert 'aria-label="Switch to generation 1"' in html and 'aria-label="Switch to generation 2"' not in html


def test_a_viewer_sees_the_generations_but_no_rollback_control_and_is_refused(world, bob):
    grant(bob, "viewer", tag="web")
    node = world.nodes[IN_SCOPE]
    keep_read(node, (1, "/nix/store/a-sys"), (2, "/nix/store/b-sys"), profile=2)
    client = client_of(bob)
    html = client.get(f"/nodes/{IN_SCOPE}/").content.decode()
    assert "/nix/store/a-sys" in html and 'id="read-generations"' in html
    assert 'id="rollback-form"' not in html and "Switch to generation" not in html
    assert client.post(f"/nodes/{IN_SCOPE}/rollback/", {"generation": "1", "action": "switch"}).status_code == 403
    api = client.post(f"/api/nodes/{IN_SCOPE}/rollback/", json.dumps({"generation": 1}), "application/json")
    assert api.status_code == 403
    assert not rollbacks_of(node)
    denied = AuditEvent.objects.filter(action="deployment.requested", outcome="denied", actor_name="bob")
    assert denied.count() == 2


def test_a_deployer_of_one_node_cannot_roll_back_another_by_a_forged_request(world, deployer):
    client = client_of(deployer)
    other = world.nodes[OUT_OF_SCOPE]
    page = client.post(f"/nodes/{OUT_OF_SCOPE}/rollback/", {"generation": "1", "action": "switch"})
    api = client.post(f"/api/nodes/{OUT_OF_SCOPE}/rollback/", json.dumps({"generation": 1}), "application/json")
    assert (page.status_code, api.status_code) == (403, 403)
    assert not rollbacks_of(other)
    # Without even the view grant the node does not exist for them.
    grant_free = client_of(world.persona("deployer-node"))
    assert grant_free.post(f"/nodes/{OUT_OF_SCOPE}/rollback/", {"action": "switch"}).status_code == 404
    assert grant_free.post(f"/api/nodes/{OUT_OF_SCOPE}/rollback/", "{}", "application/json").status_code == 404
    assert not rollbacks_of(other)
    # Their own node, yes.
    assert client.post(f"/nodes/{IN_SCOPE}/rollback/", {"action": "switch"}).status_code == 302
    assert len(rollbacks_of(world.nodes[IN_SCOPE])) == 1


def test_a_rollback_needs_a_csrf_token(world, alice):
    client = client_of(alice, csrf=True)
    assert client.post(f"/nodes/{IN_SCOPE}/rollback/", {"action": "switch"}).status_code == 403
    assert client.post(f"/api/nodes/{IN_SCOPE}/rollback/", "{}", "application/json").status_code == 403
    assert client.post(f"/nodes/{IN_SCOPE}/generations/").status_code == 403
    assert not rollbacks_of(world.nodes[IN_SCOPE])


@pytest.mark.parametrize("value", HOSTILE)
def test_anything_but_a_generation_number_is_refused_on_the_page(world, alice, value):
    response = client_of(alice).post(f"/nodes/{IN_SCOPE}/rollback/", {"generation": value, "action": "switch"})
    assert response.status_code == 400
    assert any("Rollback refused: generation" in str(m) for m in response.context["messages"])
    assert not rollbacks_of(world.nodes[IN_SCOPE])


@pytest.mark.parametrize("value", [*HOSTILE, True, 0, -3, 1.5, [1], {"n": 1}, 10**12])
def test_anything_but_a_generation_number_is_refused_by_the_api(world, alice, value):
    response = client_of(alice).post(
        f"/api/nodes/{IN_SCOPE}/rollback/", json.dumps({"generation": value}), "application/json"
    )
    assert response.status_code == 400, response.content
    assert "generation" in response.content.decode()
    assert not rollbacks_of(world.nodes[IN_SCOPE])


@pytest.mark.parametrize("action", ["test", "dry-activate", "build", "switch; reboot", ""])
def test_only_switch_and_boot_are_rollback_actions(world, alice, action):
    response = client_of(alice).post(
        f"/api/nodes/{IN_SCOPE}/rollback/", json.dumps({"generation": 1, "action": action}), "application/json"
    )
    assert response.status_code == 400
    assert not rollbacks_of(world.nodes[IN_SCOPE])


def test_the_api_queues_a_rollback_and_answers_409_when_the_node_is_busy(world, alice):
    client = client_of(alice)
    created = client.post(
        f"/api/nodes/{IN_SCOPE}/rollback/", json.dumps({"generation": 3, "action": "switch"}), "application/json"
    )
    assert created.status_code == 201
    body = created.json()["deployment"]
    assert (body["kind"], body["target_generation"], body["status"]) == ("rollback", 3, "queued")
    busy = client.post(f"/api/nodes/{IN_SCOPE}/rollback/", json.dumps({"generation": None}), "application/json")
    assert busy.status_code == 409 and "already has a deployment in progress" in busy.json()["error"]
    assert len(rollbacks_of(world.nodes[IN_SCOPE])) == 1


def test_a_rollback_while_another_deployment_runs_is_refused_as_busy(world, alice):
    world.queue(IN_SCOPE)
    client = client_of(alice)
    response = client.post(f"/nodes/{IN_SCOPE}/rollback/", {"generation": "1", "action": "switch"})
    assert response.status_code == 302
    assert not rollbacks_of(world.nodes[IN_SCOPE])
    messages = [str(m) for m in client.get(response["Location"]).context["messages"]]
    assert any("already has a deployment in progress" in m for m in messages)
    with pytest.raises(SystemExit) as exit_:
        call_command("rollback", IN_SCOPE)
    assert exit_.value.code == 2


def test_the_api_shows_the_kept_read_without_connecting(world, bob):
    grant(bob, "viewer", tag="web")
    node = world.nodes[IN_SCOPE]
    client = client_of(bob)
    assert client.get(f"/api/nodes/{IN_SCOPE}/generations/").json()["generations"] == []
    keep_read(node, (1, "/nix/store/a-sys"), (2, "/nix/store/b-sys"), profile=2)
    body = client.get(f"/api/nodes/{IN_SCOPE}/generations/").json()
    assert [g["number"] for g in body["generations"]] == [2, 1]
    assert body["generations"][0]["default"] and body["generations"][1]["booted"]
    assert body["profile_generation"] == 2 and body["read_by"] == "test" and body["error"] == ""
    assert not AuditEvent.objects.filter(action="node.generations_read").exists()  # nothing was read


def test_a_failed_read_is_kept_audited_and_shown(world, bob):
    grant(bob, "viewer", tag="web")
    client = client_of(bob)
    # The world's hosts do not resolve: the read fails at once, with the reason.
    response = client.post(f"/nodes/{IN_SCOPE}/generations/")
    assert response.status_code == 302 and response["Location"].endswith(f"/nodes/{IN_SCOPE}/#generations")
    read = NodeGenerations.objects.get(node=world.nodes[IN_SCOPE])
    assert "cannot resolve host name" in read.error and read.read_at is None and read.read_by_name == "bob"
    event = AuditEvent.objects.get(action="node.generations_read")
    assert event.outcome == "failure" and event.actor_name == "bob" and "cannot resolve" in event.details["error"]
    page = client.get(f"/nodes/{IN_SCOPE}/").content.decode()
    assert "The last read failed" in page and "cannot resolve host name" in page
    api = client.post(f"/api/nodes/{IN_SCOPE}/generations/", "{}", "application/json")
    assert api.status_code == 502 and "cannot resolve host name" in api.json()["error"]


def test_an_unseen_node_has_no_generations(world, bob):
    client = client_of(bob)
    assert client.post(f"/nodes/{IN_SCOPE}/generations/").status_code == 404
    assert client.get(f"/api/nodes/{IN_SCOPE}/generations/").status_code == 404
    assert not NodeGenerations.objects.exists()


def test_the_rollback_command(world, capsys):
    call_command("rollback", IN_SCOPE, "--generation", "4", "--boot")
    [d] = rollbacks_of(world.nodes[IN_SCOPE])
    assert (d.target_generation, d.action, d.trigger) == (4, "boot", "cli")
    assert f"deployment #{d.pk}: rollback to generation 4 (boot) on {IN_SCOPE}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1;reboot", "$(id)", "0", "-2", "abc"])
def test_the_rollback_command_refuses_anything_but_a_generation_number(world, value):
    with pytest.raises(CommandError) as error:
        call_command("rollback", IN_SCOPE, "--generation", value)
    assert error.value.returncode == 2 and "--generation" in str(error.value)
    assert not rollbacks_of(world.nodes[IN_SCOPE])


def test_the_rollback_command_acts_with_the_permissions_of_its_user(world, bob, capsys):
    grant(bob, "viewer", tag="web")
    with pytest.raises(SystemExit) as exit_:
        call_command("rollback", IN_SCOPE, "--as", "bob")
    assert exit_.value.code == 2 and "refused" in capsys.readouterr().err
    with pytest.raises(CommandError) as unseen:
        call_command("rollback", OUT_OF_SCOPE, "--as", "bob")
    assert unseen.value.returncode == 2
    assert not Deployment.objects.filter(kind="rollback").exists()
