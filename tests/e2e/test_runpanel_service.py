"""runpanel behaves like a service: a dead child stops the panel promptly, with nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.net import free_port
from tests.support.panel import ROOT
from tests.support.processes import descendants, matching, processes_of, stat_fields
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

EXIT_WITHIN = 5.0  # seconds from a child's death to runpanel's exit


def start_runpanel(tmp_path) -> subprocess.Popen:
    env = {**os.environ, "PANEL_DATA_DIR": str(tmp_path / "data"), "DJANGO_SETTINGS_MODULE": "controlpanel.settings"}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "runpanel", "--port", str(free_port()), "--no-admin"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:
        if "Panel at" in line:
            break
    return proc


def children(proc: subprocess.Popen) -> dict[int, str]:
    return processes_of(below=proc.pid)


def qcluster_workers_started(proc: subprocess.Popen) -> bool:
    # The qcluster forks a sentinel, a monitor, a pusher and PANEL_WORKERS workers (4): 7+ below it.
    found = children(proc)
    qcluster = matching(found, "qcluster")
    return bool(matching(found, "daphne")) and len(qcluster) >= 5


def alive(pids) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


@pytest.mark.parametrize("child", ["daphne", "qcluster"])
def test_a_killed_child_stops_the_panel_promptly_and_leaves_no_process(tmp_path, child):
    proc = start_runpanel(tmp_path)
    try:
        wait_for(lambda: qcluster_workers_started(proc), timeout=60, what="daphne and the qcluster's workers")
        started = descendants(proc.pid)
        # runpanel's own child, not one of the qcluster's forks (same command line).
        (victim,) = [pid for pid in matching(children(proc), child) if int(stat_fields(pid)[1]) == proc.pid]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        code = proc.wait(timeout=30)
        took = time.monotonic() - killed_at
        assert code != 0, "a service manager must see the failure"
        assert took < EXIT_WITHIN, f"runpanel took {took:.1f} s to exit"
        left = alive(started)
        assert left == [], f"left behind: {[(pid, open(f'/proc/{pid}/stat').read()) for pid in left]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_ctrl_c_stops_both_children_and_exits_0(tmp_path):
    proc = start_runpanel(tmp_path)
    try:
        wait_for(lambda: qcluster_workers_started(proc), timeout=60, what="daphne and the qcluster's workers")
        started = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert alive(started) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
