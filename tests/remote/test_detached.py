"""deployments.remote.detached: a run that outlives its SSH session, against the loopback sshd.

The fake nixos-rebuild (server.py) prints numbered lines (``#lines-<n>``) or hangs (``#hang-<seconds>``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time

import pytest

from deployments.remote import Cancelled, run_rebuild
from deployments.remote import detached as detached_module
from deployments.remote import rebuild as rebuild_module
from deployments.remote.rebuild import OWNER_SUFFIX, UNCOLLECTED_KEEP_DAYS, WORKDIR_ROOT

from .server import collect
from .test_rebuild import make_tar, shipped_to

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def quick_reconnects(monkeypatch):
    monkeypatch.setattr(detached_module, "RECONNECT_FIRST_DELAY", 0.2)


def test_a_dropped_session_loses_no_line_and_the_real_exit_status_is_taken(node):
    n = 60
    lines: list = []
    killed: list[int] = []

    def out(stream, line):
        lines.append((stream, line))
        if line == b"out line 10" and not killed:
            killed.extend(node.session_pids())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    result = run_rebuild(
        node.target(), deployment_id=1, archive=make_tar({"flake.nix": b"{}\n"}), attr=f"lines-{n}",
        action="test", on_output=out,
    )  # fmt: skip
    assert killed, "no session was dropped"
    assert result.exit_code == 3
    assert [line for s, line in lines if s == "out" and line.startswith(b"out line")] == [
        f"out line {i}".encode() for i in range(1, n + 1)
    ]
    assert [line for s, line in lines if s == "err" and line.startswith(b"err line")] == [
        f"err line {i}".encode() for i in range(1, n + 1)
    ]
    assert ("out", b"last words") in lines, "a last line without a newline is a line"
    notes = [line.decode() for s, line in lines if s == "sys"]
    assert any(x.startswith("lost the connection to ") for x in notes)
    assert any(x.startswith("resuming the run's output at byte ") for x in notes)
    assert not os.path.exists(shipped_to(lines)), "its outcome read, the folder goes"


def test_cancel_kills_the_detached_run_and_removes_its_folder(node):
    marker = f"300.{secrets.randbelow(10**6):06d}"
    lines, out = collect()
    stop = {"now": False}

    def note(stream, line):
        out(stream, line)
        if line == b"hanging":
            stop["now"] = True

    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        run_rebuild(
            node.target(), deployment_id=2, archive=make_tar({"flake.nix": b"{}\n"}), attr=f"hang-{marker}",
            action="switch", on_output=note, should_cancel=lambda: stop["now"],
        )  # fmt: skip
    assert time.monotonic() - t0 < 20
    assert not node.pids(f"sleep {marker}"), "the detached run is gone"
    assert any(line.startswith(b"stopping the run on the node: SIGTERM") for _, line in lines)
    assert not os.path.exists(shipped_to(lines))


@pytest.mark.parametrize("what", ["command", "group"])
def test_a_run_killed_on_the_node_is_its_signal_or_no_exit_status(node, what):
    """nixos-rebuild killed: its shell records 128+9. The whole run killed: no status to read."""
    marker = f"301.{secrets.randbelow(10**6):06d}"
    lines: list = []

    def out(stream, line):
        lines.append((stream, line))
        if line == b"hanging":
            if what == "command":
                for pid in node.pids(f"sleep {marker}"):
                    os.kill(pid, signal.SIGKILL)
            else:
                with open(f"{shipped_to(lines)}/pgid") as f:
                    os.killpg(int(f.read()), signal.SIGKILL)

    kwargs = dict(archive=make_tar({"flake.nix": b"{}\n"}), attr=f"hang-{marker}", action="switch", on_output=out)
    if what == "command":
        assert run_rebuild(node.target(), deployment_id=3, **kwargs).exit_code == 128 + 9
    else:
        with pytest.raises(detached_module.RemoteError) as e:
            run_rebuild(node.target(), deployment_id=3, **kwargs)
        assert e.value.kind == "killed" and "ended without an exit status" in e.value.message
    assert not os.path.exists(shipped_to(lines))


def test_the_sweep_keeps_an_unread_outcome_and_drops_it_after_its_time(node):
    parent = f"{WORKDIR_ROOT}-{node.user}"
    os.makedirs(parent, mode=0o700, exist_ok=True)
    tag = secrets.token_hex(4)
    gone = subprocess.Popen(["true"], start_new_session=True)
    gone.wait()
    folders = {}
    for name in ("fresh", "old"):
        folder = folders[name] = f"{parent}/deploy-{name}-{tag}"
        os.makedirs(f"{folder}/src")
        for file, text in (("pgid", str(gone.pid)), ("status", "0")):
            with open(f"{folder}/{file}", "w") as f:
                f.write(text + "\n")
        with open(folder + OWNER_SUFFIX, "w") as f:
            f.write(f"{gone.pid}\n")
    old = time.time() - (UNCOLLECTED_KEEP_DAYS + 1) * 86400
    os.utime(folders["old"], (old, old))
    try:
        lines, out = collect()
        result = run_rebuild(
            node.target(), deployment_id=4, archive=make_tar({"flake.nix": b"{}\n"}), attr="web", action="build",
            on_output=out,
        )  # fmt: skip
        assert result.exit_code == 0
        notes = [line.decode() for s, line in lines if s == "sys"]
        assert os.path.exists(f"{folders['fresh']}/status")
        assert any(n.startswith(f"left {folders['fresh']} in place: its run ended") for n in notes)
        assert not os.path.exists(folders["old"]) and not os.path.exists(folders["old"] + OWNER_SUFFIX)
        assert f"removed {folders['old']}, left behind by an earlier run that is no longer running" in notes
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder + OWNER_SUFFIX)


def test_reconcile_reads_the_outcome_then_removes_the_folder(node, monkeypatch):
    lines, out = collect()
    kept = []
    # A run whose panel lost it: run to the end, but keep the folder (as an interrupted run leaves it).
    for module in (rebuild_module, detached_module):
        monkeypatch.setattr(module, "remove_script", lambda workdir: "true")
    run_rebuild(
        node.target(), deployment_id=5, archive=make_tar({"flake.nix": b"{}\n"}), attr="lines-3",
        action="test", on_output=out,
    )  # fmt: skip
    monkeypatch.undo()
    folder = shipped_to(lines)
    assert os.path.exists(f"{folder}/status")

    def record(report):
        kept.append((report, os.path.exists(folder)))
        return True

    report = detached_module.reconcile_run(node.target(), folder, record, None)
    ((seen, existed),) = kept
    assert existed, "the folder was still there while the outcome was recorded"
    assert (report.exists, report.running, report.exit_status, report.pgid is not None) == (True, False, 3, True)
    assert report.out_size == sum(len(line) + 1 for s, line in lines if s == "out") - 1  # "last words": no newline
    assert not os.path.exists(folder) and not os.path.exists(folder + OWNER_SUFFIX)
    # Asked again, the node no longer has it.
    gone = detached_module.inspect_run(node.target(), folder)
    assert not gone.exists and gone.exit_status is None
