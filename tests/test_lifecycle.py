"""Deploy requests: one transaction with their audit event, one active deployment per node."""

import pytest
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, transaction

from deployments import lifecycle
from deployments.audit.models import AuditEvent
from deployments.errors import NodeBusy, RequestError
from deployments.inventory import pin_host_key, save_object
from deployments.models import Deployment
from tests.support.testbed import commit_change

pytestmark = pytest.mark.django_db


def test_a_request_pins_the_branch_head_and_audits_it(inventory, alice, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        d = lifecycle.request_deployment(inventory["node"], action="switch", user=alice)
    assert d.status == "queued" and d.commit_sha == inventory["sha"] and d.requested_by == alice
    event = AuditEvent.objects.get(action="deployment.requested")
    assert event.details["commit"] == inventory["sha"] and event.actor_name == "alice"
    assert len(callbacks) == 1, "the task is queued only after commit"


def test_a_request_resolves_a_tag_or_short_sha_to_the_full_commit(inventory, alice):
    new_sha = commit_change(inventory["repo_path"], "devm")
    d = lifecycle.request_deployment(inventory["node"], action="build", revision=new_sha[:12], user=alice)
    assert d.commit_sha == new_sha


def test_an_unknown_revision_is_refused_with_its_name(inventory, alice):
    with pytest.raises(RequestError, match="no-such-branch"):
        lifecycle.request_deployment(inventory["node"], action="switch", revision="no-such-branch", user=alice)
    assert not Deployment.objects.exists()


@pytest.mark.parametrize("revision", ["main;reboot", "$(id)", "-h", "a b"])
def test_a_revision_with_shell_syntax_is_refused(inventory, alice, revision):
    with pytest.raises(RequestError):
        lifecycle.request_deployment(inventory["node"], action="switch", revision=revision, user=alice)


def test_an_unknown_action_is_refused(inventory, alice):
    with pytest.raises(RequestError, match="Unknown action"):
        lifecycle.request_deployment(inventory["node"], action="rm -rf", user=alice)


def test_a_node_without_a_pinned_host_key_cannot_be_deployed(inventory, alice):
    node = inventory["node"]
    node.host_key = ""
    node.save()
    with pytest.raises(RequestError, match="pinned host key"):
        lifecycle.request_deployment(node, action="switch", user=alice)


def test_a_second_request_to_a_busy_node_is_refused(inventory, alice):
    lifecycle.request_deployment(inventory["node"], action="switch", user=alice)
    with pytest.raises(NodeBusy, match="already has a deployment in progress"):
        lifecycle.request_deployment(inventory["node"], action="boot", user=alice)
    assert Deployment.objects.count() == 1


def test_the_database_itself_allows_one_active_deployment_per_node(inventory):
    node = inventory["node"]
    Deployment.objects.create(node=node, action="switch", commit_sha="a" * 40, flake_attr="devm", status="running")
    with pytest.raises(IntegrityError), transaction.atomic():
        Deployment.objects.create(node=node, action="switch", commit_sha="a" * 40, flake_attr="devm")
    Deployment.objects.create(node=node, action="switch", commit_sha="a" * 40, flake_attr="devm", status="failed")


def test_a_user_without_the_right_is_refused_and_the_refusal_is_audited(inventory, bob):
    with pytest.raises(PermissionDenied):
        lifecycle.request_deployment(inventory["node"], action="switch", user=bob)
    event = AuditEvent.objects.get(action="deployment.requested")
    assert event.outcome == "denied" and event.actor_name == "bob"
    assert not Deployment.objects.exists()


def test_cancelling_a_queued_deployment_finishes_it_at_once(inventory, alice):
    d = lifecycle.request_deployment(inventory["node"], action="switch", user=alice)
    d = lifecycle.cancel_deployment(d, user=alice)
    assert d.status == "cancelled" and d.finished_at is not None
    with pytest.raises(RequestError, match="already finished"):
        lifecycle.cancel_deployment(d, user=alice)


def test_cancelling_a_running_deployment_asks_the_worker(inventory, alice):
    d = Deployment.objects.create(
        node=inventory["node"], action="switch", commit_sha="a" * 40, flake_attr="devm", status="running"
    )
    d = lifecycle.cancel_deployment(d, user=alice)
    assert d.status == "running" and d.cancel_requested


def test_pinning_refuses_a_key_other_than_the_confirmed_one(inventory, alice):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    with pytest.raises(RequestError, match="not the"):
        pin_host_key(inventory["node"], key, user=alice, expected_fingerprint="SHA256:somethingelse")
    node = pin_host_key(inventory["node"], key, user=alice)
    assert node.host_key_fingerprint.startswith("SHA256:") and node.host_key_pinned_by == alice


def test_pinning_refuses_junk(inventory, alice):
    with pytest.raises(RequestError, match="Not an SSH public key"):
        pin_host_key(inventory["node"], "ssh-ed25519 not;base64", user=alice)


def test_changing_a_nodes_address_unpins_its_key(inventory, alice):
    node = inventory["node"]
    node.host = "192.0.2.99"
    save_object(node, user=alice)
    node.refresh_from_db()
    assert node.host_key == ""
    change = AuditEvent.objects.get(action="node.changed")
    assert change.details["changes"]["host"] == {"before": "192.0.2.10", "after": "192.0.2.99"}
