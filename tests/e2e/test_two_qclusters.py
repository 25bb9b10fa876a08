"""Two qcluster processes on one broker (a private PostgreSQL and Redis): a 100-node rollout is spread over
both, no node runs twice, and killing one qcluster (its process group, SIGKILL) mid-rollout leaves the other
to finish, with every node accounted for.

Which qcluster ran a deployment is read from ``Deployment.worker`` (``host:pid`` of the worker process that
claimed it) against each qcluster's own process tree; how often a node ran, from the node's own run log
(the ``nixos-rebuild`` stand-in writes each run's start and end). A fast configuration keeps the wall time
short: heartbeats every 0.5 s, a dead worker's deployment stale after 5 s, a lost task handed out again after
5 quiet seconds (both checked by the minute schedules), one task taken ahead per qcluster.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.panel import Panel
from tests.support.processes import descendants
from tests.support.services import PrivatePostgres, PrivateRedis
from tests.support.testbed import NamespacesUnavailable, NodeConfigSpec, Testbed, make_flake_repo
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

NODES = 100
PARALLELISM = 8
WORKERS = 4  # per qcluster
KILL_AFTER = 20  # nodes ended before one qcluster is killed
TERMINAL = ("succeeded", "failed", "error", "cancelled", "interrupted")


def query(panel: Panel, sql: str, *args) -> list[tuple]:
    import psycopg

    with psycopg.connect(panel.env["DATABASE_URL"], autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def pids_of(proc) -> set[int]:
    return {proc.pid, *descendants(proc.pid)}


@pytest.fixture(scope="module")
def two_qclusters(tmp_path_factory):
    repo = tmp_path_factory.mktemp("two-fleet") / "flake"
    make_flake_repo(repo, {"devm": NodeConfigSpec()})
    try:
        testbed = Testbed(tmp_path_factory.mktemp("two-tb") / "tb")  # its own: 100 nodes on one bridge
    except NamespacesUnavailable as e:
        pytest.skip(str(e))
    with testbed, PrivatePostgres() as pg, PrivateRedis() as redis:
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            nodes = list(pool.map(lambda i: testbed.add_node(f"q{i:03d}"), range(NODES)))
        print(f"\n{NODES} testbed nodes up in {time.monotonic() - t0:.1f} s")
        panel = Panel(tmp_path_factory.mktemp("two-panel"), database_url=pg.url, redis_url=redis.url)
        panel.env.update(
            PANEL_WORKERS=str(WORKERS),
            PANEL_QUEUE_LIMIT="1",
            # Two nodes a task: the rollout's 8 slots are 4 tasks, spread over both (with the default 10
            # threads a task, all 8 would run in one worker of one qcluster).
            PANEL_ROLLOUT_THREADS="2",
            PANEL_HEARTBEAT_STALE_AFTER="5",
            PANEL_ROLLOUT_REHAND_AFTER="5",
        )
        try:
            t0 = time.monotonic()
            panel.register_nodes([(n.name, "devm", n) for n in nodes], repo_path=repo, tags=("fleet",))
            print(f"registered and pinned in {time.monotonic() - t0:.1f} s")
            clusters = {name: panel.start_qcluster(name) for name in ("qcluster-a", "qcluster-b")}
            for name, proc in clusters.items():
                # The sentinel, the pusher, the monitor and the workers: ready for tasks.
                wait_for(lambda p=proc: len(descendants(p.pid)) >= WORKERS + 3, timeout=60, what=f"{name} to start")
            yield panel, nodes, clusters
        finally:
            panel.stop()


def test_a_rollout_is_spread_over_two_qclusters_and_one_killed_leaves_the_other_to_finish(two_qclusters):
    panel, nodes, clusters = two_qclusters
    started = time.monotonic()
    proc = panel.manage("deploy", "--tag", "fleet", "--parallel", str(PARALLELISM))
    out = proc.stdout + proc.stderr
    rollout = int(out.split("rollout #", 1)[1].split(":", 1)[0])

    def counts() -> dict[str, int]:
        rows = query(
            panel, "SELECT status, count(*) FROM deployments_deployment WHERE rollout_id = %s GROUP BY 1", rollout
        )
        return dict(rows)

    # Each qcluster's processes, seen while both run (a worker's pid is in its qcluster's tree).
    trees = {name: pids_of(proc) for name, proc in clusters.items()}

    def ran_by(name: str) -> list[int]:
        return [
            pk
            for pk, worker in query(
                panel, "SELECT id, worker FROM deployments_deployment WHERE rollout_id = %s", rollout
            )
            if worker and int(worker.rsplit(":", 1)[1]) in trees[name]
        ]

    def a_is_busy() -> bool:
        for name, proc in clusters.items():
            trees[name] |= pids_of(proc)
        ended = sum(n for s, n in counts().items() if s in TERMINAL)
        running_on_a = query(
            panel,
            "SELECT worker FROM deployments_deployment WHERE rollout_id = %s AND status = 'running'",
            rollout,
        )
        return ended >= KILL_AFTER and any(int(w.rsplit(":", 1)[1]) in trees["qcluster-a"] for (w,) in running_on_a)

    wait_for(a_is_busy, timeout=120, interval=0.05, what=f"{KILL_AFTER} nodes done and qcluster-a running one")
    running_at_kill = {
        pk
        for pk, w in query(
            panel, "SELECT id, worker FROM deployments_deployment WHERE rollout_id = %s AND status = 'running'", rollout
        )
        if int(w.rsplit(":", 1)[1]) in trees["qcluster-a"]
    }
    panel.kill("qcluster-a")  # SIGKILL to its whole process group
    killed_at = time.monotonic()
    (kill_ts,) = query(panel, "SELECT now()")[0]
    gone = trees["qcluster-a"]
    wait_for(lambda: not [pid for pid in gone if _alive(pid)], timeout=10, what="every process of qcluster-a to die")

    wait_for(
        lambda: (
            query(panel, "SELECT status FROM deployments_rollout WHERE id = %s", rollout)[0][0]
            in ("succeeded", "failed", "cancelled")
        ),
        timeout=170,
        interval=0.5,
        what=f"rollout #{rollout} to end after qcluster-a was killed\n{panel.logs()}",
    )
    wall = time.monotonic() - started
    print(
        f"\n100-node rollout over two qclusters: {wall:.0f} s, ended {time.monotonic() - killed_at:.0f} s after the kill"
    )

    by_a, by_b = ran_by("qcluster-a"), ran_by("qcluster-b")
    final = counts()
    print(f"qcluster-a ran {len(by_a)}, qcluster-b ran {len(by_b)}; statuses {final}")
    # Spread over both, and every node accounted for: each deployment claimed by exactly one of them.
    assert by_a and by_b
    assert len(by_a) + len(by_b) == NODES and not set(by_a) & set(by_b)
    assert sum(final.values()) == NODES and set(final) <= set(TERMINAL), final
    # What was running on the killed qcluster ended interrupted (or was reconciled); nothing else failed.
    interrupted = {pk for (pk,) in query(
        panel, "SELECT id FROM deployments_deployment WHERE rollout_id = %s AND status = 'interrupted'", rollout
    )}  # fmt: skip
    assert running_at_kill and interrupted <= running_at_kill
    assert final.get("succeeded", 0) + len(interrupted) == NODES, final
    # No node ran twice: the nodes' own run logs.
    runs = {n.name: n.rebuild_runs() for n in nodes}
    assert all(len(r) <= 1 for r in runs.values()), {k: v for k, v in runs.items() if len(v) > 1}
    succeeded = {name for (name,) in query(
        panel,
        "SELECT n.name FROM deployments_deployment d JOIN deployments_node n ON n.id = d.node_id "
        "WHERE d.rollout_id = %s AND d.status = 'succeeded'",
        rollout,
    )}  # fmt: skip
    assert all(len(runs[name]) == 1 for name in succeeded)
    # The survivor finished what was left: everything started after the kill ran on qcluster-b.
    after_kill = {pk for (pk,) in query(
        panel, "SELECT id FROM deployments_deployment WHERE rollout_id = %s AND started_at > %s", rollout, kill_ts
    )}  # fmt: skip
    assert after_kill and after_kill <= set(by_b)
    assert wall < 180, f"the test's rollout took {wall:.0f} s"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
