"""A run detached from the SSH session, on the testbed: a cut link is noticed, the run goes on, the worker
resumes with every line once; a node that stays away ends interrupted and reconcile records the truth;
cancel and timeout kill the run's process tree on the node.

The worker runs in-process (a thread); links are cut with ``Node.link_down`` (packets dropped silently, as
a pulled cable).  Processes are looked for only in the node's own namespace.
"""

from __future__ import annotations

import io
import shlex
import threading
import time

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from deployments import lifecycle, logstream, tasks
from deployments.audit.models import AuditEvent
from deployments.models import Deployment
from deployments.remote import detached, rebuild
from tests.support.processes import matching, process_group
from tests.support.testbed import NodeConfigSpec, make_flake_repo
from tests.support.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PACED_LINES = 900
PACED_RATE = 20  # lines a second: 45 s of activation output
SLEEPY_SECONDS = 8


@pytest.fixture(scope="module")
def _detached_repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("detached-flake") / "flake"
    configs = {
        "devm": NodeConfigSpec(),
        "slow": NodeConfigSpec(sleep=30),
        "sleepy": NodeConfigSpec(sleep=SLEEPY_SECONDS),
        "paced": NodeConfigSpec(extra_lines=PACED_LINES, lines_per_second=PACED_RATE),
    }
    return path, make_flake_repo(path, configs)


@pytest.fixture
def flake_repo(_detached_repo):
    """This module's repository, in place of the suite's default one."""
    return _detached_repo


@pytest.fixture
def isolated(testbed):
    if not testbed.isolated:
        pytest.skip("cutting a node's link needs the testbed's network namespaces (root)")


@pytest.fixture
def keep_folders(monkeypatch):
    """Runs leave their folder on the node (to compare it with the stored log); the test removes it."""
    for module in (rebuild, detached):
        monkeypatch.setattr(module, "remove_script", lambda workdir: "true")


def no_magic_rollback(node) -> None:
    """A plain detached run: without a confirmation deadline a cut link cannot make the node go back
    (tests/integration/test_magic_rollback.py is about that), and its output files are the log as is."""
    node.confirm_timeout = 0
    node.save(update_fields=["confirm_timeout"])


def log(d: Deployment) -> list[tuple[int, str, str]]:
    return logstream.lines_after(d.pk)


def texts(d: Deployment, stream: str | None = None) -> list[str]:
    return [text for _, s, text in log(d) if stream is None or s == stream]


def start(node, **fields) -> tuple[Deployment, threading.Thread]:
    d = lifecycle.request_deployment(node, action="switch")
    if fields:
        Deployment.objects.filter(pk=d.pk).update(**fields)
    worker = threading.Thread(target=run_in_thread, args=(d.pk,))
    worker.start()
    return d, worker


def run_in_thread(pk: int) -> None:
    """The worker's task, as a qcluster thread runs it (its own database connection, closed after)."""
    try:
        tasks.run_deployment(pk)
    finally:
        connection.close()


def ended(d: Deployment, worker: threading.Thread, timeout: float = 180) -> Deployment:
    worker.join(timeout)
    assert not worker.is_alive(), "the worker did not finish"
    d.refresh_from_db()
    return d


def run_group(tb, d: Deployment) -> int:
    """The process group of the deployment's detached run, from its folder on the node."""
    d.refresh_from_db()
    return int(tb.run(f"cat {shlex.quote(d.remote_dir)}/pgid").stdout)


def group_on_node(tb, pgid: int) -> list[int]:
    """Pids of process group ``pgid`` that are in the node's own namespace."""
    mine = set(tb.processes())
    return [pid for pid in process_group(pgid) if pid in mine]


def node_file(tb, d: Deployment, name: str) -> list[str]:
    return tb.run(f"cat {shlex.quote(d.remote_dir)}/{name}").stdout.split("\n")[:-1]


def test_a_cut_link_is_noticed_and_the_run_resumes_with_every_line_once(isolated, add_node, keep_folders):
    node, tb = add_node("paced")
    no_magic_rollback(node)
    d, worker = start(node)
    try:
        wait_for(lambda: len([t for t in texts(d, "o") if "paced line" in t]) >= 40, timeout=90, what="output")
        cut_at = time.monotonic()
        tb.link_down()
        wait_for(lambda: any(t.startswith("lost the connection") for t in texts(d, "s")), timeout=40,
                 interval=0.1, what="the worker to notice the dead link")  # fmt: skip
        noticed = time.monotonic() - cut_at
        time.sleep(max(0.0, 22 - noticed))  # down for 22 s in all: the worker tries again meanwhile
        tb.link_up()
    finally:
        tb.link_up()
        d = ended(d, worker)
    print(f"\ndead link noticed after {noticed:.1f} s")
    assert noticed <= 20, f"a cut link was noticed only after {noticed:.1f} s"
    assert d.status == "succeeded", d.error_message
    notes = texts(d, "s")
    assert any(t.startswith("reconnected to ") for t in notes)
    assert any(t.startswith("resuming the run's output at byte ") for t in notes)
    # Every line the run wrote, exactly once and in order: the stored log is the node's own files.
    assert texts(d, "o") == node_file(tb, d, "out")
    assert texts(d, "e") == node_file(tb, d, "err")
    paced = [int(t.split()[3]) for t in texts(d, "o") if " paced line " in t]
    assert paced == list(range(1, PACED_LINES + 1))
    assert d.exit_code == 0 and d.system_after == tb.current_system()
    tb.run(f"rm -rf {shlex.quote(d.remote_dir)}*")


def test_a_node_that_stays_away_ends_interrupted_and_reconcile_records_the_truth(isolated, add_node, settings):
    settings.LINK_TIMEOUT, settings.UNREACHABLE_LIMIT = 6, 8
    node, tb = add_node("sleepy")
    no_magic_rollback(node)
    gens = tb.generations()
    d, worker = start(node)
    try:
        wait_for(lambda: any("activating" in t for t in texts(d)), timeout=90, what="the activation to start")
        cut_at = time.monotonic()
        tb.link_down()
        d = ended(d, worker, timeout=90)
        gave_up = time.monotonic() - cut_at
    finally:
        tb.link_up()
    assert d.status == "interrupted", d.error_message
    assert "unreachable" in d.error_message and "reconcile" in d.error_message
    assert gave_up <= 6 * 1.5 + 8 + 15, f"interrupted only {gave_up:.0f} s after the link went down"
    assert d.remote_dir and d.generation_after is None
    # The run went on without the panel and ends by itself on the node.
    wait_for(lambda: tb.run(f"test -e {shlex.quote(d.remote_dir)}/status", check=False).returncode == 0,
             timeout=60, what="the run to end on the node")  # fmt: skip

    out = io.StringIO()
    call_command("reconcile", str(d.pk), stdout=out)
    d.refresh_from_db()
    assert "exit code 0: succeeded" in out.getvalue()
    assert (d.status, d.exit_code) == ("succeeded", 0) and d.reconciled_at
    assert tb.generations() == gens + [d.generation_after]
    assert d.system_after == tb.current_system() == d.toplevel
    event = AuditEvent.objects.get(action="deployment.reconciled", object_id=str(d.pk))
    assert event.details["before"]["status"] == "interrupted" and event.details["after"]["status"] == "succeeded"
    assert event.details["run"]["exit_status"] == 0 and event.actor_kind == "cli"
    # Read, so removed from the node; a second reconcile is refused.
    assert tb.run(f"test -e {shlex.quote(d.remote_dir)}", check=False).returncode == 1
    with pytest.raises(CommandError, match="only an interrupted deployment"):
        call_command("reconcile", str(d.pk))


def test_the_next_deployment_reconciles_the_last_and_waits_for_nothing_it_cannot_see(isolated, add_node, settings):
    settings.LINK_TIMEOUT, settings.UNREACHABLE_LIMIT = 6, 0
    node, tb = add_node("slow")
    d, worker = start(node)
    try:
        wait_for(lambda: any("activating" in t for t in texts(d)), timeout=90, what="the activation to start")
        tb.link_down()
        d = ended(d, worker, timeout=60)
    finally:
        tb.link_up()
    assert d.status == "interrupted"
    pgid = run_group(tb, d)
    # Still activating on the node: reconcile says so and changes nothing.
    done = lifecycle.reconcile_deployment(d)
    assert done.running and not done.final and "still running on the node" in done.summary
    d.refresh_from_db()
    assert d.status == "interrupted" and d.reconciled_at is None
    # The next deployment reconciles it first and refuses to start a second nixos-rebuild beside it.
    second, worker = start(node)
    second = ended(second, worker)
    assert second.status == "error" and f"deployment #{d.pk} is still running on the node" in second.error_message
    assert any(t.startswith(f"reconciled deployment #{d.pk}: still running") for t in texts(second, "s"))
    assert len(tb.rebuild_runs()) == 1
    # Once it is gone (here: killed on the node), the next one records that and runs.
    tb.run(f"kill -KILL -{pgid}")
    wait_for(lambda: not group_on_node(tb, pgid), timeout=10, what="the run to be gone")
    node.flake_attr = "devm"
    node.save()
    third, worker = start(node)
    third = ended(third, worker)
    assert third.status == "succeeded", third.error_message
    d.refresh_from_db()
    assert d.status == "failed" and "without an exit status" in d.error_message
    assert any(t.startswith(f"reconciled deployment #{d.pk}: the run was killed") for t in texts(third, "s"))
    assert tb.run(f"test -e {shlex.quote(d.remote_dir)}", check=False).returncode == 1


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cancel_and_timeout_kill_the_detached_tree_on_the_node(add_node, how):
    node, tb = add_node("slow")
    d, worker = start(node, **({"timeout_seconds": 4} if how == "timeout" else {}))
    try:
        wait_for(lambda: any("activation in progress" in t for t in texts(d)), timeout=90, what="activation")
        pgid = run_group(tb, d)
        assert matching(tb.processes(), "switch-to-configuration") and group_on_node(tb, pgid)
        if how == "cancel":
            lifecycle.cancel_deployment(d)
    finally:
        d = ended(d, worker, timeout=60)
    if how == "cancel":
        assert d.status == "cancelled"
    else:
        assert d.status == "failed" and d.error_message.startswith("timed out after 4 s")
        assert (d.finished_at - d.started_at).total_seconds() < 30
    assert any(t.startswith(f"stopping the run on the node: SIGTERM to its process group {pgid}") for t in texts(d))
    # Nothing of the run is left in the node's namespace, and its folder is gone.
    assert not group_on_node(tb, pgid)
    assert not matching(tb.processes(), "switch-to-configuration")
    assert not matching(tb.processes(), "nixos-rebuild")
    assert tb.run(f"test -e {shlex.quote(d.remote_dir)}", check=False).returncode == 1


FAKE_SYSTEMD_RUN = r"""#!/bin/sh
# Testbed stand-in for systemd-run (the node has no systemd): logs its unit, then starts the command in a
# session of its own with the --setenv environment, as a transient service would be.
unit=
while [ $# -gt 0 ]; do
    case $1 in
        --unit=*) unit=${1#--unit=} ;;
        --setenv=*) export "${1#--setenv=}" ;;
        -*) ;;
        *) break ;;
    esac
    shift
done
printf '%s\n' "$unit $*" | tr '\n' ' ' >> /run/testbed/systemd-run.log; echo >> /run/testbed/systemd-run.log
cd / && setsid "$@" </dev/null >/dev/null 2>&1 &
"""
FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> /run/testbed/systemctl.log
"""


@pytest.mark.parametrize("how", ["succeeds", "cancelled"])
def test_on_a_node_with_systemd_the_run_is_a_transient_unit(isolated, add_node, how):
    node, tb = add_node("devm" if how == "succeeds" else "slow")
    tb.run("mkdir -p /run/systemd/system")
    for name, text in (("systemd-run", FAKE_SYSTEMD_RUN), ("systemctl", FAKE_SYSTEMCTL)):
        tb.run(f"cat > /usr/local/bin/{name} && chmod 755 /usr/local/bin/{name}", input=text)
    d, worker = start(node)
    try:
        wait_for(lambda: any(t.startswith("started on the node") for t in texts(d)), timeout=90, what="the start")
        if how == "cancelled":
            wait_for(lambda: any("activation in progress" in t for t in texts(d)), timeout=90, what="activation")
            lifecycle.cancel_deployment(d)
    finally:
        d = ended(d, worker)
    unit = f"nixos-panel-{d.remote_dir.rsplit('/', 1)[1]}"
    assert any(t.startswith("started on the node") and f"unit {unit}" in t for t in texts(d, "s"))
    (started,) = tb.run("cat /run/testbed/systemd-run.log").stdout.splitlines()
    assert started.startswith(f"{unit} sh -c ") and "nixos-rebuild switch --flake" in started
    if how == "succeeds":
        assert d.status == "succeeded", d.error_message
        assert d.system_after == tb.current_system() == d.toplevel
    else:
        assert d.status == "cancelled"
        assert f"kill --signal=TERM -- {unit}" in tb.run("cat /run/testbed/systemctl.log").stdout
        assert not matching(tb.processes(), "switch-to-configuration")
    assert tb.run(f"test -e {shlex.quote(d.remote_dir)}", check=False).returncode == 1
