"""`manage.py deploy` and `cancel` as an operator runs them: real processes, a real qcluster, a testbed node.

Without a worker a deployment waits, and the command says so; Ctrl-C leaves it
queued and says how to cancel it; `cancel` does; with a qcluster running the
same command deploys and exits 0.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys

import pytest

from tests.support.panel import ROOT, Panel
from tests.support.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

_nodes = itertools.count(1)
QCLUSTER_RUNNING = "from deployments.queue_status import qcluster_running; print(qcluster_running())"


@pytest.fixture
def panel(tmp_path, testbed, flake_repo):
    p = Panel(tmp_path / "panel")
    try:
        p.register_node(
            testbed.add_node(f"cli{next(_nodes)}-{testbed.token}"), name="cli", attr="devm", repo_path=flake_repo[0]
        )
        yield p
    finally:
        p.stop()


def start_following(panel, **popen) -> subprocess.Popen:
    """``manage.py deploy cli --follow`` as an operator starts it, both streams read by the test."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "deploy", "cli", "--follow"],
        cwd=ROOT,
        env=panel.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_deploy_without_a_worker_then_with_one(panel):
    # No qcluster: the deployment is queued, and the command says why nothing happens.
    follow = start_following(panel)
    try:
        said = [follow.stderr.readline() for _ in range(2)]
        assert said[0].startswith("deployment #1: switch cli at ")
        assert said[1] == (
            "warning: no qcluster is running: deployment #1 stays queued until one starts "
            "(manage.py qcluster, or runpanel); Ctrl-C leaves it queued, cancel it with manage.py cancel 1\n"
        )
        follow.send_signal(signal.SIGINT)
        _, rest = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 130
    assert (
        "stopped following; deployment #1 is still queued (Ctrl-C does not stop it): cancel it with manage.py cancel 1"
    ) in rest
    assert "Traceback" not in rest

    # The node stays locked until the deployment is cancelled.
    busy = panel.manage("deploy", "cli", check=False)
    assert busy.returncode == 2 and "already has a deployment in progress" in busy.stderr
    cancelled = panel.manage("cancel", "1", check=False)
    assert (cancelled.returncode, cancelled.stdout) == (0, "deployment #1 cancelled\n")
    # (Each command costs seconds of start-up here; tests/test_commands.py has every exit code.)

    # With a qcluster running: no warning, the deployment runs, exit 0, no "None" anywhere.
    panel.start(daphne=False)
    wait_for(
        lambda: panel.manage("shell", "-c", QCLUSTER_RUNNING).stdout.split()[-1:] == ["True"],
        timeout=60,
        what="the qcluster to report itself",
    )
    done = panel.manage("deploy", "cli", "--follow", check=False)
    assert done.returncode == 0, panel.logs() + done.stderr
    assert "qcluster" not in done.stderr
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith("deployment #2 succeeded (exit code 0); generation ")
    assert "None" not in done.stdout + done.stderr


def test_ctrl_c_stops_following_even_when_the_command_started_with_sigint_ignored(panel):
    """A shell's background job, or a CI runner, may start the command with SIGINT ignored (inherited across
    exec, and Python then leaves it so): Ctrl-C (here: SIGINT) still stops the follow, the same way."""
    follow = start_following(panel, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        said = [follow.stderr.readline() for _ in range(2)]
        assert said[1].startswith("warning: no qcluster is running")
        follow.send_signal(signal.SIGINT)
        _, rest = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 130
    assert "stopped following; deployment #1 is still queued" in rest and "Traceback" not in rest
