"""Sync status against real testbed nodes over SSH, with the expected systems evaluated by real Nix."""

from __future__ import annotations

import pytest

from deployments import lifecycle, tasks
from deployments.audit.models import AuditEvent
from deployments.models import Deployment
from deployments.sync import status
from deployments.sync.models import NodeSync
from tests.support.testbed import commit_change

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def deploy(node) -> Deployment:
    d = lifecycle.request_deployment(node, action="switch", trigger=Deployment.Trigger.CLI)
    tasks.run_deployment(d.pk)
    d.refresh_from_db()
    assert d.status == "succeeded", d.error_message
    return d


def sync_of(node) -> NodeSync:
    status.refresh([node])
    return NodeSync.objects.get(node=node)


def test_a_deployed_node_is_in_sync_then_behind_then_drifted_after_a_manual_switch(add_node, flake_repo):
    node, tb = add_node()
    d = deploy(node)
    s = sync_of(node)
    assert s.status == "in_sync", s.reason
    assert s.current_system == tb.current_system() == d.system_after == s.expected_system
    assert s.commit_sha == d.commit_sha

    new_sha = commit_change(flake_repo[0], "devm")
    s = sync_of(node)
    assert (s.status, s.commit_sha) == ("behind", new_sha)
    assert s.expected_system != s.current_system == d.system_after

    # Someone goes back to generation 1 by hand, on the node's own shell.
    tb.run("/nix/var/nix/profiles/system-1-link/bin/switch-to-configuration test")
    assert tb.current_system() != d.system_after
    s = sync_of(node)
    assert s.status == "drifted"
    assert (s.current_system, s.deployed_system) == (tb.current_system(), d.system_after)
    drifted = AuditEvent.objects.filter(action="node.drifted", node_id=node.pk).get()
    assert drifted.details["expected_system"] == d.system_after
    assert drifted.details["actual_system"] == tb.current_system()
    changes = list(
        AuditEvent.objects.filter(action="node.sync_changed", node_id=node.pk)
        .order_by("seq")
        .values_list("details__before", "details__after")
    )
    assert changes == [(None, "in_sync"), ("in_sync", "behind"), ("behind", "drifted")]

    # The redeploy puts the branch head back: in sync again.
    d2 = deploy(node)
    assert d2.commit_sha == new_sha
    assert sync_of(node).status == "in_sync"


def test_since_is_kept_while_the_status_stays(add_node):
    node, _ = add_node()
    deploy(node)
    first = sync_of(node)
    again = sync_of(node)
    assert again.status == "in_sync"
    assert again.since == first.since
    assert again.checked_at > first.checked_at
    assert AuditEvent.objects.filter(action="node.sync_changed", node_id=node.pk).count() == 1


def test_an_unreachable_node_is_unknown_with_the_reason(add_node, settings):
    settings.SYNC_READ_TIMEOUT = 2.0
    node, tb = add_node()
    deploy(node)
    tb.link_down()
    try:
        s = sync_of(node)
    finally:
        tb.link_up()
    assert s.status == "unknown"
    assert "unreachable" in s.reason or "timed out" in s.reason or "did not answer" in s.reason, s.reason


def test_a_node_without_a_pinned_host_key_is_unknown_and_is_not_contacted(add_node):
    node, tb = add_node(pin=False)
    calls = []
    status.refresh([node], reader=lambda nodes: calls.append(list(nodes)) or {})
    s = NodeSync.objects.get(node=node)
    assert s.status == "unknown"
    assert "no pinned host key" in s.reason
    assert calls == [[]]


def test_a_node_being_deployed_is_not_read(add_node):
    node, _ = add_node()
    lifecycle.request_deployment(node, action="switch", trigger=Deployment.Trigger.CLI)  # queued: holds the node
    result = status.refresh([node])
    assert result == {"nodes": 0, "changed": 0, "skipped_busy": 1}
    assert not NodeSync.objects.filter(node=node).exists()


def test_a_never_deployed_node_running_something_else_is_behind(add_node):
    node, tb = add_node()  # runs the testbed's initial system, not the branch head's
    s = sync_of(node)
    assert s.status == "behind"
    assert s.current_system == tb.current_system()
    assert s.deployed_system == ""


def test_the_refresh_button_reads_the_node_now_and_the_page_shows_it(add_node, alice_client):
    node, tb = add_node()
    deploy(node)
    r = alice_client.post(f"/nodes/{node.name}/sync/refresh/", follow=True)
    html = r.content.decode()
    assert f"{node.name} is in sync." in html
    assert tb.current_system() in html
    event = AuditEvent.objects.get(action="node.sync_changed", node_id=node.pk)
    assert event.actor_name == "alice"
