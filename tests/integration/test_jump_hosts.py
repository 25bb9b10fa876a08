"""Jump hosts on the testbed: nodes reachable ONLY through another registered node (a bastion).

Each node here sits on the testbed's private network behind its bastion (``Testbed.add_node(behind=...)``):
the host has no route there, the bastion has an address on it and forwards nothing, so the panel gets to
the node only through an SSH session on the bastion. The worker runs in-process (threads), with a bastion
pool of the test's own; the bastion's own sshd log says how many connections it accepted.
"""

from __future__ import annotations

import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from django.db import connection

from deployments import inventory, lifecycle, logstream, rollouts, tasks
from deployments.audit.models import AuditEvent
from deployments.models import Deployment, Rollout, Tag
from deployments.remote import RemoteError, detached, rebuild
from deployments.remote import jump as jump_module
from deployments.remote.confirm import ARMED_MARK
from deployments.remote.connection import Connection
from deployments.remote.jump import BastionPool
from deployments.rollouts import Options
from tests.support.keys import new_ed25519
from tests.support.testbed import NodeConfigSpec, make_flake_repo
from tests.support.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PACED_LINES = 600
PACED_RATE = 20  # lines a second: 30 s of activation output


@pytest.fixture(scope="module")
def _jump_repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("jump-flake") / "flake"
    configs = {"devm": NodeConfigSpec(), "paced": NodeConfigSpec(extra_lines=PACED_LINES, lines_per_second=PACED_RATE)}
    return path, make_flake_repo(path, configs)


@pytest.fixture
def flake_repo(_jump_repo):
    return _jump_repo


@pytest.fixture
def isolated(testbed):
    if not testbed.isolated:
        pytest.skip("a node reachable only through another needs the testbed's network namespaces (root)")


@pytest.fixture
def pool(monkeypatch):
    """The worker process's bastion pool, fresh for this test."""
    fresh = BastionPool()
    monkeypatch.setattr(jump_module, "POOL", fresh)
    yield fresh
    fresh.close_idle()


@pytest.fixture
def behind(isolated, add_node, pool):
    """``behind(attr)`` → (bastion (panel, testbed), node (panel, testbed)): a new node only the bastion reaches."""

    def make(attr: str = "devm", bastion=None):
        bastion = bastion or add_node()
        return bastion, add_node(attr, behind=bastion)

    return make


def run(pk: int) -> None:
    try:
        tasks.run_deployment(pk)
    finally:
        connection.close()


def deploy(node) -> Deployment:
    d = lifecycle.request_deployment(node, action="switch")
    worker = threading.Thread(target=run, args=(d.pk,))
    worker.start()
    worker.join(180)
    assert not worker.is_alive(), "the worker did not finish"
    d.refresh_from_db()
    return d


def texts(d: Deployment, stream: str | None = None) -> list[str]:
    return [text for _, s, text in logstream.lines_after(d.pk) if stream is None or s == stream]


def test_a_node_only_its_bastion_reaches_is_deployed_through_it(behind):
    (gw, gw_tb), (node, tb) = behind()
    direct = replace(tasks.target_for(node), via=None, connect_timeout=3)
    with pytest.raises(RemoteError) as e:
        Connection(direct).open()  # the panel's host has no way there of its own
    assert e.value.kind == "unreachable"
    connections = gw_tb.ssh_connections()

    d = deploy(node)

    assert d.status == "succeeded", d.error_message
    assert d.system_after == tb.current_system() and len(tb.rebuild_runs()) == 1
    assert gw_tb.ssh_connections() == connections + 1  # one connection to the bastion, the rest went through it
    assert gw_tb.rebuild_runs() == []  # the bastion only forwarded


def test_the_host_key_of_a_node_behind_a_bastion_is_scanned_through_it(behind):
    (gw, _), (node, tb) = behind()
    key = inventory.scan_host_key(node)
    assert key.openssh == " ".join(tb.host_key_public.split()[:2])


def test_a_cut_bastion_link_mid_run_is_resumed_through_the_bastion_with_every_line_once(behind, monkeypatch):
    for module in (rebuild, detached):  # keep the run's folder, to compare it with the stored log
        monkeypatch.setattr(module, "remove_script", lambda workdir: "true")
    (gw, gw_tb), (node, tb) = behind("paced")
    connections = gw_tb.ssh_connections()
    d = lifecycle.request_deployment(node, action="switch")
    worker = threading.Thread(target=run, args=(d.pk,))
    worker.start()
    try:
        wait_for(lambda: len([t for t in texts(d, "o") if "paced line" in t]) >= 40, timeout=90, what="output")
        cut_at = time.monotonic()
        gw_tb.link_down()  # the bastion's link: the node behind it is fine, the panel cannot get there
        wait_for(lambda: any(t.startswith("lost the connection") for t in texts(d, "s")), timeout=40,
                 interval=0.1, what="the worker to notice the dead link")  # fmt: skip
        noticed = time.monotonic() - cut_at
        time.sleep(max(0.0, 22 - noticed))
        gw_tb.link_up()
    finally:
        gw_tb.link_up()
        worker.join(180)
    d.refresh_from_db()
    assert noticed <= 20, f"a cut bastion link was noticed only after {noticed:.1f} s"
    assert d.status == "succeeded", d.error_message
    notes = texts(d, "s")
    assert any(t.startswith("reconnected to ") for t in notes)
    assert any(t.startswith("resuming the run's output at byte ") for t in notes)
    out = tb.run(f"cat {shlex.quote(d.remote_dir)}/out").stdout.split("\n")[:-1]
    # The armed run's mark (magic rollback: confirmed over a new connection, through the bastion too) is
    # the panel's, not the run's output: the worker takes it out of the log.
    assert texts(d, "o") == [line for line in out if not line.startswith(ARMED_MARK.decode())]
    paced = [int(t.split()[3]) for t in texts(d, "o") if " paced line " in t]
    assert paced == list(range(1, PACED_LINES + 1))
    assert len(tb.rebuild_runs()) == 1  # resumed, never run again
    assert gw_tb.ssh_connections() >= connections + 2  # the reconnect went through the bastion again
    tb.run(f"rm -rf {shlex.quote(d.remote_dir)}*")


def test_a_wrong_pinned_key_on_the_bastion_is_an_error_naming_the_bastion(behind):
    (gw, gw_tb), (node, tb) = behind()
    _, other = new_ed25519()
    inventory.pin_host_key(gw, other)
    d = deploy(node)
    assert d.status == "error"
    assert d.error_message.startswith(f"bastion {gw.name}: host key mismatch for {gw_tb.host}:22")
    assert tb.rebuild_runs() == []
    event = AuditEvent.objects.filter(action="hostkey.mismatch").latest("seq")
    assert event.object_id == str(gw.pk) and event.details["behind"] == node.name


def test_a_wrong_pinned_key_on_the_node_behind_is_an_error_naming_it_and_its_bastion(behind):
    (gw, gw_tb), (node, tb) = behind()
    _, other = new_ed25519()
    inventory.pin_host_key(node, other)
    d = deploy(node)
    assert d.status == "error"
    assert d.error_message.startswith(f"host key mismatch for {tb.host}:22 (through bastion {gw.name})")
    assert tb.rebuild_runs() == []
    event = AuditEvent.objects.filter(action="hostkey.mismatch").latest("seq")
    assert event.object_id == str(node.pk) and "behind" not in event.details


def test_a_bastion_that_is_down_is_named(behind):
    (gw, gw_tb), (node, tb) = behind()
    gw_tb.run("kill $(cat /run/testbed/sshd.pid)")  # the bastion's sshd stops; the machine is still there
    wait_for(lambda: not gw_tb.processes() or "sshd" not in " ".join(gw_tb.processes().values()), timeout=10,
             what="the bastion's sshd to stop")  # fmt: skip
    d = deploy(node)
    assert d.status == "error"
    assert d.error_message.startswith(f"bastion {gw.name}: connection to {gw_tb.host}:22 refused")
    assert tb.rebuild_runs() == []


def test_a_node_behind_a_bastion_whose_sshd_is_down_is_unreachable_through_the_bastion(behind):
    (gw, gw_tb), (node, tb) = behind()
    tb.run("kill $(cat /run/testbed/sshd.pid)")
    wait_for(lambda: "sshd" not in " ".join(tb.processes().values()), timeout=10, what="the node's sshd to stop")
    d = deploy(node)
    assert d.status == "error"
    assert d.error_message.startswith(f"{tb.host}:22 unreachable through bastion {gw.name}: ")


def test_a_rollout_through_one_bastion_connects_to_it_once(behind, monkeypatch, pool):
    """Twelve nodes behind one bastion, six at a time, by an in-process worker of eight threads (as one
    worker process's tasks): the bastion's sshd accepts one connection, not one per node."""
    gw = None
    made = []
    for _ in range(12):
        gw, (node, tb) = behind(bastion=gw)
        node.tags.add(Tag.objects.get_or_create(name="behind-gw")[0])
        made.append(tb)
    gw_tb = gw[1]
    connections = gw_tb.ssh_connections()
    threads = ThreadPoolExecutor(max_workers=8)

    def run_node(*pks):
        try:
            rollouts.run_node(*pks)
        finally:
            connection.close()

    monkeypatch.setattr(rollouts, "hand_out", lambda *pks: threads.submit(run_node, *pks))
    rollout = rollouts.request_rollout(Options(tags=["behind-gw"], parallelism=6))
    wait_for(lambda: Rollout.objects.get(pk=rollout.pk).status in Rollout.TERMINAL, timeout=180, what="the rollout")
    threads.shutdown(wait=True)
    rollout.refresh_from_db()
    assert rollout.status == "succeeded", rollout.stop_reason
    assert all(len(tb.rebuild_runs()) == 1 for tb in made)
    assert Deployment.objects.filter(rollout=rollout, status="succeeded").count() == 12
    assert gw_tb.ssh_connections() - connections == 1 == pool.opened


def test_a_node_going_away_behind_the_bastion_leaves_the_others_on_its_session(behind, pool):
    """The bastion closes the gone node's channel; the session it shares with the other node stays."""
    from deployments.remote.stream import read_output

    (gw, gw_tb), (a, a_tb) = behind()
    _, (b, b_tb) = behind(bastion=(gw, gw_tb))
    connections = gw_tb.ssh_connections()
    with Connection(tasks.target_for(a)) as on_a, Connection(tasks.target_for(b)) as on_b:
        assert read_output(on_a, "hostname") == a_tb.name and read_output(on_b, "hostname") == b_tb.name
        a_tb.stop()  # every process of node a, its sshd and our session's included, is killed
        with pytest.raises(RemoteError):
            for _ in range(50):  # until the closed channel is noticed
                read_output(on_a, "true")
                time.sleep(0.1)
        for _ in range(20):
            assert read_output(on_b, "echo still") == "still"
    assert gw_tb.ssh_connections() == connections + 1 and pool.opened == 1
