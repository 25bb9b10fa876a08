"""Approvals for protected tags, from every side: the requester, a second deployer, a viewer, a deployer
of only some of the nodes; through the functions, the pages, the JSON API and ``manage.py deploy``."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import PermissionDenied
from django.core.management import call_command
from django.test import Client

from deployments import lifecycle, rollouts
from deployments.audit.models import AuditEvent
from deployments.errors import AwaitingApproval, RequestError
from deployments.gitops import approvals, changes, tasks
from deployments.gitops.models import ApprovalRequest
from deployments.models import Deployment, Rollout, Tag
from tests.support import personas
from tests.support.testbed import commit_change


@pytest.fixture
def protected(world, alice):
    """The world with tag ``web`` protected; (world, requester, approver, viewer): deployers and a viewer of web."""
    changes.set_protected(Tag.objects.get(name="web"), True, user=alice)
    people = []
    for name, role in (("dora", "deployer"), ("dave", "deployer"), ("vic", "viewer")):
        user = personas.get_user_model().objects.create_user(name, password=personas.password(name))
        personas.grant(user, role, tag="web")
        people.append(user)
    return world, *people


def held(world, requester, **kwargs) -> ApprovalRequest:
    with pytest.raises(AwaitingApproval) as caught:
        lifecycle.request_deployment(world.nodes["web-1"], action="switch", user=requester, **kwargs)
    return caught.value.approval


def test_a_deploy_to_a_protected_node_is_held_and_nothing_starts(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora)
    assert approval.status == "pending" and approval.kind == "deployment"
    assert approval.requested_by == dora
    assert approval.commits == {"flakes": world_head(world)}
    assert not Deployment.objects.filter(node=world.nodes["web-1"], status__in=Deployment.ACTIVE).exists()
    event = AuditEvent.objects.get(action="approval.requested")
    assert event.actor_name == "dora" and event.details["protected_tags"] == ["web"]


def world_head(world):
    from deployments import repos

    return repos.resolve(world.repository)


def test_an_unprotected_node_deploys_at_once(protected):
    world, dora, dave, vic = protected
    personas.grant(dora, "deployer", node=world.nodes["db-1"])
    deployment = lifecycle.request_deployment(world.nodes["db-1"], action="switch", user=dora)
    assert deployment.status == "queued"
    assert not ApprovalRequest.objects.exists()


def test_the_requester_may_not_approve_and_that_is_audited(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora)
    with pytest.raises(PermissionDenied, match="second person"):
        approvals.approve(approval, user=dora, comment="looks fine")
    approval.refresh_from_db()
    assert approval.status == "pending"
    denied = AuditEvent.objects.get(action="approval.approved")
    assert denied.outcome == "denied" and denied.actor_name == "dora"


def test_the_requester_may_not_reject_either(protected):
    world, dora, dave, vic = protected
    with pytest.raises(PermissionDenied):
        approvals.reject(held(world, dora), user=dora)


def test_a_viewer_may_not_approve(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora)
    with pytest.raises(PermissionDenied):
        approvals.approve(approval, user=vic)
    assert AuditEvent.objects.get(action="approval.approved").outcome == "denied"
    approval.refresh_from_db()
    assert approval.status == "pending"


def test_a_second_deployer_approves_and_it_is_deployed_as_the_requester_at_the_pinned_commit(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora, revision="main")
    deployment = approvals.approve(approval, user=dave, comment="Reviewed the diff, go.")
    assert isinstance(deployment, Deployment)
    assert deployment.requested_by == dora and deployment.status == "queued"
    assert deployment.commit_sha == approval.commits["flakes"]
    approval.refresh_from_db()
    assert approval.status == "approved" and approval.decided_by == dave and approval.deployment == deployment
    event = AuditEvent.objects.get(action="approval.approved")
    assert event.outcome == "success" and event.details["comment"] == "Reviewed the diff, go."
    assert AuditEvent.objects.get(action="deployment.requested", outcome="success").actor_name == "dora"
    with pytest.raises(RequestError, match="already approved"):
        approvals.approve(approval, user=alice_of(world))


def alice_of(world):
    return personas.person("alice")


def test_a_rejection_starts_nothing_and_keeps_the_comment(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora)
    approvals.reject(approval, user=dave, comment="Not during the freeze.")
    approval.refresh_from_db()
    assert approval.status == "rejected" and approval.comment == "Not during the freeze."
    assert AuditEvent.objects.get(action="approval.rejected").details["comment"] == "Not during the freeze."
    with pytest.raises(RequestError, match="already rejected"):
        approvals.approve(approval, user=dave)


@pytest.mark.parametrize("comment", ["ok; reboot", "$(id)", "`x`", "a | b", "a > /etc/passwd", "x & y"])
def test_shell_characters_in_a_comment_are_refused(protected, comment):
    world, dora, dave, vic = protected
    approval = held(world, dora)
    with pytest.raises(RequestError, match="not allowed"):
        approvals.approve(approval, user=dave, comment=comment)
    approval.refresh_from_db()
    assert approval.status == "pending"


def test_a_branch_head_request_expires_when_the_branch_moves(protected, flake_repo):
    world, dora, dave, vic = protected
    approval = held(world, dora)  # no revision: the branch head
    commit_change(flake_repo[0], "devm")
    with pytest.raises(RequestError, match="expired: branch main of flakes moved"):
        approvals.approve(approval, user=dave)
    approval.refresh_from_db()
    assert approval.status == "expired"
    assert AuditEvent.objects.get(action="approval.expired").details["reason"].startswith("branch main")
    assert not Deployment.objects.filter(status="queued").exists()


def test_a_push_expires_the_stale_requests_at_once(protected, flake_repo):
    world, dora, dave, vic = protected
    approval = held(world, dora)
    pinned = held_for_tag(dora)  # a rollout, pinned to a named revision: it does not expire on a move
    head = commit_change(flake_repo[0], "devm")
    changes.watch_of(world.repository)  # the push handler's view of the branch
    tasks.handle_push(world.repository.pk, head)
    approval.refresh_from_db()
    pinned.refresh_from_db()
    assert approval.status == "expired" and pinned.status == "pending"


def held_for_tag(user) -> ApprovalRequest:
    with pytest.raises(AwaitingApproval) as caught:
        rollouts.request_rollout(rollouts.Options(tags=["web"], revision="main"), user=user)
    return caught.value.approval


def test_a_request_older_than_the_limit_expires(protected, settings):
    world, dora, dave, vic = protected
    approval = held(world, dora)
    ApprovalRequest.objects.filter(pk=approval.pk).update(
        created_at=approval.created_at - timedelta(seconds=settings.APPROVAL_MAX_AGE + 1)
    )
    assert tasks.tick()["expired"] == 1
    approval.refresh_from_db()
    assert approval.status == "expired"


def test_a_held_rollout_is_requested_as_the_requester_when_approved(protected):
    world, dora, dave, vic = protected
    approval = held_for_tag(dora)
    assert approval.kind == "rollout" and not Rollout.objects.exists()
    rollout = approvals.approve(approval, user=dave)
    assert isinstance(rollout, Rollout)
    assert rollout.requested_by == dora and rollout.commits == approval.commits
    assert list(rollout.deployments.values_list("node__name", flat=True)) == ["web-1"]


def test_a_deployer_of_only_some_nodes_may_not_approve_a_rollout_over_all(protected, alice):
    world, dora, dave, vic = protected
    with pytest.raises(AwaitingApproval) as caught:
        rollouts.request_rollout(rollouts.Options(tags=["web", "db-main"]), user=alice)
    with pytest.raises(PermissionDenied):
        approvals.approve(caught.value.approval, user=dave)  # deployer of web only


def test_the_requester_who_lost_their_rights_is_not_deployed_for(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora, revision="main")
    from deployments.access.models import Team

    Team.objects.filter(members=dora).delete()
    with pytest.raises(RequestError, match="may no longer deploy"):
        approvals.approve(approval, user=dave)
    approval.refresh_from_db()
    assert approval.status == "pending"


def test_a_busy_node_leaves_the_request_pending(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora, revision="main")
    world.queue("web-1")
    with pytest.raises(RequestError, match="in progress"):
        approvals.approve(approval, user=dave)
    approval.refresh_from_db()
    assert approval.status == "pending"
    assert not AuditEvent.objects.filter(action="approval.approved").exists()


# --- pages, API, command ---------------------------------------------------------


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_deploy_page_says_the_request_awaits_approval(protected):
    world, dora, dave, vic = protected
    response = client_for(dora).post("/nodes/web-1/deploy/", {"action": "switch", "revision": ""}, follow=True)
    approval = ApprovalRequest.objects.get()
    assert response.redirect_chain[-1][0] == approval.get_absolute_url()
    assert b"Awaiting approval" in response.content


def test_the_json_api_answers_202_with_the_approval(protected):
    world, dora, dave, vic = protected
    response = client_for(dora).post("/api/nodes/web-1/deploy/", {"action": "switch"}, content_type="application/json")
    assert response.status_code == 202
    assert response.json()["approval"]["status"] == "pending"
    assert response.json()["approval"]["nodes"] == ["web-1"]


def test_the_approvals_page_and_badge_show_what_a_second_deployer_may_decide(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora)
    page = client_for(dave).get("/gitops/approvals/")
    assert page.context["approvals_to_decide"] == 1
    assert list(page.context["decidable"]) == [approval]
    assert client_for(dora).get("/gitops/approvals/").context["approvals_to_decide"] == 0
    assert client_for(vic).get("/gitops/approvals/").context["approvals_to_decide"] == 0
    assert b"Approve" in client_for(dave).get(approval.get_absolute_url()).content
    assert b"Approve" not in client_for(dora).get(approval.get_absolute_url()).content


def test_approving_on_the_page(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora, revision="main")
    assert client_for(dora).post(f"/gitops/approvals/{approval.pk}/approve/", {"comment": ""}).status_code == 403
    assert client_for(vic).post(f"/gitops/approvals/{approval.pk}/approve/", {"comment": ""}).status_code == 403
    response = client_for(dave).post(f"/gitops/approvals/{approval.pk}/approve/", {"comment": "ok"})
    approval.refresh_from_db()
    assert approval.status == "approved"
    assert response.status_code == 302 and response["Location"] == approval.deployment.get_absolute_url()


def test_the_page_refuses_a_comment_with_shell_characters(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora)
    response = client_for(dave).post(f"/gitops/approvals/{approval.pk}/reject/", {"comment": "no; rm"}, follow=True)
    assert b"not allowed" in response.content
    approval.refresh_from_db()
    assert approval.status == "pending"


def test_who_sees_none_of_its_nodes_gets_404(protected):
    world, dora, dave, vic = protected
    approval = held(world, dora)
    bob = personas.person("bob")
    assert client_for(bob).get(approval.get_absolute_url()).status_code == 404
    assert client_for(bob).post(f"/gitops/approvals/{approval.pk}/approve/").status_code == 404


def test_manage_py_deploy_exits_3_when_held(protected, capsys):
    world, dora, dave, vic = protected
    with pytest.raises(SystemExit) as exit_:
        call_command("deploy", "web-1", "--as", "dora")
    assert exit_.value.code == 3
    assert "Awaiting approval" in capsys.readouterr().err


def test_the_rollout_api_and_page_say_the_request_awaits_approval(protected):
    world, dora, dave, vic = protected
    api = client_for(dora).post("/api/rollouts/", {"tags": ["web"]}, content_type="application/json")
    assert api.status_code == 202 and api.json()["approval"]["kind"] == "rollout"
    page = client_for(dora).post("/rollouts/new/", {"action": "switch", "tags": "web", "parallelism": "10"})
    assert page.status_code == 302 and page["Location"].startswith("/gitops/approvals/")
    assert not Rollout.objects.exists() and ApprovalRequest.objects.count() == 2


def test_a_held_auto_deploy_may_be_approved_by_any_deployer_of_its_nodes(protected, alice):
    from deployments.gitops import policies

    world, dora, dave, vic = protected
    changes.set_policy(world.nodes["web-1"], mode="auto", user=alice)
    policies.act_on_move(world.repository, world_head(world))
    (approval,) = ApprovalRequest.objects.all()
    assert approval.requested_by is None and approval.trigger == "gitops"
    rollout = approvals.approve(approval, user=dora, comment="window agreed")
    assert rollout.trigger == "gitops" and rollout.requested_by is None


def test_a_diff_to_a_protected_node_is_not_held_it_changes_nothing(protected):
    world, dora, dave, vic = protected
    deployment = lifecycle.request_deployment(world.nodes["web-1"], action="switch", user=dora, kind="diff")
    assert deployment.kind == "diff" and deployment.status == "queued"
    assert not ApprovalRequest.objects.exists()


def test_an_activation_of_a_diff_is_held_and_approved_as_that_activation(protected):
    """The approver approves the system the diff built: approval must not turn it into a new evaluation."""
    world, dora, dave, vic = protected
    node = world.nodes["web-1"]
    diff = Deployment.objects.create(
        node=node,
        action="switch",
        kind="diff",
        commit_sha=world_head(world),
        flake_attr=node.flake_attr,
        status="succeeded",
        toplevel="/nix/store/" + "a" * 32 + "-nixos-system-web-1",
        diff={"added": [], "removed": [], "changed": []},
        requested_by=dora,
    )
    with pytest.raises(AwaitingApproval) as caught:
        lifecycle.request_deployment(node, action="switch", user=dora, kind="activate", diff_of=diff)
    approval = caught.value.approval
    assert approval.params["kind"] == "activate" and approval.params["diff_of"] == diff.pk
    assert not Deployment.objects.filter(kind="activate").exists()
    activation = approvals.approve(approval, user=dave, comment="the diff is fine")
    assert activation.kind == "activate" and activation.diff_of == diff and activation.requested_by == dora


# --- going back: a rollback changes the node as a deploy does --------------------------------------


def test_a_rollback_of_a_protected_node_is_held_then_approved_as_exactly_that_rollback(protected):
    """A deployer of a protected node who may not deploy alone may not go back alone either (to any
    generation the node keeps: that changes its system as surely as a deploy)."""
    from deployments import rollbacks

    world, dora, dave, vic = protected
    node = world.nodes["web-1"]
    before = Deployment.objects.count()
    with pytest.raises(AwaitingApproval) as caught:
        rollbacks.request_rollback(node, generation=3, action="boot", user=dora)
    approval = caught.value.approval
    assert approval.status == "pending" and approval.is_rollback and approval.rollback_generation == 3
    assert approval.payload()["rollback_to_generation"] == 3
    assert Deployment.objects.count() == before, "nothing queued before the approval"
    assert AuditEvent.objects.get(action="approval.requested").details["action"] == "boot"
    with pytest.raises(PermissionDenied, match="second person"):
        approvals.approve(approval, user=dora)

    deployment = approvals.approve(approval, user=dave, comment="back to 3, as discussed")
    assert deployment.kind == Deployment.Kind.ROLLBACK and deployment.target_generation == 3
    assert deployment.action == "boot" and deployment.requested_by == dora and deployment.status == "queued"
    requested = AuditEvent.objects.get(action="deployment.requested", outcome="success")
    assert requested.details["approval"] == approval.pk and requested.actor_name == "dora"
    approval.refresh_from_db()
    assert approval.deployment == deployment


def test_a_held_rollback_is_not_expired_when_the_branch_moves(protected, flake_repo):
    from deployments import rollbacks

    world, dora, dave, vic = protected
    with pytest.raises(AwaitingApproval) as caught:
        rollbacks.request_rollback(world.nodes["web-1"], user=dora)
    assert caught.value.approval.rollback_generation is None  # the one before the current
    head = commit_change(flake_repo[0], "devm")
    assert approvals.expire_moved(world.repository, head) == 0
    caught.value.approval.refresh_from_db()
    assert caught.value.approval.status == "pending"


def test_every_way_to_roll_back_a_protected_node_is_held(protected, capsys):
    world, dora, dave, vic = protected
    before = Deployment.objects.count()
    client = client_for(dora)
    page = client.post("/nodes/web-1/rollback/", {"generation": "2", "action": "switch"}, follow=True)
    first = ApprovalRequest.objects.latest("pk")
    assert page.redirect_chain[-1][0] == first.get_absolute_url()
    assert b"Awaiting approval" in page.content and b"back to generation 2" in page.content

    api = client.post("/api/nodes/web-1/rollback/", {"generation": 2}, content_type="application/json")
    assert api.status_code == 202 and api.json()["approval"]["rollback_to_generation"] == 2

    v1 = client.post("/api/v1/nodes/web-1/rollback/", {"generation": None}, content_type="application/json")
    assert v1.status_code == 202, v1.content
    assert v1.json()["approval"]["status"] == "pending"

    with pytest.raises(SystemExit) as exit_:
        call_command("rollback", "web-1", "--as", "dora")
    assert exit_.value.code == 3
    assert "Awaiting approval" in capsys.readouterr().err

    assert ApprovalRequest.objects.count() == 4
    assert all(a.is_rollback for a in ApprovalRequest.objects.all())
    assert Deployment.objects.count() == before, "nothing queued"
