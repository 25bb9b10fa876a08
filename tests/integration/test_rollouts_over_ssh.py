"""Rollouts over real SSH to NixOS-like testbed nodes: by tag, parallelism measured on the nodes themselves,
canaries, failure policies, cancel mid-rollout, timeout.

The worker is in-process: what a rollout hands to the queue (``run_node``) runs in a thread of a pool
larger than any parallelism here, so the rollout alone limits how many run at once.  Overlap is
read from each node's own run log (the ``nixos-rebuild`` stand-in writes each run's start and end).
"""

from __future__ import annotations

import inspect
import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from deployments import logstream, rollouts, tasks
from deployments.audit.models import AuditEvent
from deployments.models import Deployment, Rollout, Tag
from deployments.rollouts import Options
from tests.support.processes import matching
from tests.support.testbed import NodeConfigSpec, make_flake_repo
from tests.support.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SLEEPY_SECONDS = 2


@pytest.fixture(scope="module")
def _rollout_repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("rollout-flake") / "flake"
    configs = {
        "devm": NodeConfigSpec(),
        "failing": NodeConfigSpec(activation_exit=4),
        "slow": NodeConfigSpec(sleep=30),
        "sleepy": NodeConfigSpec(sleep=SLEEPY_SECONDS),
    }
    return path, make_flake_repo(path, configs)


@pytest.fixture
def flake_repo(_rollout_repo):
    """This module's repository (devm, failing, slow and sleepy), in place of the suite's default one."""
    return _rollout_repo


@pytest.fixture
def worker(monkeypatch):
    """Runs each task the rollout hands out (``run_node``: its node, then the next ones while a slot is
    free) in a thread, over SSH, as a qcluster worker would."""
    pool = ThreadPoolExecutor(max_workers=16)

    def run(*pks):
        try:
            rollouts.run_node(*pks)
        finally:
            connection.close()

    monkeypatch.setattr(rollouts, "hand_out", lambda *pks: pool.submit(run, *pks))
    yield pool
    pool.shutdown(wait=True, cancel_futures=False)


_names = itertools.count(1)


@pytest.fixture
def nodes(add_node):
    """``nodes(attr, count, tags)`` → [(panel node, testbed node)] tagged ``tags``."""

    def make(attr: str, count: int, *tags: str):
        made = []
        for _ in range(count):
            node, tb = add_node(attr)
            for name in tags:
                node.tags.add(Tag.objects.get_or_create(name=name)[0])
            made.append((node, tb))
        return made

    return make


def run_to_end(rollout: Rollout, timeout: float = 180) -> Rollout:
    wait_for(
        lambda: Rollout.objects.get(pk=rollout.pk).status in Rollout.TERMINAL,
        timeout=timeout,
        what=f"rollout #{rollout.pk} to finish",
    )
    rollout.refresh_from_db()
    return rollout


def most_at_once(tbs) -> int:
    """The most ``nixos-rebuild`` runs that overlapped across the nodes, from their own run logs."""
    edges = []
    for tb in tbs:
        for start, end, _, _ in tb.rebuild_runs():
            assert end is not None, f"a run on {tb.name} never ended"
            edges += [(start, 1), (end, -1)]
    now = most = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        now += step
        most = max(most, now)
    return most


def activating(rollout: Rollout) -> list[Deployment]:
    """The rollout's running deployments whose activation has begun on the node."""
    return [
        d
        for d in Deployment.objects.filter(rollout=rollout, status="running")
        if any("activation in progress" in text for _, _, text in logstream.lines_after(d.pk))
    ]


def statuses(rollout: Rollout) -> dict[str, str]:
    return dict(rollout.deployments.values_list("node__name", "status"))


def test_a_rollout_by_tag_switches_every_tagged_node_to_one_commit(nodes, worker, alice, flake_repo):
    web = nodes("devm", 3, "web")
    (other, other_tb) = nodes("devm", 1, "db")[0]
    before = {tb.name: tb.generations() for _, tb in web}
    rollout = run_to_end(rollouts.request_rollout(Options(tags=["web"], parallelism=2), user=alice))
    assert rollout.status == "succeeded", statuses(rollout)
    assert set(statuses(rollout)) == {n.name for n, _ in web}
    for node, tb in web:
        d = rollout.deployments.get(node=node)
        assert d.commit_sha == flake_repo[1] and d.exit_code == 0
        assert tb.generations() == before[tb.name] + [d.generation_after]
        assert tb.current_system() == d.system_after
    assert other_tb.rebuild_runs() == [] and not other.deployments.exists()
    finished = AuditEvent.objects.get(action="rollout.finished", object_id=str(rollout.pk))
    assert finished.details["counts"]["succeeded"] == 3


def test_never_more_than_parallelism_nodes_run_at_once_measured_on_the_nodes(nodes, worker, alice):
    fleet = nodes("sleepy", 6, "batch")
    rollout = run_to_end(rollouts.request_rollout(Options(tags=["batch"], parallelism=2), user=alice))
    assert rollout.status == "succeeded", statuses(rollout)
    tbs = [tb for _, tb in fleet]
    assert all(len(tb.rebuild_runs()) == 1 for tb in tbs), "each node ran exactly once"
    assert most_at_once(tbs) == 2


def test_a_failed_canary_stops_the_rest_before_they_start(nodes, worker, alice):
    (canary, canary_tb) = nodes("failing", 1, "shop", "canary")[0]
    rest = nodes("devm", 3, "shop")
    rollout = run_to_end(rollouts.request_rollout(Options(tags=["shop"], canary_tag="canary"), user=alice))
    assert rollout.status == "failed" and rollout.stop_reason.startswith("canary failed")
    assert statuses(rollout)[canary.name] == "failed"
    assert rollout.deployments.get(node=canary).exit_code == 1
    for node, tb in rest:
        assert statuses(rollout)[node.name] == "cancelled" and tb.rebuild_runs() == [], "the rest never ran"


def test_stop_after_one_failure_starts_no_further_node(nodes, worker, alice):
    bad = nodes("failing", 1, "api")
    good = nodes("devm", 3, "api")
    # One at a time, the failing node first (names sort in creation order within the test).
    rollout = rollouts.request_rollout(Options(tags=["api"], parallelism=1, max_failures=1), user=alice)
    rollout = run_to_end(rollout)
    assert rollout.status == "failed" and "stopped after 1 failed node" in rollout.stop_reason
    assert statuses(rollout)[bad[0][0].name] == "failed"
    assert sum(len(tb.rebuild_runs()) for _, tb in good) == 0


def test_the_continue_policy_deploys_every_node_whatever_fails(nodes, worker, alice):
    bad = nodes("failing", 1, "api")
    good = nodes("devm", 3, "api")
    rollout = run_to_end(rollouts.request_rollout(Options(tags=["api"], parallelism=1), user=alice))
    assert rollout.status == "failed" and not rollout.stop_reason
    assert statuses(rollout)[bad[0][0].name] == "failed"
    assert all(statuses(rollout)[n.name] == "succeeded" for n, _ in good)
    assert all(len(tb.rebuild_runs()) == 1 for _, tb in good)


def test_cancel_mid_rollout_stops_running_nodes_on_the_node_and_never_starts_the_rest(nodes, worker, alice):
    fleet = nodes("slow", 4, "cache")
    rollout = rollouts.request_rollout(Options(tags=["cache"], parallelism=2), user=alice)
    wait_for(lambda: len(activating(rollout)) == 2, timeout=120, what="two slow activations to be under way")
    rollouts.cancel_rollout(rollout, user=alice)
    rollout = run_to_end(rollout, timeout=60)
    assert rollout.status == "cancelled"
    assert set(statuses(rollout).values()) == {"cancelled"}
    started = {d.node.name for d in rollout.deployments.select_related("node") if d.started_at}
    assert len(started) == 2
    for node, tb in fleet:
        if node.name in started:
            assert len(tb.rebuild_runs()) == 1
            wait_for(lambda tb=tb: not matching(tb.processes(), "switch-to-configuration"), timeout=15,
                     what=f"the activation on {node.name} to be gone")  # fmt: skip
        else:
            assert tb.rebuild_runs() == [], f"{node.name} was queued and must never start"


@pytest.mark.skipif(
    "timeout_seconds" not in inspect.getsource(tasks),
    reason="waits for the worker to enforce Deployment.timeout_seconds (the worker side of issue 9)",
)
def test_a_node_past_its_timeout_is_stopped_and_ends_failed_with_the_reason(nodes, worker, alice):
    (node, tb) = nodes("slow", 1, "tmo")[0]
    rollout = run_to_end(rollouts.request_rollout(Options(tags=["tmo"], timeout=3), user=alice), timeout=90)
    d = rollout.deployments.get()
    assert d.status == "failed" and "timeout" in d.error_message.lower()
    assert d.finished_at and (d.finished_at - d.started_at).total_seconds() < 30
    wait_for(lambda: not matching(tb.processes(), "switch-to-configuration"), timeout=15, what="the run to be gone")
