"""Rollouts without SSH: selection, the gate, parallelism, canaries, the failure policy, cancel and races.

A stand-in worker takes what the rollout hands to the queue and ends deployments through ``lifecycle``
as the real one would; the same rollouts run over real SSH in tests/integration/test_rollouts_over_ssh.py.
"""

from __future__ import annotations

import threading
import time

import pytest
from django.core.exceptions import PermissionDenied

from deployments import lifecycle, rollouts
from deployments.audit.models import AuditEvent
from deployments.errors import RequestError
from deployments.models import Deployment, Node, Rollout
from deployments.rollouts import Options
from tests.support import personas
from tests.support.fleet import StandInWorker, make_fleet

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def worker(monkeypatch):
    w = StandInWorker()
    monkeypatch.setattr(rollouts, "hand_out", w.enqueue)
    return w


@pytest.fixture
def fleet(repository):
    return make_fleet(repository)


def rollout_of(user=None, **kw) -> Rollout:
    return rollouts.request_rollout(Options(**kw), user=user, trigger=Deployment.Trigger.CLI if user is None else "web")


def statuses(rollout: Rollout) -> dict[str, str]:
    return dict(rollout.deployments.values_list("node__name", "status"))


def events(name: str, rollout: Rollout | None = None):
    qs = AuditEvent.objects.filter(action=name)
    return qs.filter(object_id=str(rollout.pk)) if rollout is not None else qs


# --- selection ----------------------------------------------------------------------------------------


def test_a_rollout_by_tag_deploys_every_tagged_node_to_one_commit(fleet, worker, alice, repository):
    r = rollout_of(alice, tags=["web"])
    assert r.node_count == 8 and set(statuses(r)) == {f"web-{i:02d}" for i in range(1, 9)}
    assert r.commits == {"fleet": r.deployments.first().commit_sha}
    assert {d.commit_sha for d in r.deployments.all()} == {r.commits["fleet"]}
    worker.run_all()
    r.refresh_from_db()
    assert r.status == "succeeded" and r.finished_at
    finished = events("rollout.finished", r).get()
    assert finished.details["counts"] == {"queued": 0, "running": 0, "succeeded": 8, "failed": 0, "cancelled": 0}
    assert events("rollout.requested", r).get().details["nodes"] == 8
    assert events("deployment.requested").filter(details__rollout=r.pk).count() == 8


def test_tags_and_names_add_up_and_an_unknown_name_is_refused(fleet, worker, alice):
    r = rollout_of(alice, tags=["db"], nodes=["web-03"])
    assert set(statuses(r)) == {"db-01", "db-02", "db-03", "db-04", "web-03"}
    with pytest.raises(RequestError, match="No node named nope"):
        rollout_of(alice, nodes=["web-04", "nope"])
    with pytest.raises(RequestError, match="No node matches"):
        rollout_of(alice, tags=["no-such-tag"])


def test_all_nodes_needs_an_explicit_confirmation(fleet, worker, alice):
    with pytest.raises(RequestError, match="explicit confirmation"):
        rollout_of(alice, all_nodes=True)
    assert not Rollout.objects.exists() and not Deployment.objects.exists()
    r = rollout_of(alice, all_nodes=True, confirm_all=True)
    assert r.node_count == 12


def test_all_means_all_the_user_may_deploy(fleet, worker):
    deployer = personas.person("dora")
    personas.grant(deployer, "deployer", tag="db")
    personas.grant(deployer, "viewer", tag="web", team_name="web-viewers")
    r = rollout_of(deployer, all_nodes=True, confirm_all=True)
    assert set(statuses(r)) == {"db-01", "db-02", "db-03", "db-04"}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"tags": ["web"], "parallelism": 0}, "Parallelism"),
        ({"tags": ["web"], "max_failures": 0}, "failure limit"),
        ({"tags": ["web"], "canary": 8}, "leave none"),
        ({"tags": ["web"], "canary": 1, "canary_tag": "canary"}, "not both"),
        ({"tags": ["db"], "canary_tag": "canary"}, "canary tag"),
        ({"tags": ["web"], "timeout": 0}, "timeout"),
        ({"tags": ["web"], "node_timeouts": {"db-01": 5}}, "outside the rollout"),
        ({"tags": ["web"], "action": "reboot"}, "Unknown action"),
        ({"tags": ["web"], "revision": "main;reboot"}, "revision|character"),
        ({"tags": ["web"], "revision": "no-such-branch"}, "no-such-branch"),
        ({"tags": ["web;x"]}, "[Tt]ag"),
        ({}, "Choose the nodes"),
        ({"all_nodes": True, "tags": ["web"]}, "not both"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(fleet, worker, alice, options, message):
    with pytest.raises(RequestError, match=message):
        rollout_of(alice, **options)
    assert not Rollout.objects.exists() and not Deployment.objects.exists()
    assert not worker.handed


def test_a_node_without_a_pinned_host_key_refuses_the_rollout(fleet, worker, alice):
    Node.objects.filter(name="web-05").update(host_key="")
    with pytest.raises(RequestError, match="web-05"):
        rollout_of(alice, tags=["web"])
    assert not Deployment.objects.exists()


# --- the gate -----------------------------------------------------------------------------------------


def test_a_rollout_naming_a_node_the_user_may_not_deploy_is_refused_whole_and_audited_once(fleet, worker):
    user = personas.person("dora")
    personas.grant(user, "deployer", tag="db")
    personas.grant(user, "viewer", node=fleet["web-01"], team_name="viewers")
    with pytest.raises(PermissionDenied, match="web-01"):
        rollout_of(user, tags=["db"], nodes=["web-01"])
    assert not Rollout.objects.exists() and not Deployment.objects.exists() and not worker.handed
    refusal = AuditEvent.objects.get(outcome="denied")
    assert refusal.action == "rollout.requested" and refusal.actor_name == "dora"
    assert refusal.details["nodes"] == ["web-01"]


def test_a_user_who_may_deploy_nowhere_is_refused_before_the_selection_is_read(fleet, worker, bob):
    with pytest.raises(PermissionDenied, match="any node"):
        rollout_of(bob, nodes=["not a valid name;"])
    assert AuditEvent.objects.filter(outcome="denied", action="rollout.requested").count() == 1


def test_nodes_the_user_cannot_see_are_not_in_a_tag_selection_and_never_named(fleet, worker):
    user = personas.person("dora")
    personas.grant(user, "deployer", node=fleet["web-03"])
    r = rollout_of(user, tags=["web"])
    assert set(statuses(r)) == {"web-03"}
    with pytest.raises(RequestError, match="No node named web-04"):
        rollout_of(user, nodes=["web-04"])


def test_cancelling_needs_deploy_on_every_node_of_the_rollout(fleet, worker, alice):
    r = rollout_of(alice, tags=["db"], nodes=["web-01"])
    user = personas.person("dora")
    personas.grant(user, "deployer", tag="db")
    with pytest.raises(PermissionDenied):
        rollouts.cancel_rollout(r, user=user)
    assert events("rollout.cancel").get().outcome == "denied"
    r.refresh_from_db()
    assert r.status == "running"


# --- parallelism, canaries, policy ----------------------------------------------------------------------


def test_never_more_than_parallelism_nodes_are_handed_to_the_worker(fleet, worker, alice):
    r = rollout_of(alice, tags=["web"], parallelism=3)
    assert len(worker.handed) == 3
    running = worker.claim_all()
    worker.end(running[0])
    assert len(worker.handed) == 4, "one ended, one more started"
    most = 0
    for _ in range(20):
        running = worker.running()
        active = Deployment.objects.filter(rollout=r, status__in=Deployment.ACTIVE, rollout_position__lt=8).count()
        in_flight = Deployment.objects.filter(rollout=r, status="running").count()
        most = max(most, in_flight)
        assert in_flight <= 3 and active >= in_flight
        if not running:
            break
        worker.end(running[0])
    worker.run_all()
    r.refresh_from_db()
    assert r.status == "succeeded" and most == 3
    assert len(worker.handed) == len(set(worker.handed)) == 8, "each node handed out once"


def test_canaries_go_first_and_the_rest_waits_for_them(fleet, worker, alice):
    r = rollout_of(alice, tags=["web"], canary=2, parallelism=5)
    assert r.canary_count == 2
    first = worker.claim_all()
    assert [d.node.name for d in first] == ["web-01", "web-02"]
    worker.end(first[0])
    assert len(worker.handed) == 2, "nothing else starts while a canary runs"
    worker.end(first[1])
    assert len(worker.handed) == 7, "canaries passed: the rest starts, five at a time"
    r.refresh_from_db()
    assert r.canary_passed_at and events("rollout.canary_passed", r).count() == 1
    worker.run_all()
    r.refresh_from_db()
    assert r.status == "succeeded"


def test_a_failed_canary_stops_the_rest(fleet, worker, alice):
    r = rollout_of(alice, tags=["web"], canary_tag="canary", parallelism=5)
    assert r.canary_count == 2
    first = worker.claim_all()
    assert {d.node.name for d in first} == {"web-01", "web-02"}
    worker.end(first[0], "failed", exit_code=4)
    worker.end(first[1])
    r.refresh_from_db()
    assert r.status == "failed" and "canary failed: 1 of 2" in r.stop_reason
    assert events("rollout.canary_failed", r).count() == 1
    assert len(worker.handed) == 2
    rest = Deployment.objects.filter(rollout=r, rollout_position__gte=2)
    assert set(rest.values_list("status", flat=True)) == {"cancelled"}
    assert all("not started" in m for m in rest.values_list("error_message", flat=True))
    finished = events("rollout.finished", r).get()
    assert finished.details["counts"] == {"queued": 0, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 6}


def test_the_continue_policy_runs_every_node_whatever_fails(fleet, worker, alice):
    r = rollout_of(alice, tags=["web"], parallelism=2)
    worker.run_all(outcome=lambda d: "failed" if d.node.name in ("web-01", "web-02", "web-05") else "succeeded")
    r.refresh_from_db()
    assert r.status == "failed" and not r.stop_reason
    assert list(rollouts.counts(r.deployments.all()).values()) == [0, 0, 5, 3, 0]


def test_stop_after_n_failures_starts_no_further_node_and_lets_running_ones_finish(fleet, worker, alice):
    r = rollout_of(alice, tags=["web"], parallelism=3, max_failures=2)
    first = worker.claim_all()
    worker.end(first[0], "failed", exit_code=4)  # one failure: a new node starts
    assert len(worker.handed) == 4
    worker.end(first[1], "error")  # two: the limit
    r.refresh_from_db()
    assert r.status == "stopping" and "stopped after 2 failed nodes" in r.stop_reason
    assert events("rollout.stopped_by_policy", r).count() == 1
    assert Deployment.objects.get(pk=first[2].pk).status == "running", "a running node is not stopped"
    assert len(worker.handed) == 4
    assert worker.claim_all() == [], "the handed-out but unclaimed node was cancelled"
    worker.end(first[2])
    r.refresh_from_db()
    assert r.status == "failed"
    assert rollouts.counts(r.deployments.all()) == {
        "queued": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 2,
        "cancelled": 5,
    }


def test_a_busy_node_is_skipped_with_the_reason_and_the_rollout_does_not_succeed(fleet, worker, alice):
    busy = lifecycle.request_deployment(fleet["db-02"], action="switch", user=alice)
    r = rollout_of(alice, tags=["db"])
    skipped = r.deployments.get(node__name="db-02")
    assert skipped.status == "cancelled" and f"busy with deployment #{busy.pk}" in skipped.error_message
    assert skipped.rollout_position is None
    assert events("deployment.skipped").get().details["busy_with"] == busy.pk
    worker.run_all()
    r.refresh_from_db()
    assert r.status == "failed"
    assert busy.pk not in worker.handed, "the rollout never handed out the busy node's own deployment"


def test_a_timeout_is_stored_on_each_nodes_deployment(fleet, worker, alice):
    r = rollout_of(alice, tags=["db"], timeout=120, node_timeouts={"db-03": 900})
    assert dict(r.deployments.values_list("node__name", "timeout_seconds")) == {
        "db-01": 120,
        "db-02": 120,
        "db-03": 900,
        "db-04": 120,
    }


# --- cancel --------------------------------------------------------------------------------------------


def test_cancel_stops_running_nodes_and_queued_ones_never_start(fleet, worker, alice):
    r = rollout_of(alice, tags=["web"], parallelism=2)
    running = worker.claim_all()
    assert len(running) == 2
    r = rollouts.cancel_rollout(r, user=alice)
    assert r.status == "cancelling"
    assert all(Deployment.objects.get(pk=d.pk).cancel_requested for d in running)
    assert Deployment.objects.filter(rollout=r, status="queued").count() == 0
    for d in running:  # the worker stops them
        worker.end(d, "cancelled")
    assert worker.claim_all() == []
    r.refresh_from_db()
    assert r.status == "cancelled" and r.stop_reason == "cancelled by alice"
    assert events("rollout.cancelled", r).get().actor_name == "alice"
    assert events("rollout.finished", r).get().details["counts"]["cancelled"] == 8
    with pytest.raises(RequestError, match="already finished"):
        rollouts.cancel_rollout(r, user=alice)


def test_a_node_cancelled_on_its_own_frees_its_slot(fleet, worker, alice):
    r = rollout_of(alice, tags=["db"], parallelism=1)
    first = worker.claim_all()
    lifecycle.cancel_deployment(Deployment.objects.filter(rollout=r, status="queued").first(), user=alice)
    worker.end(first[0])
    worker.run_all()
    r.refresh_from_db()
    assert r.status == "failed"
    assert rollouts.counts(r.deployments.all())["succeeded"] == 3


# --- races ---------------------------------------------------------------------------------------------


def test_many_advances_at_once_never_exceed_parallelism_nor_hand_a_node_out_twice(fleet, worker, alice):
    r = rollout_of(alice, all_nodes=True, confirm_all=True, parallelism=4)
    for _ in range(6):
        threads = [threading.Thread(target=rollouts.advance_rollout, args=(r.pk,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        active = Deployment.objects.filter(rollout=r, rollout_position__lt=Rollout.objects.get(pk=r.pk).dispatched)
        assert active.filter(status__in=Deployment.ACTIVE).count() <= 4
        running = worker.running()
        if running:
            worker.end(running[0])
    worker.run_all()
    assert len(worker.handed) == len(set(worker.handed)) == 12
    assert Rollout.objects.get(pk=r.pk).status == "succeeded"
    assert events("rollout.finished", r).count() == 1


def test_the_schedule_advances_a_rollout_whose_trigger_was_lost(fleet, worker, alice, monkeypatch):
    rollout_of(alice, tags=["db"], parallelism=1)
    first = worker.claim_all()
    monkeypatch.setattr(rollouts, "node_ended", lambda pk: None)  # the finishing process died before advancing
    worker.end(first[0])
    assert len(worker.handed) == 1
    assert rollouts.advance_active_rollouts() == 1
    assert len(worker.handed) == 2


# --- run_node: a handed-out task runs on to the next nodes itself -----------------------------------------


@pytest.fixture
def ran(monkeypatch):
    """A stand-in ``tasks.run_deployment`` that claims and succeeds at once; the ids it ran, in order."""
    from deployments import tasks

    done = []

    def run_deployment(pk):
        if not lifecycle.claim(pk):
            return "skipped"
        done.append(pk)
        lifecycle.finish(pk, "succeeded", exit_code=0)
        return "succeeded"

    monkeypatch.setattr(tasks, "run_deployment", run_deployment)
    return done


def test_one_handed_out_task_runs_the_next_nodes_itself_while_a_slot_is_free(fleet, worker, alice, ran):
    r = rollout_of(alice, tags=["db"], parallelism=1)
    assert len(worker.handed) == 1
    rollouts.run_node(worker.handed[0])
    assert len(ran) == 4 and len(worker.handed) == 1, "one task ran the four nodes one after another"
    r.refresh_from_db()
    assert r.status == "succeeded"


def test_a_task_runs_the_slots_that_open_in_its_own_threads(fleet, worker, alice, ran, settings):
    settings.ROLLOUT_THREADS = 10
    r = rollout_of(alice, tags=["db"], parallelism=3, canary=1)
    rollouts.run_node(worker.handed[0])  # the canary passes: three slots, all taken by this task's threads
    assert sorted(ran) == sorted(r.deployments.values_list("pk", flat=True))
    assert len(worker.handed) == 1, "nothing went back to the queue"
    r.refresh_from_db()
    assert r.status == "succeeded"


def test_a_task_with_one_thread_keeps_one_node_and_hands_out_the_others(fleet, worker, alice, ran, settings):
    settings.ROLLOUT_THREADS = 1
    r = rollout_of(alice, tags=["db"], parallelism=3, canary=1)
    rollouts.run_node(worker.handed[0])  # the canary passes: three slots, one kept, two handed out
    assert len(worker.handed) == 3
    for pk in worker.handed[1:]:
        rollouts.run_node(pk)
    assert sorted(ran) == sorted(r.deployments.values_list("pk", flat=True))
    r.refresh_from_db()
    assert r.status == "succeeded"


def test_a_task_without_time_for_another_nodes_timeout_hands_it_out(fleet, worker, alice, ran, settings):
    settings.DEPLOY_TIMEOUT = 100  # a chained node could run 100 s more; the task may run 200 s in all
    r = rollout_of(alice, tags=["db"], parallelism=1)
    rollouts.run_node(worker.handed[0])
    assert len(ran) == 1 and len(worker.handed) == 2, "the next node went to the queue, not this task"
    r.refresh_from_db()
    assert r.status == "running"


def test_a_node_whose_task_was_lost_is_handed_out_again(fleet, worker, alice, monkeypatch, settings):
    r = rollout_of(alice, tags=["db"], parallelism=2)
    lost = list(worker.handed)
    worker.handed.clear()  # the broker lost both tasks
    monkeypatch.setattr(rollouts, "_queue_empty", lambda: True)
    assert rollouts.advance_active_rollouts() == 1 and worker.handed == [], "not before ROLLOUT_REHAND_AFTER"
    settings.ROLLOUT_REHAND_AFTER = 0
    monkeypatch.setattr(rollouts, "_queue_empty", lambda: False)
    rollouts.advance_active_rollouts()
    assert worker.handed == [], "tasks still waiting in the broker: nothing handed out twice"
    monkeypatch.setattr(rollouts, "_queue_empty", lambda: True)
    rollouts.advance_active_rollouts()
    assert sorted(worker.handed) == sorted(lost)
    worker.run_all()
    r.refresh_from_db()
    assert r.status == "succeeded"


# --- threads: one task runs several nodes at once ------------------------------------------------------------


def test_positions_are_handed_out_rollout_threads_to_a_task(fleet, worker, alice, settings):
    settings.ROLLOUT_THREADS = 3
    r = rollout_of(alice, tags=["web", "db"], parallelism=7)
    assert [len(t) for t in worker.tasks] == [3, 3, 1], "seven started: two tasks of three, one of one"
    assert sorted(worker.handed) == sorted(r.deployments.order_by("rollout_position").values_list("pk", flat=True)[:7])


def test_threads_of_several_tasks_never_exceed_the_parallelism_nor_run_a_node_twice(
    fleet, worker, alice, monkeypatch, settings
):
    from django.db import connection

    from deployments import tasks

    settings.ROLLOUT_THREADS = 3
    lock = threading.Lock()
    running, most, done = [0], [0], []

    def run_deployment(pk):
        if not lifecycle.claim(pk):
            return "skipped"
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            done.append(pk)
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        lifecycle.finish(pk, "succeeded", exit_code=0)
        return "succeeded"

    monkeypatch.setattr(tasks, "run_deployment", run_deployment)
    r = rollout_of(alice, tags=["web", "db"], parallelism=5)
    ran_tasks = 0
    while ran_tasks < len(worker.tasks):  # tasks handed out while others run are run too, as a worker would
        batch = worker.tasks[ran_tasks:]
        ran_tasks = len(worker.tasks)

        def task(pks):
            try:
                rollouts.run_node(*pks)
            finally:
                connection.close()

        pool = [threading.Thread(target=task, args=(pks,)) for pks in batch]
        for t in pool:
            t.start()
        for t in pool:
            t.join(60)
    everyone = sorted(r.deployments.values_list("pk", flat=True))
    assert sorted(done) == everyone, "every node ran exactly once"
    assert len(done) == len(set(done)) == 12
    assert 1 < most[0] <= 5, f"at most the parallelism at once, and more than one (threads): {most[0]}"
    r.refresh_from_db()
    assert r.dispatched == 12 and r.status == "succeeded"
    assert len(worker.tasks) < 12, "fewer tasks than nodes: the tasks' threads ran the rest"


def test_a_task_thread_that_raises_leaves_the_others_running_and_the_task_fails(
    fleet, worker, alice, monkeypatch, settings
):
    from deployments import tasks

    settings.ROLLOUT_THREADS = 4
    done = []
    r = rollout_of(alice, tags=["db"], parallelism=4)
    broken = worker.tasks[0][1]

    def run_deployment(pk):
        if pk == broken:
            raise RuntimeError("the runner broke")
        if not lifecycle.claim(pk):
            return "skipped"
        done.append(pk)
        lifecycle.finish(pk, "succeeded", exit_code=0)
        return "succeeded"

    monkeypatch.setattr(tasks, "run_deployment", run_deployment)
    with pytest.raises(RuntimeError, match="the runner broke"):
        rollouts.run_node(*worker.tasks[0])
    assert sorted(done) == sorted(pk for pk in worker.tasks[0] if pk != broken), "the other threads ran to the end"
    assert Deployment.objects.get(pk=broken).status == "queued"
    r.refresh_from_db()
    assert r.status == "running", "its broken node is still to run (the minute schedule hands it out again)"


@pytest.mark.parametrize(
    "value,message",
    [("0", "use a number from 1 to 200"), ("201", "use a number from 1 to 200"), ("ten", "is not an integer")],
)
def test_a_bad_rollout_threads_setting_is_refused_at_start(value, message, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PANEL_ROLLOUT_THREADS": value, "PANEL_DATA_DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", "import controlpanel.settings"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert f"PANEL_ROLLOUT_THREADS={value!r}" in run.stderr or f"PANEL_ROLLOUT_THREADS={value}" in run.stderr
    assert message in run.stderr


def test_a_thread_takes_only_what_it_runs_when_two_nodes_end_together(fleet, worker, alice):
    r = rollout_of(alice, tags=["db"], parallelism=2)
    first = list(worker.handed)
    token = rollouts._in_slot.set(r.pk)  # as in a task's thread: its own end does not advance the rollout
    try:
        for pk in first:
            assert lifecycle.claim(pk)
            lifecycle.finish(pk, "succeeded", exit_code=0)
    finally:
        rollouts._in_slot.reset(token)
    one = rollouts.advance_rollout(r.pk, keep=1)  # the first thread: two slots free, it runs one
    assert len(one) == 1 and worker.handed == first, "the other free slot was not sent to wait in the broker"
    other = rollouts.advance_rollout(r.pk, keep=1)  # the second thread takes the other
    assert len(other) == 1 and other != one and worker.handed == first
    r.refresh_from_db()
    assert r.dispatched == 4


def test_slots_opened_by_passed_canaries_beyond_the_threads_go_to_the_queue(fleet, worker, alice):
    r = rollout_of(alice, tags=["db"], parallelism=3, canary=1)
    token = rollouts._in_slot.set(r.pk)
    try:
        assert lifecycle.claim(worker.handed[0])
        lifecycle.finish(worker.handed[0], "succeeded", exit_code=0)
    finally:
        rollouts._in_slot.reset(token)
    kept = rollouts.advance_rollout(r.pk, keep=1)
    assert len(kept) == 1 and len(worker.handed) == 3, "the canary passed: one kept, two handed out"
