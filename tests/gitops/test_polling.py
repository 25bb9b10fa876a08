"""Polling: the first poll learns the head; a moved branch then acts like a push (``repository.polled``);
the tick polls only repositories whose interval passed, each once."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from deployments.audit.models import AuditEvent
from deployments.gitops import changes, tasks
from deployments.models import Rollout
from tests.support.testbed import commit_change


def test_a_moved_branch_found_by_polling_acts_like_a_push(inventory, alice):
    repo = inventory["repo"]
    changes.set_policy(inventory["node"], mode="auto", user=alice)
    assert tasks.poll_repository(repo.pk) == {"first": inventory["sha"]}
    assert not Rollout.objects.exists()  # the first poll deploys nothing: no move was seen
    assert tasks.poll_repository(repo.pk) is None  # nothing moved
    head = commit_change(inventory["repo_path"], "devm")
    done = tasks.poll_repository(repo.pk)
    (rollout,) = Rollout.objects.all()
    assert done["started"][0]["rollout"] == rollout.pk and rollout.commits == {"fleet": head}
    polled = AuditEvent.objects.filter(action="repository.polled").order_by("seq")
    assert [(e.details["before"], e.details["after"]) for e in polled] == [
        ("", inventory["sha"]),
        (inventory["sha"], head),
    ]


def test_a_push_and_a_poll_of_the_same_move_act_once(inventory, alice):
    repo = inventory["repo"]
    changes.set_policy(inventory["node"], mode="notify", user=alice)
    tasks.poll_repository(repo.pk)
    head = commit_change(inventory["repo_path"], "devm")
    assert tasks.handle_push(repo.pk, head) is not None
    assert tasks.poll_repository(repo.pk) is None
    assert tasks.handle_push(repo.pk, head) is None
    assert AuditEvent.objects.filter(action="gitops.node_behind").count() == 1


def test_the_tick_polls_only_what_is_due_once(inventory, alice, django_capture_on_commit_callbacks):
    repo = inventory["repo"]
    changes.set_poll_interval(repo, 300, user=alice)
    now = timezone.now()
    assert tasks.due_polls(now) == [repo.pk]
    assert tasks.due_polls(now + timedelta(seconds=60)) == []
    assert tasks.due_polls(now + timedelta(seconds=300)) == [repo.pk]
    changes.set_poll_interval(repo, 0, user=alice)
    assert tasks.due_polls(now + timedelta(days=1)) == []


def test_old_delivery_ids_are_forgotten(inventory, settings):
    from deployments.gitops.models import Delivery

    old = Delivery.objects.create(provider="github", delivery_id="old")
    Delivery.objects.filter(pk=old.pk).update(
        received_at=timezone.now() - timedelta(seconds=settings.WEBHOOK_DELIVERY_KEEP + 1)
    )
    Delivery.objects.create(provider="github", delivery_id="new")
    assert tasks.tick()["purged"] == 1
    assert list(Delivery.objects.values_list("delivery_id", flat=True)) == ["new"]


def test_migrate_installs_the_minute_tick(db):
    from django_q.models import Schedule

    tick = Schedule.objects.get(name="gitops-tick")
    assert tick.func == "deployments.gitops.tasks.tick"
    assert tick.schedule_type == Schedule.MINUTES and tick.minutes == 1 and tick.repeats == -1
