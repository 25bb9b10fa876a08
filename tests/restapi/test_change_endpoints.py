"""The /api/v1/ routes of safe change: a diff asked with ``POST /deployments/`` and its confirmation, where a
node builds, its jump host.  Each reaches the function the pages call (``lifecycle.request_deployment``,
``change.confirm_diff``, ``change.set_build_location``); bad input is refused by field; and the attacker's
side: a deployer of one node confirming another's diff, a viewer confirming, a node admin building on a node
they may not deploy, a token whose user lost the grant."""

from __future__ import annotations

import pytest
from django.urls import reverse
from django.utils import timezone

from deployments import change, inventory
from deployments.access.models import Grant
from deployments.audit.models import AuditEvent
from deployments.gitops import changes
from deployments.gitops.models import ApprovalRequest
from deployments.models import BuildLocation, Deployment, Tag
from deployments.remote.closure import parse_diff
from tests.support import personas
from tests.support.world import IN_SCOPE, OUT_OF_SCOPE
from tests.test_change import DIFF_OUTPUT, NEW

from .conftest import ApiClient, token_for

pytestmark = pytest.mark.django_db


def url(route, **kwargs):
    return reverse(f"api-v1:{route}", kwargs=kwargs)


@pytest.fixture
def resolvable(monkeypatch):
    """The world's commit is not in its repository: resolving a revision gives it back as it is."""
    from deployments import repos

    monkeypatch.setattr(repos, "resolve", lambda repository, revision: revision or "0" * 40)


@pytest.fixture
def admin_api(world):
    return ApiClient(token_for(world.persona("superuser")))


def finished_diff(world, node_name: str = IN_SCOPE, **fields) -> Deployment:
    values = dict(
        node=world.nodes[node_name],
        kind=Deployment.Kind.DIFF,
        action="switch",
        commit_sha=world.finished[node_name].commit_sha,
        flake_attr=node_name,
        status=Deployment.Status.SUCCEEDED,
        toplevel=NEW,
        built_on="panel",
        diff=parse_diff(DIFF_OUTPUT, NEW),
        finished_at=timezone.now(),
    )
    values.update(fields)
    return Deployment.objects.create(**values)


def deployer_of(world, node_name: str, name: str = "dora"):
    """A deployer of ``node_name`` who sees every node."""
    user = personas.get_user_model().objects.create_user(name, password=personas.password(name))
    personas.grant(user, "viewer")
    personas.grant(user, "deployer", node=world.nodes[node_name], team_name=f"deploy-{name}")
    return user


# --- the difference first ------------------------------------------------------------------------------


def test_a_diff_is_asked_like_the_deploy_page_asks_it(world, admin_api):
    response = admin_api.post(url("deployment-list"), {"node": IN_SCOPE, "action": "switch", "diff": True})
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["kind"] == "diff" and body["diff"] is None and body["diff_of"] is None and body["built_on"] == ""
    deployment = Deployment.objects.get(pk=body["id"])
    assert (deployment.kind, deployment.action, deployment.trigger) == ("diff", "switch", "api")
    requested = AuditEvent.objects.filter(action="deployment.requested", object_id=str(deployment.pk)).get()
    assert requested.details["kind"] == "diff"
    # Without "diff" (or false): a rebuild, as before.
    Deployment.objects.filter(pk=deployment.pk).update(status=Deployment.Status.CANCELLED)
    plain = admin_api.post(url("deployment-list"), {"node": IN_SCOPE, "diff": False})
    assert plain.status_code == 201 and plain.json()["kind"] == "rebuild"


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, [], {"a": 1}])
def test_diff_must_be_a_json_boolean(world, admin_api, value):
    response = admin_api.post(url("deployment-list"), {"node": IN_SCOPE, "diff": value})
    assert response.status_code == 400 and "diff" in response.json()["fields"], response.json()
    assert not Deployment.objects.filter(kind="diff").exists()


def test_a_diff_of_a_build_is_refused_with_the_reason(world, admin_api):
    response = admin_api.post(url("deployment-list"), {"node": IN_SCOPE, "action": "build", "diff": True})
    assert response.status_code == 400 and "not before build" in response.json()["error"]
    assert not Deployment.objects.filter(kind="diff").exists()


def test_the_detail_shows_the_stored_diff_and_where_it_was_built(world, admin_api):
    diff = finished_diff(world)
    body = admin_api.get(url("deployment-detail", pk=diff.pk)).json()
    assert body["kind"] == "diff" and body["built_on"] == "panel" and body["diff_of"] is None
    assert body["diff"] == diff.diff and body["diff"]["to"] == NEW
    assert body["diff"]["packages"]["added"][0]["name"] == "curl" and body["diff"]["reboot"] == ["kernel"]


# --- its confirmation --------------------------------------------------------------------------------


def test_a_deployer_confirms_a_diff_once(world, resolvable):
    diff = finished_diff(world)
    api = ApiClient(token_for(deployer_of(world, IN_SCOPE)))
    response = api.post(url("deployment-confirm", pk=diff.pk))
    assert response.status_code == 201, response.json()
    activation = Deployment.objects.get(diff_of=diff)
    assert response.json()["id"] == activation.pk and response.json()["diff_of"] == diff.pk
    assert (activation.kind, activation.action, activation.commit_sha, activation.trigger) == (
        "activate",
        "switch",
        diff.commit_sha,
        "api",
    )
    requested = AuditEvent.objects.get(action="deployment.requested", object_id=str(activation.pk))
    assert requested.details["diff_of"] == diff.pk and requested.actor_name == "dora"
    assert api.get(url("deployment-detail", pk=activation.pk)).json()["diff_of"] == diff.pk
    again = api.post(url("deployment-confirm", pk=diff.pk))
    assert again.status_code == 409 and "confirmed already" in again.json()["error"]
    assert Deployment.objects.filter(diff_of=diff).count() == 1


def test_what_is_not_a_succeeded_fresh_diff_is_409_with_the_reason(world, admin_api, resolvable):
    cases = {
        "not a difference": world.finished[IN_SCOPE],
        "did not build": finished_diff(world, status=Deployment.Status.FAILED, toplevel=""),
        "older than": finished_diff(world, finished_at=timezone.now() - change.DIFF_KEEP * 2),
    }
    for reason, deployment in cases.items():
        response = admin_api.post(url("deployment-confirm", pk=deployment.pk))
        assert response.status_code == 409 and reason in response.json()["error"], response.json()
    assert not Deployment.objects.filter(kind="activate").exists()


def test_a_confirmation_of_a_protected_node_is_held_for_approval(world, resolvable):
    alice = world.persona("superuser")
    changes.set_protected(Tag.objects.get(name="web"), True, user=alice)
    diff = finished_diff(world)
    response = ApiClient(token_for(deployer_of(world, IN_SCOPE))).post(url("deployment-confirm", pk=diff.pk))
    assert response.status_code == 202, response.json()
    approval = ApprovalRequest.objects.get(pk=response.json()["approval"]["id"])
    assert response.json()["error"] and approval.status == "pending" and approval.kind == "deployment"
    assert not Deployment.objects.filter(diff_of=diff).exists()  # nothing starts before the approval


@pytest.mark.parametrize("body", [{"force": True}, {"action": "boot"}])
def test_confirm_takes_no_input(world, admin_api, resolvable, body):
    diff = finished_diff(world)
    response = admin_api.post(url("deployment-confirm", pk=diff.pk), body)
    assert response.status_code == 400 and list(body)[0] in response.json()["fields"]
    assert not Deployment.objects.filter(diff_of=diff).exists()


@pytest.mark.parametrize("pk", ["1;id", "$(id)", "9" * 19])
def test_a_malformed_id_is_not_found(world, admin_api, pk):
    response = admin_api.post(f"/api/v1/deployments/{pk}/confirm/")
    assert response.status_code == 404, response.content


def test_a_deployer_of_one_node_cannot_confirm_a_diff_of_another(world, resolvable):
    """dora deploys web-1 and sees db-1: db-1's diff is seen (its page) but not hers to confirm."""
    theirs = finished_diff(world, OUT_OF_SCOPE)
    api = ApiClient(token_for(deployer_of(world, IN_SCOPE)))
    assert api.get(url("deployment-detail", pk=theirs.pk)).status_code == 200
    response = api.post(url("deployment-confirm", pk=theirs.pk))
    assert response.status_code == 403
    refused = AuditEvent.objects.get(outcome="denied", action="deployment.requested")
    assert refused.actor_name == "dora" and refused.node_name == OUT_OF_SCOPE
    assert not Deployment.objects.filter(diff_of=theirs).exists()


def test_a_node_deployer_without_sight_of_the_other_node_gets_404(world, resolvable):
    theirs = finished_diff(world, OUT_OF_SCOPE)
    user = world.persona("deployer-node")  # web-1 only
    response = ApiClient(token_for(user)).post(url("deployment-confirm", pk=theirs.pk))
    assert response.status_code == 404
    assert not Deployment.objects.filter(diff_of=theirs).exists()


def test_a_viewer_may_not_confirm(world, resolvable):
    diff = finished_diff(world)
    api = ApiClient(token_for(world.persona("viewer-all")))
    assert api.get(url("deployment-detail", pk=diff.pk)).json()["diff"] == diff.diff
    assert api.post(url("deployment-confirm", pk=diff.pk)).status_code == 403
    assert AuditEvent.objects.filter(outcome="denied", action="deployment.requested").count() == 1
    assert not Deployment.objects.filter(diff_of=diff).exists()


def test_a_token_whose_user_lost_the_grant_confirms_nothing(world, resolvable):
    user = deployer_of(world, IN_SCOPE)
    api = ApiClient(token_for(user))
    diff = finished_diff(world)
    Grant.objects.filter(team__name="deploy-dora").delete()  # still sees web-1 (viewer): 403, audited
    assert api.post(url("deployment-confirm", pk=diff.pk)).status_code == 403
    Grant.objects.filter(team__members=user).delete()  # sees nothing: 404
    assert api.post(url("deployment-confirm", pk=diff.pk)).status_code == 404
    assert not Deployment.objects.filter(diff_of=diff).exists()


# --- where a node builds ------------------------------------------------------------------------------


def node_admin(world, name: str = "ada"):
    """An admin of web-1 who sees db-1 (but may not deploy it)."""
    user = personas.get_user_model().objects.create_user(name, password=personas.password(name))
    personas.grant(user, "admin", node=world.nodes[IN_SCOPE])
    personas.grant(user, "viewer", node=world.nodes[OUT_OF_SCOPE], team_name=f"see-{name}")
    return user


def test_the_node_detail_says_where_it_builds_and_why(world, admin_api):
    detail = lambda: admin_api.get(url("node-detail", name=IN_SCOPE)).json()  # noqa: E731
    assert detail()["build_location"] == {
        "location": "target",
        "source": "default",
        "build_host": None,
        "node_setting": "",
    }
    assert detail()["build_host"] is None and detail()["jump_host"] is None
    change.set_build_location(Tag.objects.get(name="web"), BuildLocation.HOST, world.nodes[OUT_OF_SCOPE])
    assert detail()["build_location"] == {
        "location": "host",
        "source": "tag web",
        "build_host": OUT_OF_SCOPE,
        "node_setting": "",
    }
    assert detail()["build_host"] is None  # the node's own setting names none
    # The list stays as it was (one query for the page): the detail carries these.
    listed = admin_api.get(url("node-list")).json()["results"][0]
    assert "build_location" not in listed and "jump_host" not in listed


def test_a_node_admin_sets_where_it_builds_through_the_pages_function(world):
    ada = node_admin(world)
    personas.grant(ada, "deployer", node=world.nodes[OUT_OF_SCOPE], team_name="deploy-ada")
    api = ApiClient(token_for(ada))
    response = api.post(url("node-build-location", name=IN_SCOPE), {"location": "host", "build_host": OUT_OF_SCOPE})
    assert response.status_code == 200, response.json()
    assert response.json()["build_location"]["location"] == "host" and response.json()["build_host"] == OUT_OF_SCOPE
    web = world.nodes[IN_SCOPE]
    web.refresh_from_db()
    assert (web.build_location, web.build_host.name) == ("host", OUT_OF_SCOPE)
    event = AuditEvent.objects.filter(action="build_location.changed", outcome="success").get()
    assert event.actor_name == "ada" and event.details["after"] == {"location": "host", "build_host": OUT_OF_SCOPE}
    # Back to the tags' default.
    response = api.post(url("node-build-location", name=IN_SCOPE), {"location": ""})
    assert response.status_code == 200 and response.json()["build_location"]["source"] == "default"


def test_a_node_admin_may_not_build_on_a_node_they_may_not_deploy(world):
    ada = node_admin(world)  # sees db-1, may not deploy it
    api = ApiClient(token_for(ada))
    response = api.post(url("node-build-location", name=IN_SCOPE), {"location": "host", "build_host": OUT_OF_SCOPE})
    assert response.status_code == 403 and "deploy permission" in response.json()["error"]
    refused = AuditEvent.objects.get(action="build_location.changed", outcome="denied")
    assert refused.actor_name == "ada" and refused.details["required"] == "deploy"
    web = world.nodes[IN_SCOPE]
    web.refresh_from_db()
    assert web.build_location == "" and web.build_host is None


@pytest.mark.parametrize("build_host", [OUT_OF_SCOPE, "no-such-node"])
def test_an_unseen_or_unknown_build_host_is_the_same_403(world, build_host):
    user = world.persona("admin-node")  # web-1 only: db-1 is unseen
    api = ApiClient(token_for(user))
    response = api.post(url("node-build-location", name=IN_SCOPE), {"location": "host", "build_host": build_host})
    assert response.status_code == 403
    assert response.json()["error"] == (
        "You may not build on that node: choosing a build host needs the deploy permission on it."
    )
    assert AuditEvent.objects.filter(action="build_location.changed", outcome="denied").count() == 1
    world.nodes[IN_SCOPE].refresh_from_db()
    assert world.nodes[IN_SCOPE].build_location == ""


def test_an_unknown_build_host_is_400_for_whoever_sees_every_node(world, admin_api):
    response = admin_api.post(url("node-build-location", name=IN_SCOPE), {"location": "host", "build_host": "ghost"})
    assert response.status_code == 400 and response.json()["fields"]["build_host"] == ["no node has this name"]


def test_a_deployer_or_viewer_may_not_change_where_a_node_builds(world):
    for persona in ("deployer-node", "viewer-all"):
        api = ApiClient(token_for(world.persona(persona)))
        assert api.post(url("node-build-location", name=IN_SCOPE), {"location": "panel"}).status_code == 403
    assert AuditEvent.objects.filter(action="build_location.changed", outcome="denied").count() == 2
    world.nodes[IN_SCOPE].refresh_from_db()
    assert world.nodes[IN_SCOPE].build_location == ""


def test_a_token_whose_user_lost_the_admin_grant_changes_nothing(world):
    ada = node_admin(world)
    api = ApiClient(token_for(ada))
    assert api.post(url("node-build-location", name=IN_SCOPE), {"location": "panel"}).status_code == 200
    Grant.objects.filter(team__name="team-ada").delete()
    assert api.post(url("node-build-location", name=IN_SCOPE), {"location": "target"}).status_code == 404
    world.nodes[IN_SCOPE].refresh_from_db()
    assert world.nodes[IN_SCOPE].build_location == "panel"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"location": "moon"}, "location"),
        ({"location": "host;reboot"}, "location"),
        ({"location": 1}, "location"),
        ({}, "location"),
        ({"location": "host", "build_host": "db-1; rm -rf /"}, "build_host"),
        ({"location": "host", "build_host": "$(id)"}, "build_host"),
        ({"location": "host", "build_host": 7}, "build_host"),
        ({"location": "host", "build_host": ["db-1"]}, "build_host"),
        ({"location": "host"}, "build_host"),  # a build host is needed
        ({"location": "panel", "build_host": OUT_OF_SCOPE}, "build_host"),  # only with host
        ({"location": "host", "build_host": IN_SCOPE}, "build_host"),  # not itself
        ({"location": "panel", "hosts": []}, "hosts"),
    ],
)
def test_bad_build_locations_are_400_by_field(world, admin_api, body, field):
    response = admin_api.post(url("node-build-location", name=IN_SCOPE), body)
    assert response.status_code == 400, response.json()
    assert field in response.json()["fields"], response.json()
    world.nodes[IN_SCOPE].refresh_from_db()
    assert world.nodes[IN_SCOPE].build_location == ""
    assert not AuditEvent.objects.filter(action="build_location.changed", outcome="success").exists()


def test_a_build_host_without_a_pinned_key_is_refused(world, admin_api):
    db = world.nodes[OUT_OF_SCOPE]
    db.host_key = ""
    db.save(update_fields=["host_key"])
    response = admin_api.post(url("node-build-location", name=IN_SCOPE), {"location": "host", "build_host": db.name})
    assert response.status_code == 400 and "pinned host key" in response.json()["fields"]["build_host"][0]


# --- the jump host -------------------------------------------------------------------------------------


def test_the_jump_host_is_named_only_to_whoever_may_see_it(world, admin_api):
    web = world.nodes[IN_SCOPE]
    web.jump_host = world.nodes[OUT_OF_SCOPE]
    inventory.save_object(web, tags=["web"])
    assert admin_api.get(url("node-detail", name=IN_SCOPE)).json()["jump_host"] == OUT_OF_SCOPE
    sees_both = ApiClient(token_for(node_admin(world)))
    assert sees_both.get(url("node-detail", name=IN_SCOPE)).json()["jump_host"] == OUT_OF_SCOPE
    web_only = ApiClient(token_for(world.persona("deployer-node")))
    detail = web_only.get(url("node-detail", name=IN_SCOPE))
    assert detail.status_code == 200 and detail.json()["jump_host"] is None
    assert OUT_OF_SCOPE not in detail.content.decode()
