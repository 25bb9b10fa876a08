"""The /api/v1/ routes of what was built beside the first API: sync status, approvals, generations and
rollback, health checks.  Past the gate: what they answer, bad input refused by field, and the attacker's
side (a deployer of one node on another, a viewer approving, a requester approving their own request, a
token whose user lost the grant).  Each reaches the function the pages call."""

from __future__ import annotations

import pytest
from django.urls import reverse

from deployments import repos
from deployments.access.models import Grant
from deployments.audit.models import AuditEvent
from deployments.gitops import changes
from deployments.gitops.models import ApprovalRequest
from deployments.healthchecks import HealthCheck
from deployments.models import Deployment, Node, Tag
from deployments.sync.models import NodeSync
from tests.support import personas
from tests.support.world import IN_SCOPE, OUT_OF_SCOPE

from .conftest import ApiClient, token_for


@pytest.fixture
def admin_api(world):
    return ApiClient(token_for(world.persona("superuser")))


def url(route, **kwargs):
    return reverse(f"api-v1:{route}", kwargs=kwargs)


def person(name: str, role: str, **scope):
    user = personas.get_user_model().objects.create_user(name, password=personas.password(name))
    personas.grant(user, role, **scope)
    return user


# --- sync status -------------------------------------------------------------------------------------


def test_nodes_show_their_sync_status_and_a_node_never_checked_is_unknown(world, admin_api):
    head = repos.resolve(world.repository)
    NodeSync.objects.create(
        node=world.nodes[IN_SCOPE],
        status="drifted",
        reason="hand switch",
        commit_sha=head,
        current_system="/nix/store/x",
    )
    nodes = {n["name"]: n for n in admin_api.get(url("node-list")).json()["results"]}
    assert nodes[IN_SCOPE]["sync"]["status"] == "drifted"
    assert nodes[IN_SCOPE]["sync"]["reason"] == "hand switch" and nodes[IN_SCOPE]["sync"]["commit_sha"] == head
    assert nodes[IN_SCOPE]["sync"]["current_system"] == "/nix/store/x" and nodes[IN_SCOPE]["sync"]["checked_at"]
    assert nodes[OUT_OF_SCOPE]["sync"] == {
        "status": "unknown",
        "since": None,
        "reason": "never checked",
        "commit_sha": "",
        "expected_system": "",
        "current_system": "",
        "deployed_system": "",
        "checked_at": None,
    }
    detail = admin_api.get(url("node-detail", name=IN_SCOPE)).json()
    assert detail["sync"]["status"] == "drifted" and detail["confirm_timeout"] == world.nodes[IN_SCOPE].confirm_timeout


def test_the_sync_filter_is_the_dashboards(world, admin_api):
    NodeSync.objects.create(node=world.nodes[IN_SCOPE], status="behind")
    names = lambda **q: [n["name"] for n in admin_api.get(url("node-list"), **q).json()["results"]]  # noqa: E731
    assert names(sync="behind") == [IN_SCOPE]
    assert names(sync="unknown") == [OUT_OF_SCOPE]  # never checked counts as unknown
    assert names(sync="in_sync") == [] and names(sync="drifted") == []


@pytest.mark.parametrize("value", ["late", "behind;reboot", "$(id)", "BEHIND"])
def test_a_bad_sync_filter_is_400_by_field(admin_api, value):
    response = admin_api.get(url("node-list"), sync=value)
    assert response.status_code == 400 and "sync" in response.json()["fields"]


def test_refresh_records_the_status_through_the_sync_module(world, admin_api):
    response = admin_api.post(url("node-sync-refresh", name=IN_SCOPE))
    assert response.status_code == 200
    # The world's hosts do not resolve: the read fails and says so.
    assert response.json()["status"] == "unknown" and response.json()["reason"]
    assert NodeSync.objects.get(node=world.nodes[IN_SCOPE]).status == "unknown"
    assert admin_api.post(url("node-sync-refresh", name=IN_SCOPE), {"force": True}).status_code == 400


def test_redeploy_switches_to_the_commit_the_status_was_computed_against(world, admin_api):
    head = repos.resolve(world.repository)
    assert admin_api.post(url("node-sync-redeploy", name=IN_SCOPE)).status_code == 409  # never checked
    NodeSync.objects.create(node=world.nodes[IN_SCOPE], status="in_sync", commit_sha=head)
    response = admin_api.post(url("node-sync-redeploy", name=IN_SCOPE))
    assert response.status_code == 409 and "nothing to redeploy" in response.json()["error"]
    NodeSync.objects.filter(node=world.nodes[IN_SCOPE]).update(status="drifted")
    response = admin_api.post(url("node-sync-redeploy", name=IN_SCOPE))
    assert response.status_code == 201, response.json()
    deployment = Deployment.objects.get(pk=response.json()["id"])
    assert (deployment.action, deployment.commit_sha, deployment.trigger) == ("switch", head, "api")
    # A second one while the first is queued: busy.
    assert admin_api.post(url("node-sync-redeploy", name=IN_SCOPE)).status_code == 409


def test_a_deployer_of_one_node_cannot_refresh_or_redeploy_another(world):
    user = world.persona("deployer-node")
    personas.grant(user, "viewer")  # sees every node
    NodeSync.objects.create(node=world.nodes[OUT_OF_SCOPE], status="drifted", commit_sha="a" * 40)
    api = ApiClient(token_for(user))
    assert api.post(url("node-sync-refresh", name=OUT_OF_SCOPE)).status_code == 403
    assert api.post(url("node-sync-redeploy", name=OUT_OF_SCOPE)).status_code == 403
    assert AuditEvent.objects.filter(outcome="denied", node_name=OUT_OF_SCOPE).count() == 2
    assert not Deployment.objects.filter(requested_by=user).exists()


# --- generations and rollback ---------------------------------------------------------------------------


def test_generations_are_the_kept_read_and_a_failed_read_is_502_with_the_reason(world, admin_api):
    kept = admin_api.get(url("node-generations", name=IN_SCOPE)).json()
    assert kept["node"] == IN_SCOPE and kept["read_at"] is None and kept["generations"] == []
    response = admin_api.post(url("node-generations-read", name=IN_SCOPE))
    assert response.status_code == 502
    assert response.json()["error"] and response.json()["tried_at"]
    event = AuditEvent.objects.get(action="node.generations_read")
    assert event.outcome == "failure" and event.node_name == IN_SCOPE
    assert admin_api.post(url("node-generations-read", name=IN_SCOPE), {"now": 1}).status_code == 400


def test_a_rollback_is_a_deployment_of_kind_rollback(world, admin_api):
    response = admin_api.post(url("node-rollback", name=IN_SCOPE), {"generation": 3, "action": "boot"})
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["kind"], body["target_generation"], body["action"], body["status"]) == (
        "rollback",
        3,
        "boot",
        "queued",
    )
    detail = admin_api.get(url("deployment-detail", pk=body["id"])).json()
    assert detail["kind"] == "rollback" and detail["target_generation"] == 3
    response = admin_api.post(url("node-rollback", name=IN_SCOPE), {"generation": None})
    assert response.status_code == 409 and "in progress" in response.json()["error"]


@pytest.mark.parametrize(
    "data, field",
    [
        ({"generation": "1; reboot"}, "generation"),
        ({"generation": "$(reboot)"}, "generation"),
        ({"generation": "3"}, "generation"),  # a number, not a string
        ({"generation": True}, "generation"),
        ({"generation": [1]}, "generation"),
        ({"generation": 0}, "generation"),
        ({"generation": 1, "action": "test"}, "action"),
        ({"generation": 1, "action": "switch;reboot"}, "action"),
        ({"generation": 1, "extra": 1}, "extra"),
    ],
)
def test_a_bad_rollback_is_400_by_field_and_nothing_is_queued(world, admin_api, data, field):
    response = admin_api.post(url("node-rollback", name=IN_SCOPE), data)
    assert response.status_code == 400 and field in response.json()["fields"], response.json()
    assert not Deployment.objects.filter(kind="rollback").exists()


def test_a_deployer_of_one_node_cannot_roll_back_another_it_sees(world):
    user = world.persona("deployer-node")
    personas.grant(user, "viewer")
    api = ApiClient(token_for(user))
    assert api.post(url("node-rollback", name=OUT_OF_SCOPE), {"generation": 1}).status_code == 403
    denied = AuditEvent.objects.get(action="deployment.requested", outcome="denied")
    assert denied.actor_name == user.username and denied.node_name == OUT_OF_SCOPE
    assert api.post(url("node-rollback", name=IN_SCOPE), {"generation": 1}).status_code == 201
    assert list(Deployment.objects.filter(kind="rollback").values_list("node__name", flat=True)) == [IN_SCOPE]


@pytest.mark.parametrize("name", ["web-1;reboot", "$(id)", "web-1%0a", "..", "no-such-node"])
def test_a_node_name_that_is_not_a_node_is_404_on_every_node_route(admin_api, name):
    for route in ("node-sync-refresh", "node-sync-redeploy", "node-generations-read", "node-rollback"):
        assert admin_api.post(url(route, name=name), {}).status_code == 404
    for route in ("node-generations", "node-health"):
        assert admin_api.get(url(route, name=name)).status_code == 404
    assert not Deployment.objects.filter(status__in=Deployment.ACTIVE).exists()


def test_a_token_stops_rolling_back_when_its_users_grant_is_removed(world):
    user = person("rita", "deployer", node=world.nodes[IN_SCOPE])
    api = ApiClient(token_for(user))
    Grant.objects.filter(team__members=user).delete()
    assert api.post(url("node-rollback", name=IN_SCOPE), {"generation": 1}).status_code == 404
    assert not Deployment.objects.filter(kind="rollback").exists()


# --- health checks ------------------------------------------------------------------------------------


def test_a_node_admin_adds_changes_and_deletes_a_check_audited(world):
    user = world.persona("admin-node")
    api = ApiClient(token_for(user))
    data = {"node": IN_SCOPE, "name": "web", "kind": "http", "url": "http://{host}/health", "on_failure": "keep"}
    response = api.post(url("health-check-list"), data)
    assert response.status_code == 201, response.json()
    check = HealthCheck.objects.get(pk=response.json()["id"])
    assert (check.node.name, check.url, check.on_failure, check.created_by) == (IN_SCOPE, data["url"], "keep", user)
    response = api.send("PATCH", url("health-check-detail", pk=check.pk), {"expected_status": 204})
    assert response.status_code == 200 and response.json()["expected_status"] == 204
    health = api.get(url("node-health", name=IN_SCOPE)).json()
    assert health["can_change"] and [c["name"] for c in health["checks"]] == ["web"]
    assert api.send("DELETE", url("health-check-detail", pk=check.pk)).status_code == 204
    assert not HealthCheck.objects.exists()
    actions = list(
        AuditEvent.objects.filter(action__startswith="health_check.").order_by("seq").values_list("action", flat=True)
    )
    assert actions == ["health_check.created", "health_check.changed", "health_check.deleted"]


@pytest.mark.parametrize(
    "data, field",
    [
        ({"name": "web;1", "kind": "tcp", "port": 443}, "name"),
        ({"name": "p", "kind": "tcp", "host": "$(reboot)", "port": 443}, "host"),
        ({"name": "p", "kind": "tcp"}, "port"),
        ({"name": "p", "kind": "tcp", "port": "many"}, "port"),
        ({"name": "p", "kind": "tcp", "port": 70000}, "port"),
        ({"name": "p", "kind": "http", "url": "http://x/`id`"}, "url"),
        ({"name": "p", "kind": "http", "url": "http://u:p@x/"}, "url"),
        ({"name": "p", "kind": "command", "command": "true\nreboot"}, "command"),
        ({"name": "p", "kind": "ping"}, "kind"),
        ({"name": "p", "kind": "tcp", "port": 1, "retries": [1]}, "retries"),
        ({"name": "p", "kind": "tcp", "port": 1, "owner": "me"}, "owner"),
    ],
)
def test_a_bad_check_is_400_by_field_and_nothing_is_saved(world, admin_api, data, field):
    response = admin_api.post(url("health-check-list"), {"node": IN_SCOPE, **data})
    assert response.status_code == 400 and field in response.json()["fields"], response.json()
    assert not HealthCheck.objects.exists()


@pytest.mark.parametrize("owner", [{}, {"node": IN_SCOPE, "tag": "web"}, {"node": "web;1"}, {"tag": 5}])
def test_a_check_names_exactly_one_valid_owner(world, admin_api, owner):
    response = admin_api.post(url("health-check-list"), {**owner, "name": "p", "kind": "tcp", "port": 1})
    assert response.status_code == 400 and response.json()["fields"]


def test_a_second_check_of_the_same_name_is_400(world, admin_api):
    data = {"node": IN_SCOPE, "name": "p", "kind": "tcp", "port": 1}
    assert admin_api.post(url("health-check-list"), data).status_code == 201
    response = admin_api.post(url("health-check-list"), data)
    assert response.status_code == 400 and response.json()["fields"]
    assert HealthCheck.objects.count() == 1


def test_a_deployer_cannot_add_a_check_and_an_admin_of_one_node_not_on_another(world):
    deployer = ApiClient(token_for(world.persona("deployer-all")))
    data = {"name": "p", "kind": "command", "command": "systemctl is-active nginx"}
    assert deployer.post(url("health-check-list"), {"node": IN_SCOPE, **data}).status_code == 403
    admin = world.persona("admin-node")
    personas.grant(admin, "viewer")
    api = ApiClient(token_for(admin))
    assert api.post(url("health-check-list"), {"node": OUT_OF_SCOPE, **data}).status_code == 403
    theirs = HealthCheck.objects.create(node=world.nodes[OUT_OF_SCOPE], name="port", kind="tcp", port=22)
    assert api.send("PATCH", url("health-check-detail", pk=theirs.pk), {"port": 1}).status_code == 403
    assert api.send("DELETE", url("health-check-detail", pk=theirs.pk)).status_code == 403
    assert not HealthCheck.objects.filter(name="p").exists() and HealthCheck.objects.get(pk=theirs.pk).port == 22
    assert AuditEvent.objects.filter(action="health_check.change", outcome="denied").count() == 4


def test_tag_checks_are_for_inventory_managers(world, admin_api):
    data = {"tag": "web", "name": "page", "kind": "http", "url": "http://{host}/"}
    wendy_like = ApiClient(token_for(world.persona("admin-tag")))  # admin of every web node, not an inventory manager
    assert wendy_like.post(url("health-check-list"), data).status_code == 403
    assert admin_api.post(url("health-check-list"), {**data, "tag": "nope"}).status_code == 404
    response = admin_api.post(url("health-check-list"), data)
    assert response.status_code == 201 and response.json()["tag"] == "web" and response.json()["node"] is None
    # Whoever sees a node of the tag sees its checks (as the node page shows them), and not other tags'.
    viewer = ApiClient(token_for(world.persona("viewer-node")))
    assert [c["name"] for c in viewer.get(url("node-health", name=IN_SCOPE)).json()["checks"]] == ["page"]
    HealthCheck.objects.create(tag=Tag.objects.get(name="db-main"), name="db", kind="tcp", port=5432)
    assert [c["name"] for c in viewer.get(url("health-check-list")).json()["results"]] == ["page"]
    assert [c["name"] for c in admin_api.get(url("health-check-list"), tag="db-main").json()["results"]] == ["db"]


def test_the_confirmation_deadline_is_set_by_node_admins_only(world):
    admin = ApiClient(token_for(world.persona("admin-node")))
    response = admin.post(url("node-health-deadline", name=IN_SCOPE), {"confirm_timeout": 90})
    assert response.status_code == 200 and response.json()["confirm_timeout"] == 90
    assert Node.objects.get(name=IN_SCOPE).confirm_timeout == 90
    for bad in ({"confirm_timeout": -1}, {"confirm_timeout": 3601}, {"confirm_timeout": "60;reboot"}, {}):
        response = admin.post(url("node-health-deadline", name=IN_SCOPE), bad)
        assert response.status_code == 400 and "confirm_timeout" in response.json()["fields"]
    deployer = ApiClient(token_for(world.persona("deployer-node")))
    assert deployer.post(url("node-health-deadline", name=IN_SCOPE), {"confirm_timeout": 0}).status_code == 403
    assert Node.objects.get(name=IN_SCOPE).confirm_timeout == 90


# --- approvals ------------------------------------------------------------------------------------------


@pytest.fixture
def protected(world, alice):
    """Tag ``web`` protected; dora and dave deploy web, vic views it."""
    changes.set_protected(Tag.objects.get(name="web"), True, user=alice)
    return (
        world,
        person("dora", "deployer", tag="web"),
        person("dave", "deployer", tag="web"),
        person("vic", "viewer", tag="web"),
    )


def test_a_deploy_of_a_protected_node_is_202_with_the_approval_and_a_second_person_approves(protected):
    world, dora, dave, vic = protected
    response = ApiClient(token_for(dora)).post(url("deployment-list"), {"node": IN_SCOPE})
    assert response.status_code == 202
    held = response.json()["approval"]
    assert held["status"] == "pending" and held["nodes"] == [IN_SCOPE] and held["requested_by_name"] == "dora"
    assert "approval" in response.json()["error"].lower()
    assert not Deployment.objects.filter(status__in=Deployment.ACTIVE).exists()
    # dave sees it among those he may decide; dora does not (her own), vic neither (a viewer).
    decidable = lambda user: [  # noqa: E731
        a["id"] for a in ApiClient(token_for(user)).get(url("approval-list"), decidable="true").json()["results"]
    ]
    assert decidable(dave) == [held["id"]] and decidable(dora) == [] and decidable(vic) == []
    assert ApiClient(token_for(vic)).get(url("approval-detail", pk=held["id"])).json()["id"] == held["id"]
    response = ApiClient(token_for(dave)).post(url("approval-approve", pk=held["id"]), {"comment": "ok: reviewed"})
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["approval"]["status"] == "approved" and body["approval"]["decided_by_name"] == "dave"
    deployment = Deployment.objects.get(pk=body["deployment"]["id"])
    assert deployment.requested_by == dora and deployment.node.name == IN_SCOPE
    # Decided once: a second decision is a conflict.
    assert ApiClient(token_for(dave)).post(url("approval-reject", pk=held["id"])).status_code == 409


def test_a_rollout_with_a_protected_node_is_202(protected):
    world, dora, dave, vic = protected
    response = ApiClient(token_for(dora)).post(url("rollout-list"), {"nodes": [IN_SCOPE]})
    assert response.status_code == 202 and response.json()["approval"]["kind"] == "rollout"


def test_the_requester_and_a_viewer_cannot_approve_and_their_tries_are_audited(protected):
    world, dora, dave, vic = protected
    held = ApiClient(token_for(dora)).post(url("deployment-list"), {"node": IN_SCOPE}).json()["approval"]
    for user in (dora, vic):
        for route in ("approval-approve", "approval-reject"):
            assert ApiClient(token_for(user)).post(url(route, pk=held["id"])).status_code == 403
    assert (
        AuditEvent.objects.filter(action__in=["approval.approved", "approval.rejected"], outcome="denied").count() == 4
    )
    assert ApprovalRequest.objects.get(pk=held["id"]).status == "pending"
    # Someone who sees none of its nodes does not learn it exists.
    stranger = ApiClient(token_for(person("sam", "deployer", tag="db-main")))
    assert stranger.get(url("approval-detail", pk=held["id"])).status_code == 404
    assert stranger.post(url("approval-approve", pk=held["id"])).status_code == 404
    assert stranger.get(url("approval-list")).json()["results"] == []


def test_a_deployer_whose_grant_was_removed_cannot_approve_with_the_old_token(protected):
    world, dora, dave, vic = protected
    held = ApiClient(token_for(dora)).post(url("deployment-list"), {"node": IN_SCOPE}).json()["approval"]
    api = ApiClient(token_for(dave))
    Grant.objects.filter(team__members=dave).delete()
    assert api.post(url("approval-approve", pk=held["id"])).status_code == 404
    assert ApprovalRequest.objects.get(pk=held["id"]).status == "pending"


@pytest.mark.parametrize("comment", ["ok; reboot", "$(id)", "`id`", "a" * 1001, 5, ["ok"]])
def test_a_bad_comment_is_400_and_nothing_is_decided(protected, comment):
    world, dora, dave, vic = protected
    held = ApiClient(token_for(dora)).post(url("deployment-list"), {"node": IN_SCOPE}).json()["approval"]
    response = ApiClient(token_for(dave)).post(url("approval-reject", pk=held["id"]), {"comment": comment})
    assert response.status_code == 400 and "comment" in response.json()["fields"]
    assert ApprovalRequest.objects.get(pk=held["id"]).status == "pending"


def test_reject_keeps_the_comment_and_starts_nothing(protected):
    world, dora, dave, vic = protected
    held = ApiClient(token_for(dora)).post(url("deployment-list"), {"node": IN_SCOPE}).json()["approval"]
    response = ApiClient(token_for(dave)).post(url("approval-reject", pk=held["id"]), {"comment": "not today"})
    assert response.status_code == 200
    assert response.json()["approval"]["status"] == "rejected" and response.json()["approval"]["comment"] == "not today"
    assert response.json()["deployment"] is None
    assert not Deployment.objects.filter(status__in=Deployment.ACTIVE).exists()
    statuses = ApiClient(token_for(dave)).get(url("approval-list"), status="rejected").json()["results"]
    assert [a["id"] for a in statuses] == [held["id"]]


@pytest.mark.parametrize("params", [{"decidable": "yes"}, {"status": "done"}, {"status": "pending;id"}])
def test_a_bad_approval_filter_is_400(world, admin_api, params):
    response = admin_api.get(url("approval-list"), **params)
    assert response.status_code == 400 and set(params) <= set(response.json()["fields"])


# --- notification subscriptions ---------------------------------------------------------------------------

SECRET_HOOK = "https://hooks.example.com/services/T000/B000/secret-token-123"


def test_a_team_admin_subscribes_their_team_and_the_target_is_never_returned(world):
    from deployments.sync.models import Subscription

    wendy = world.persona("admin-tag")
    team = Grant.objects.filter(team__members=wendy).values_list("team__name", flat=True).get()
    api = ApiClient(token_for(wendy))
    data = {"team": team, "name": "chat", "kind": "slack", "target": SECRET_HOOK, "events": ["node.drifted"]}
    response = api.post(url("subscription-list"), data)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert "target" not in body and "secret-token" not in response.content.decode()
    assert body["target_display"] and body["team"] == team and body["events"] == ["node.drifted"]
    sub = Subscription.objects.get(pk=body["id"])
    assert sub.target() == SECRET_HOOK and SECRET_HOOK not in sub.target_encrypted
    listed = api.get(url("subscription-list"))
    assert [s["id"] for s in listed.json()["results"]] == [sub.pk] and "secret-token" not in listed.content.decode()
    event = AuditEvent.objects.get(action="subscription.changed")
    assert "secret-token" not in str(event.details)
    # The same name again: 400; then deleted, audited.
    assert api.post(url("subscription-list"), data).status_code == 400
    assert api.send("DELETE", url("subscription-detail", pk=sub.pk)).status_code == 204
    assert not Subscription.objects.exists()
    assert AuditEvent.objects.filter(action="subscription.changed").count() == 2


@pytest.mark.parametrize(
    "data, field",
    [
        ({"kind": "slack", "target": "javascript:alert(1)"}, "target"),
        ({"kind": "slack", "target": "https://x/a b"}, "target"),
        ({"kind": "email", "target": "ops@example.com; rm -rf /"}, "target"),
        ({"kind": "pager", "target": "ops@example.com"}, "kind"),
        ({"kind": "email", "target": "ops@example.com", "events": ["deployment.started"]}, "events.0"),
        ({"kind": "email", "target": "ops@example.com", "events": []}, "events"),
        ({"kind": "email", "target": "ops@example.com", "events": "node.drifted"}, "events"),
        ({"kind": "email", "target": ["ops@example.com"]}, "target"),
        ({"kind": "email", "target": "ops@example.com", "name": "a\x00b"}, "name"),
        ({"kind": "email", "target": "ops@example.com", "team": "nope"}, "team"),
        ({"kind": "email", "target": "ops@example.com", "secret": 1}, "secret"),
        ({"kind": "webhook", "target": "http://127.0.0.1:6379/"}, "target"),  # the panel's own network
        ({"kind": "slack", "target": "http://169.254.169.254/latest/meta-data/"}, "target"),
        ({"kind": "webhook", "target": "http://example.org:99999/"}, "target"),
    ],
)
def test_a_bad_subscription_is_400_by_field(world, admin_api, data, field):
    from deployments.sync.models import Subscription

    body = {"team": "ops", "name": "chat", "events": ["node.drifted"], **data}
    response = admin_api.post(url("subscription-list"), body)
    assert response.status_code == 400 and field in response.json()["fields"], response.json()
    assert not Subscription.objects.exists()


def test_a_team_admin_cannot_subscribe_or_read_another_team(world):
    from deployments.sync.models import Subscription

    ops = Subscription.objects.create(team=world.ops, name="ops", kind="email", events=["node.drifted"])
    api = ApiClient(token_for(world.persona("admin-node")))
    data = {"team": "ops", "name": "mine", "kind": "email", "target": "me@example.com", "events": ["node.drifted"]}
    response = api.post(url("subscription-list"), data)
    assert response.status_code == 400 and "team" in response.json()["fields"]
    assert api.get(url("subscription-detail", pk=ops.pk)).status_code == 403
    assert api.send("DELETE", url("subscription-detail", pk=ops.pk)).status_code == 403
    assert api.get(url("subscription-list")).json()["results"] == []
    assert Subscription.objects.filter(pk=ops.pk).exists() and Subscription.objects.count() == 1
