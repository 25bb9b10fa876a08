"""Generations read from NixOS-like nodes and rollbacks to them, over real SSH with real Nix profiles.

The worker function runs in-process (``tasks.run_deployment``), as in test_deploy_over_ssh.py.  Generation
numbers, store paths, ``/run/current-system`` and ``/run/booted-system`` are checked on the node itself
(the testbed's view of its directories), not only through the panel.
"""

from __future__ import annotations

import threading

import pytest
from django.core.management import call_command
from django.db import connection

from deployments import generations, lifecycle, logstream, rollbacks, tasks
from deployments.audit.models import AuditEvent
from deployments.errors import NodeBusy
from deployments.models import Deployment
from tests.support.net import refusing_address
from tests.support.testbed import commit_change, rotate_host_key
from tests.support.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def isolated(testbed):
    if not testbed.isolated:
        pytest.skip("the node's own /nix profile and /run links need the testbed's namespaces (root)")


def deploy(node) -> Deployment:
    d = lifecycle.request_deployment(node, action="switch", trigger=Deployment.Trigger.CLI)
    tasks.run_deployment(d.pk)
    d.refresh_from_db()
    assert d.status == "succeeded", d.error_message
    return d


def roll_back(node, generation=None, action="switch", user=None) -> Deployment:
    d = rollbacks.request_rollback(node, generation=generation, action=action, user=user)
    tasks.run_deployment(d.pk)
    d.refresh_from_db()
    return d


def log_text(d: Deployment) -> list[str]:
    return [text for _, _, text in logstream.lines_after(d.pk)]


@pytest.fixture
def three_generations(isolated, add_node, flake_repo):
    """A node with generations 1 (the testbed's initial system), 2 and 3 (two panel deployments of two
    commits): (node, testbed node, first deployment, second deployment)."""
    node, tb = add_node()
    first = deploy(node)
    commit_change(flake_repo[0], "devm")
    second = deploy(node)
    assert tb.generations() == [1, 2, 3]
    return node, tb, first, second


def test_the_generations_are_read_from_the_node_with_who_made_each(three_generations, alice):
    node, tb, first, second = three_generations
    initial = tb.booted_system()
    read = generations.read_node_generations(node, user=alice)
    assert read.error == "" and read.read_at is not None
    shown = generations.shown(node)
    rows = {r.generation.number: r for r in shown.rows}
    assert [r.generation.number for r in shown.rows] == [3, 2, 1]  # newest first
    assert rows[3].generation.path == second.toplevel == tb.current_system() == tb.system_profile()
    assert rows[2].generation.path == first.toplevel
    assert rows[1].generation.path == initial
    # Current is what /run/current-system is; booted stays the system the node started with.
    assert [n for n, r in rows.items() if r.generation.current] == [3]
    assert [n for n, r in rows.items() if r.generation.default] == [3]
    assert [n for n, r in rows.items() if r.generation.booted] == [1]
    # Made by: the deployment (and so the commit) that made each; generation 1 was not the panel.
    assert (rows[3].deployment, rows[3].exact) == (second, True)
    assert (rows[2].deployment, rows[2].exact) == (first, True)
    assert rows[2].deployment.commit_sha != rows[3].deployment.commit_sha
    assert rows[1].deployment is None
    assert all(r.created is not None for r in shown.rows)
    event = AuditEvent.objects.filter(action="node.generations_read").latest("seq")
    assert event.outcome == "success" and event.actor_name == "alice"
    assert event.details["generations"] == [1, 2, 3] and event.details["profile_generation"] == 3
    # The node page shows the kept read without connecting, with both rollback buttons per generation.
    page = _client(alice).get(node.get_absolute_url())
    html = page.content.decode()
    assert page.status_code == 200
    assert 'data-generation="2"' in html and first.short_sha in html and "not the panel" in html
    assert 'aria-label="Switch to generation 2"' in html and 'aria-label="Boot generation 1 next time"' in html


def _client(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client


def test_rolling_back_to_the_previous_generation_runs_it_and_keeps_every_generation(
    three_generations, alice, flake_repo
):
    node, tb, first, second = three_generations
    d = roll_back(node, user=alice)
    assert d.status == "succeeded", d.error_message
    assert (d.kind, d.action, d.exit_code) == ("rollback", "switch", 0)
    # The node runs the previous system and boots it; no generation is added or removed (nix-env --rollback).
    assert tb.current_system() == first.toplevel == tb.system_profile()
    assert tb.generations() == [1, 2, 3]
    assert (d.generation_before, d.generation_after, d.target_generation) == (3, 2, 2)
    assert d.system_before == second.toplevel and d.system_after == first.toplevel == d.toplevel
    assert d.commit_sha == first.commit_sha  # the commit it returned to
    assert "switching profile from version 3 to 2" in log_text(d)
    requested = AuditEvent.objects.get(action="deployment.requested", object_id=str(d.pk))
    assert requested.details["kind"] == "rollback" and requested.details["generation"] == "previous"
    finished = AuditEvent.objects.get(action="deployment.finished", object_id=str(d.pk))
    assert finished.details["kind"] == "rollback" and finished.details["target_generation"] == 2
    assert finished.details["commit"] == first.commit_sha and finished.outcome == "success"
    # As Nix does it: deploying the newest generation's system again goes back to that generation (none is
    # added), and a new system goes on from the highest number, generation 4.
    again = deploy(node)
    assert again.generation_after == 3 and tb.generations() == [1, 2, 3]
    commit_change(flake_repo[0], "devm")
    newer = deploy(node)
    assert newer.generation_after == 4 and tb.generations() == [1, 2, 3, 4]


def test_rolling_back_to_a_chosen_generation_with_switch(three_generations):
    node, tb, first, second = three_generations
    initial = tb.booted_system()
    d = roll_back(node, generation=1)
    assert d.status == "succeeded", d.error_message
    assert tb.current_system() == initial == tb.system_profile()
    assert (d.generation_after, d.target_generation, d.commit_sha) == (1, 1, "")  # not made by the panel
    assert "generation 1 was made by no panel deployment (its commit is unknown)" in log_text(d)
    # Forward again, to a generation the panel made: its commit is recorded at request time already.
    forward = rollbacks.request_rollback(node, generation=3)
    assert forward.commit_sha == second.commit_sha
    tasks.run_deployment(forward.pk)
    forward.refresh_from_db()
    assert forward.status == "succeeded" and tb.current_system() == second.toplevel
    assert tb.generations() == [1, 2, 3]


def test_rolling_back_with_boot_changes_the_boot_default_not_the_running_system(three_generations):
    node, tb, first, second = three_generations
    booted = tb.booted_system()
    d = roll_back(node, generation=2, action="boot")
    assert d.status == "succeeded", d.error_message
    assert tb.system_profile() == first.toplevel  # the boot default moved
    assert tb.current_system() == second.toplevel  # /run/current-system did not
    assert tb.booted_system() == booted
    assert (d.generation_after, d.toplevel, d.system_after) == (2, first.toplevel, second.toplevel)
    generations.read_node_generations(node)
    flags = {r.generation.number: r.generation for r in generations.shown(node).rows}
    assert flags[2].default and not flags[2].current and flags[3].current and flags[1].booted
    # After a reboot the node runs (and has booted) what the rollback made the default.
    tb.reboot()
    assert tb.current_system() == tb.booted_system() == first.toplevel
    generations.read_node_generations(node)
    flags = {r.generation.number: r.generation for r in generations.shown(node).rows}
    assert flags[2].default and flags[2].current and flags[2].booted and not flags[3].current


def test_a_generation_that_no_longer_exists_is_a_clear_error_and_changes_nothing(three_generations):
    node, tb, first, second = three_generations
    before = (tb.generations(), tb.system_profile(), tb.current_system(), tb.booted_system())
    d = roll_back(node, generation=9)
    assert d.status == "error"
    assert d.error_message == f"generation 9 does not exist on {tb.host}:22 (it has 1, 2, 3): nothing was changed"
    assert (tb.generations(), tb.system_profile(), tb.current_system(), tb.booted_system()) == before
    assert not tb.run("ls /tmp/nixos-panel-root 2>/dev/null || true").stdout.strip()  # no run folder left
    finished = AuditEvent.objects.get(action="deployment.finished", object_id=str(d.pk))
    assert finished.outcome == "failure" and "does not exist" in finished.details["error"]


def test_there_is_no_previous_generation_on_a_node_with_one(isolated, add_node):
    node, tb = add_node()
    d = roll_back(node)
    assert d.status == "error"
    assert d.error_message == (
        f"no generation older than the current one (1) exists on {tb.host}:22 (it has 1): nothing was changed"
    )
    assert tb.generations() == [1]


def test_an_unreachable_node_is_said_on_read_and_on_rollback(isolated, add_node, alice):
    node, tb = add_node()
    generations.read_node_generations(node)  # a good read first: it stays shown
    with refusing_address() as (host, port):
        node.host, node.port = host, port
        node.save()
        read = generations.read_node_generations(node, user=alice)
        assert "refused" in read.error.lower() and str(port) in read.error
        assert [r.generation.number for r in generations.shown(node).rows] == [1]  # the last good read
        page = _client(alice).get(node.get_absolute_url()).content.decode()
        assert "The last read failed" in page and "The list below is the read before it." in page
        event = AuditEvent.objects.filter(action="node.generations_read").latest("seq")
        assert event.outcome == "failure" and str(port) in event.details["error"]
        d = roll_back(node)
        assert d.status == "error" and str(port) in d.error_message
    assert tb.generations() == [1]


def test_a_changed_host_key_is_refused_on_read(isolated, add_node):
    node, tb = add_node()
    rotate_host_key(tb)
    read = generations.read_node_generations(node)
    assert "host key" in read.error.lower()
    assert read.read_at is None
    assert AuditEvent.objects.filter(action="hostkey.mismatch", object_id=str(node.pk)).exists()


@pytest.fixture
def slow_generation(isolated, add_node, flake_repo):
    """A node whose generation 2 takes 8 s to activate and whose generation 3 is current:
    (node, testbed node, the deployment that made generation 2)."""
    node, tb = add_node()
    commit_change(flake_repo[0], "devm", sleep=8)
    slow = deploy(node)
    commit_change(flake_repo[0], "devm", sleep=0)
    deploy(node)
    assert tb.generations() == [1, 2, 3]
    return node, tb, slow


def activating_rollback(node, **fields) -> tuple[Deployment, threading.Thread]:
    """A rollback to generation 2 whose activation has begun, run by a worker thread."""
    d = rollbacks.request_rollback(node, generation=2)
    if fields:
        Deployment.objects.filter(pk=d.pk).update(**fields)
    worker = threading.Thread(target=_run_in_thread, args=(d.pk,))
    worker.start()
    try:
        wait_for(lambda: any("activating" in t for t in log_text(d)), timeout=60, what="the rollback to activate")
    except BaseException:
        worker.join(60)
        raise
    return d, worker


def test_a_running_rollback_is_cancelled_on_the_node_and_holds_the_node_meanwhile(slow_generation, alice):
    node, tb, slow = slow_generation
    d, worker = activating_rollback(node)
    try:
        # The node's one-active lock holds for a rollback as for a rebuild.
        with pytest.raises(NodeBusy, match="already has a deployment in progress"):
            lifecycle.request_deployment(node, action="switch")
        lifecycle.cancel_deployment(d, user=alice)
    finally:
        worker.join(90)
    d.refresh_from_db()
    assert d.status == "cancelled"
    assert tb.system_profile() == slow.toplevel  # nix-env had switched before the activation was stopped
    assert not [c for c in tb.processes().values() if "switch-to-configuration" in c]


def test_a_rollback_past_its_timeout_is_stopped_on_the_node(slow_generation):
    node, tb, slow = slow_generation
    d, worker = activating_rollback(node, timeout_seconds=3)
    worker.join(90)
    d.refresh_from_db()
    assert d.status == "failed" and d.error_message.startswith("timed out after 3 s")
    assert not [c for c in tb.processes().values() if "switch-to-configuration" in c]


def test_a_rollback_that_lost_its_node_is_reconciled_from_the_node(slow_generation, settings):
    settings.LINK_TIMEOUT, settings.UNREACHABLE_LIMIT = 6, 0
    node, tb, slow = slow_generation
    d, worker = activating_rollback(node)
    try:
        tb.link_down()
        worker.join(90)
    finally:
        tb.link_up()
    d.refresh_from_db()
    assert d.status == "interrupted" and d.remote_dir
    # The rollback went on without the panel; reconcile records what the node says.
    wait_for(lambda: tb.current_system() == slow.toplevel, timeout=60, what="the rollback to end on the node")
    wait_for(lambda: lifecycle.reconcile_deployment(d).final, timeout=30, what="the outcome to be recorded")
    d.refresh_from_db()
    assert (d.status, d.exit_code, d.generation_after, d.system_after) == ("succeeded", 0, 2, slow.toplevel)
    assert d.commit_sha == slow.commit_sha and tb.generations() == [1, 2, 3]


def _run_in_thread(pk: int) -> None:
    try:
        tasks.run_deployment(pk)
    finally:
        connection.close()


def test_the_rollback_command_goes_back_and_says_where(three_generations, capsys):
    node, tb, first, second = three_generations
    call_command("rollback", node.name, "--generation", "2", "--boot")  # queued, not followed: exit 0
    d = Deployment.objects.filter(node=node, kind="rollback").get()
    assert d.action == "boot" and d.target_generation == 2 and d.status == "queued"
    assert "rollback to generation 2 (boot)" in capsys.readouterr().err
    tasks.run_deployment(d.pk)
    assert tb.system_profile() == first.toplevel and tb.current_system() == second.toplevel
