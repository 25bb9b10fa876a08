"""Sync policies: node beats tag, maintenance windows on a frozen clock, and what a moved branch does
(notify, auto-deploy as one rollout by the system, waiting for the window, held for approval)."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from deployments.audit.models import AuditEvent
from deployments.gitops import changes, policies, tasks
from deployments.gitops.models import ApprovalRequest, PendingSync, SyncPolicy
from deployments.models import Deployment, Rollout, Tag
from tests.support.testbed import commit_change

MONDAY_0300 = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)  # 2026-11-30 is a Monday


def policy(days, start, end, mode="auto"):
    return SyncPolicy(mode=mode, window_days=",".join(map(str, days)), window_start=start, window_end=end)


@pytest.mark.parametrize(
    ("when", "is_open"),
    [
        (datetime(2026, 11, 30, 3, 0, tzinfo=UTC), True),  # Monday inside
        (datetime(2026, 11, 30, 2, 0, tzinfo=UTC), True),  # the start is inside
        (datetime(2026, 11, 30, 4, 0, tzinfo=UTC), False),  # the end is outside
        (datetime(2026, 11, 30, 1, 59, tzinfo=UTC), False),
        (datetime(2026, 12, 5, 3, 0, tzinfo=UTC), False),  # Saturday
        (datetime(2026, 12, 4, 3, 30, tzinfo=UTC), True),  # Friday
    ],
)
def test_a_weekday_window(when, is_open):
    assert policies.window_open(policy([1, 2, 3, 4, 5], time(2), time(4)), when) is is_open


@pytest.mark.parametrize(
    ("when", "is_open"),
    [
        (datetime(2026, 12, 4, 23, 0, tzinfo=UTC), True),  # Friday night
        (datetime(2026, 12, 5, 1, 0, tzinfo=UTC), True),  # Saturday early: Friday's window
        (datetime(2026, 12, 5, 2, 0, tzinfo=UTC), False),
        (datetime(2026, 12, 4, 1, 0, tzinfo=UTC), False),  # Friday early: Thursday has no window
        (datetime(2026, 12, 5, 23, 0, tzinfo=UTC), False),  # Saturday night
    ],
)
def test_a_window_past_midnight_belongs_to_the_day_it_starts(when, is_open):
    assert policies.window_open(policy([5], time(22), time(2)), when) is is_open


def test_no_window_is_always_open():
    assert policies.window_open(SyncPolicy(mode="auto"), MONDAY_0300)


def test_a_window_in_another_timezone_is_read_in_utc():
    from zoneinfo import ZoneInfo

    berlin = datetime(2026, 11, 30, 4, 30, tzinfo=ZoneInfo("Europe/Berlin"))  # 03:30 UTC
    assert policies.window_open(policy([1], time(2), time(4)), berlin)


def test_the_node_policy_beats_its_tags_and_the_most_careful_tag_wins(inventory, alice):
    node = inventory["node"]
    web, canary = Tag.objects.create(name="web"), Tag.objects.create(name="canary")
    node.tags.add(web, canary)
    changes.set_policy(web, mode="auto", user=alice)
    changes.set_policy(canary, mode="notify", user=alice)
    assert policies.effective([node])[node.pk].mode == "notify"
    changes.set_policy(node, mode="auto", user=alice)
    assert policies.effective([node])[node.pk].node_id == node.pk


def test_no_policy_is_manual_and_a_push_does_nothing(inventory):
    done = policies.act_on_move(inventory["repo"], inventory["sha"])
    assert done == {"notify": [], "waiting": [], "started": []}
    assert not Deployment.objects.exists()


def test_notify_records_that_the_node_is_behind(inventory, alice):
    changes.set_policy(inventory["node"], mode="notify", user=alice)
    policies.act_on_move(inventory["repo"], inventory["sha"], before="a" * 40)
    (event,) = AuditEvent.objects.filter(action="gitops.node_behind")
    assert event.node_name == "web1"
    assert event.details["commit"] == inventory["sha"]
    assert not Deployment.objects.exists()


def test_auto_deploys_the_branch_head_as_one_rollout_by_the_system(inventory, alice):
    changes.set_policy(inventory["node"], mode="auto", action="test", user=alice)
    head = commit_change(inventory["repo_path"], "devm")
    done = policies.act_on_move(inventory["repo"], head)
    (rollout,) = Rollout.objects.all()
    assert done["started"][0]["rollout"] == rollout.pk
    assert rollout.trigger == "gitops" and rollout.requested_by is None and rollout.action == "test"
    assert rollout.commits == {"fleet": head}
    (deployment,) = rollout.deployments.all()
    assert deployment.trigger == Deployment.Trigger.GITOPS and deployment.status == "queued"
    event = AuditEvent.objects.get(action="gitops.auto_deploy")
    assert event.details["rollout"] == rollout.pk and event.outcome == "success"
    assert AuditEvent.objects.get(action="rollout.requested").actor_kind == "system"


def test_outside_its_window_an_auto_deploy_waits_and_the_tick_starts_it_when_the_window_opens(inventory, alice):
    node = inventory["node"]
    changes.set_policy(node, mode="auto", days=[1, 2, 3, 4, 5], start=time(2), end=time(4), user=alice)
    sunday_noon = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    done = policies.act_on_move(inventory["repo"], inventory["sha"], now=sunday_noon)
    assert done["waiting"] == ["web1"] and done["started"] == []
    assert PendingSync.objects.get(node=node).commit_sha == inventory["sha"]
    assert not Rollout.objects.exists()
    assert tasks.tick(now=datetime(2026, 11, 30, 1, 59, tzinfo=UTC))["started"] == []
    assert not Rollout.objects.exists()
    started = tasks.tick(now=datetime(2026, 11, 30, 2, 0, tzinfo=UTC))["started"]
    (rollout,) = Rollout.objects.all()
    assert started[0]["rollout"] == rollout.pk
    assert not PendingSync.objects.exists()


def test_a_waiting_auto_deploy_is_dropped_when_the_node_turns_manual(inventory, alice):
    node = inventory["node"]
    changes.set_policy(node, mode="auto", days=[1], start=time(2), end=time(4), user=alice)
    policies.act_on_move(inventory["repo"], inventory["sha"], now=datetime(2026, 11, 29, 12, 0, tzinfo=UTC))
    changes.set_policy(node, mode="manual", user=alice)
    assert tasks.tick(now=MONDAY_0300)["started"] == []
    assert not PendingSync.objects.exists() and not Rollout.objects.exists()


def test_protected_nodes_of_an_auto_deploy_wait_for_approval_and_the_others_start(inventory, alice):
    from deployments import inventory as inv
    from deployments.models import Node

    node = inventory["node"]
    other = Node.objects.create(
        name="web2",
        host="192.0.2.11",
        flake_attr="devm",
        repository=inventory["repo"],
        credential=inventory["credential"],
        host_key=node.host_key,
        host_key_fingerprint="SHA256:test",
    )
    inv.save_object(node, tags=["prod"])
    changes.set_protected(Tag.objects.get(name="prod"), True, user=alice)
    changes.set_policy(node, mode="auto", user=alice)
    changes.set_policy(other, mode="auto", user=alice)
    done = policies.act_on_move(inventory["repo"], inventory["sha"])
    (rollout,) = Rollout.objects.all()
    assert list(rollout.deployments.values_list("node__name", flat=True)) == ["web2"]
    (approval,) = ApprovalRequest.objects.all()
    assert list(approval.nodes.values_list("name", flat=True)) == ["web1"]
    assert approval.trigger == "gitops" and approval.requested_by is None
    assert {r.get("approval") for r in done["started"]} == {approval.pk, None}


def test_a_node_without_a_pinned_host_key_is_not_auto_deployed_and_that_is_recorded(inventory, alice):
    node = inventory["node"]
    node.host_key = ""
    node.save()
    changes.set_policy(node, mode="auto", user=alice)
    policies.act_on_move(inventory["repo"], inventory["sha"])
    assert not Rollout.objects.exists()
    event = AuditEvent.objects.get(action="gitops.auto_deploy")
    assert event.outcome == "failure" and event.details["nodes"] == ["web1"]


def test_policy_changes_are_audited_before_and_after(inventory, alice):
    node = inventory["node"]
    changes.set_policy(node, mode="notify", user=alice)
    changes.set_policy(node, mode="auto", days=[6, 7], start=time(22), end=time(2), user=alice)
    changes.set_policy(node, mode="manual", user=alice)
    details = [e.details for e in AuditEvent.objects.filter(action="sync_policy.changed").order_by("seq")]
    assert details[0]["before"] is None and details[0]["after"]["mode"] == "notify"
    assert details[1]["after"] == {
        "mode": "auto",
        "action": "switch",
        "window_days": [6, 7],
        "window_start": "22:00",
        "window_end": "02:00",
    }
    assert details[2]["after"] is None
    assert not SyncPolicy.objects.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "sometimes"}, "Unknown sync policy"),
        ({"mode": "auto", "days": [8], "start": time(2), "end": time(4)}, "ISO weekdays"),
        ({"mode": "auto", "days": [1]}, "start and an end"),
        ({"mode": "auto", "start": time(2), "end": time(4)}, "days of the week"),
        ({"mode": "auto", "days": [1], "start": time(2), "end": time(2)}, "must differ"),
        ({"mode": "auto", "action": "dry-activate"}, "switch, boot or test"),
    ],
)
def test_bad_policies_are_refused_with_a_reason(inventory, alice, kwargs, message):
    from deployments.errors import RequestError

    with pytest.raises(RequestError, match=message):
        changes.set_policy(inventory["node"], user=alice, **kwargs)
    assert not AuditEvent.objects.filter(action="sync_policy.changed").exists()
