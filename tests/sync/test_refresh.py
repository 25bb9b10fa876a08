"""The refresh's rules without SSH: classification, nodes that change while they are read, audit events."""

from __future__ import annotations

import pytest

from deployments.audit.models import AuditEvent
from deployments.models import Deployment
from deployments.sync import status
from deployments.sync.models import NodeSync

pytestmark = pytest.mark.django_db

HEAD = "/nix/store/aaa-head"


@pytest.mark.parametrize(
    ("reading", "deployed", "expected", "error", "pinned", "want"),
    [
        (status.Reading(current_system=HEAD), HEAD, HEAD, "", True, "in_sync"),
        (status.Reading(current_system=HEAD), "", HEAD, "", True, "in_sync"),
        (status.Reading(current_system="/nix/store/old"), "/nix/store/old", HEAD, "", True, "behind"),
        (status.Reading(current_system="/nix/store/hand"), HEAD, HEAD, "", True, "drifted"),
        (status.Reading(current_system="/nix/store/hand"), HEAD, "", "boom", True, "drifted"),
        (status.Reading(current_system=HEAD), HEAD, "", "boom", True, "unknown"),
        (status.Reading(error="unreachable: refused"), HEAD, HEAD, "", True, "unknown"),
        (status.Reading(current_system=""), HEAD, HEAD, "", True, "unknown"),
        (status.Reading(current_system=HEAD), HEAD, HEAD, "", False, "unknown"),
    ],
)
def test_classify(reading, deployed, expected, error, pinned, want):
    state = status.classify(
        reading=reading, deployed=deployed, commit_sha="c" * 40, expected=expected, expected_error=error, pinned=pinned
    )
    assert state.status == want
    if want == "unknown":
        assert state.reason


def test_a_node_deployed_while_it_was_read_is_left_alone(inventory):
    node = inventory["node"]

    def reader(nodes):
        Deployment.objects.create(node=node, action="switch", commit_sha="a" * 40, flake_attr="devm")
        return {node.pk: status.Reading(current_system=HEAD)}

    assert status.refresh([node], reader=reader)["changed"] == 0
    assert not NodeSync.objects.exists()


def test_a_node_deleted_while_it_was_read_is_skipped(inventory):
    node = inventory["node"]

    def reader(nodes):
        node.delete()
        return {node.pk: status.Reading(current_system=HEAD)}

    status.refresh([node], reader=reader)
    assert not NodeSync.objects.exists()
    assert not AuditEvent.objects.filter(action="node.sync_changed").exists()


def test_a_refresh_by_a_person_is_audited_as_theirs(inventory, alice):
    node = inventory["node"]
    status.refresh([node], user=alice, reader=lambda nodes: {node.pk: status.Reading(error="unreachable: x")})
    event = AuditEvent.objects.get(action="node.sync_changed")
    assert (event.actor_name, event.details["after"], event.details["reason"]) == ("alice", "unknown", "unreachable: x")


def test_an_unknown_branch_is_unknown_with_the_reason(inventory):
    node = inventory["node"]
    repo = node.repository
    repo.branch = "no-such-branch"
    repo.save()
    status.refresh([node], reader=lambda nodes: {node.pk: status.Reading(current_system=HEAD)})
    s = NodeSync.objects.get()
    assert s.status == "unknown" and "no-such-branch" in s.reason


def test_migrate_schedules_the_refresh_and_the_retries(db, settings):
    from django_q.models import Schedule

    from deployments.sync.apps import ensure_schedules

    settings.SYNC_MINUTES = 7
    ensure_schedules(sender=None)
    got = dict(
        Schedule.objects.filter(name__in=["sync-refresh", "notification-retries"]).values_list("name", "minutes")
    )
    assert got == {"sync-refresh": 7, "notification-retries": 1}
    assert Schedule.objects.get(name="sync-refresh").func == "deployments.sync.status.refresh_fleet"
    settings.SYNC_MINUTES = 0  # only the buttons
    ensure_schedules(sender=None)
    assert not Schedule.objects.filter(name="sync-refresh").exists()


@pytest.mark.parametrize(("kept", "drifted"), [("unhealthy", False), ("failed", True)])
def test_a_system_the_node_kept_though_unhealthy_is_what_the_panel_deployed(inventory, kept, drifted):
    """A health check failed with policy keep: the node runs that deployment's system, which is not drift;
    a failed deployment's system is not the panel's to claim."""
    from datetime import timedelta

    from django.utils import timezone

    node = inventory["node"]
    Deployment.objects.create(
        node=node, action="switch", commit_sha="b" * 40, flake_attr=node.flake_attr, status="succeeded",
        system_after="/nix/store/old", finished_at=timezone.now() - timedelta(hours=1),
    )  # fmt: skip
    Deployment.objects.create(
        node=node, action="switch", commit_sha="c" * 40, flake_attr=node.flake_attr, status=kept,
        system_after="/nix/store/new", finished_at=timezone.now(),
    )  # fmt: skip
    status.refresh([node], reader=lambda nodes: {node.pk: status.Reading(current_system="/nix/store/new")})
    assert (NodeSync.objects.get(node=node).status == "drifted") is drifted
