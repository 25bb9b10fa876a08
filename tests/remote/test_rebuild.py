"""deployments.remote.rebuild: run_rebuild end to end against sshd with a stand-in nixos-rebuild."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tarfile
from dataclasses import replace

import pytest

from deployments.remote import COMMIT_SHA_RE, FLAKE_ATTR_RE, REBUILD_ACTIONS, RemoteError, Target, run_rebuild
from deployments.remote.rebuild import CURRENT_SYSTEM, OWNER_SUFFIX, SYSTEM_PROFILE, WORKDIR_ROOT

from .server import collect

pytestmark = pytest.mark.timeout(120)


def shipped_to(lines) -> str:
    """The workdir run_rebuild announced in its "shipping source ... to <dir>" line."""
    found = [
        line.decode().rsplit(" to ", 1)[1] for s, line in lines if s == "sys" and line.startswith(b"shipping source")
    ]
    assert found, "no shipping line"
    return found[-1]


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def generation_here() -> int | None:
    """The system profile generation of this machine (the loopback node), as run_rebuild should read it."""
    if not os.path.islink(SYSTEM_PROFILE):
        return None
    name = os.readlink(SYSTEM_PROFILE)
    if name.startswith("system-") and name.endswith("-link"):
        return int(name.split("-")[1])
    return None


def test_run_rebuild_end_to_end_with_fake_nixos_rebuild(node):
    archive = make_tar({"flake.nix": b"{}\n", "hosts/web 1.nix": b"{}\n"})
    dep_id = 900_000 + secrets.randbelow(10_000)
    lines, out = collect()
    result = run_rebuild(
        node.target(), deployment_id=dep_id, archive=archive, attr="web-1.prod", action="build", on_output=out
    )
    workdir = shipped_to(lines)
    assert re.fullmatch(rf"{WORKDIR_ROOT}-{node.user}/deploy-{dep_id}-[0-9a-f]{{8}}", workdir)
    assert result.exit_code == 0
    assert result.toplevel == "/usr"  # the fake's ./result -> /usr, resolved in the workdir
    out_lines = [line.decode() for s, line in lines if s == "out"]
    assert out_lines[:3] == ["ARG:build", "ARG:--flake", f"ARG:path:{workdir}/src#web-1.prod"]
    assert f"PWD:{workdir}/src" in out_lines
    assert {"FILE:./flake.nix", "FILE:./hosts/web 1.nix"} <= set(out_lines)
    assert ("err", b"building the system configuration...") in lines
    sys_lines = [line.decode() for s, line in lines if s == "sys"]
    assert sys_lines[0] == f"connecting to {node.user}@{node.host}:{node.port}"
    assert sys_lines[1] == f"host key verified ({node.host_key.fingerprint})"
    assert any(x.startswith(f"shipping source ({len(archive)} bytes") for x in sys_lines)
    # The logged command is the one that ran: the arguments the fake printed.
    assert f"running: nixos-rebuild build --flake {shlex.quote(f'path:{workdir}/src#web-1.prod')}" in sys_lines
    assert "exit code 0" in sys_lines and f"removed {workdir}: its outcome is read" in sys_lines
    # The loopback node is this machine: a missing profile or current system reads as none.
    assert result.before.generation == result.after.generation == generation_here()
    current = os.path.realpath(CURRENT_SYSTEM) if os.path.exists(CURRENT_SYSTEM) else ""
    assert result.before.current_system == result.after.current_system == current
    assert not os.path.exists(workdir)  # loopback node: same filesystem

    # A failing activation is a result, not an exception; workdir still removed.
    lines, out = collect()
    result = run_rebuild(
        node.target(), deployment_id=dep_id, archive=archive, attr="fail-me", action="switch", on_output=out
    )
    assert result.exit_code == 4 and result.toplevel is None
    assert ("err", b"warning: the following units failed: foo.service") in lines
    assert shipped_to(lines) != workdir  # fresh nonce per run
    assert not os.path.exists(shipped_to(lines))


@pytest.mark.parametrize("action", REBUILD_ACTIONS)
def test_every_rebuild_action_reaches_nixos_rebuild(node, action):
    lines, out = collect()
    result = run_rebuild(
        node.target(),
        deployment_id=1,
        archive=make_tar({"flake.nix": b"{}\n"}),
        attr="web",
        action=action,
        on_output=out,
    )
    assert result.exit_code == 0
    assert ("out", f"ARG:{action}".encode()) in lines


def test_invalid_arguments_are_refused_before_connecting():
    nowhere = Target("nonexistent.invalid", 22, "root", None, password="x")
    lines, out = collect()
    for attr in ("", "web;reboot", "a b", "$(id)", "`id`", "x'y", "-flag", ".hidden", "a#b", "a\nb", "a" * 101, None):
        with pytest.raises(ValueError, match="flake attribute"):
            run_rebuild(nowhere, deployment_id=1, archive=b"", attr=attr, action="switch", on_output=out)
    for action in ("switch; reboot", "rollback", "--rollback", "SWITCH", "", None):
        with pytest.raises(ValueError, match="action"):
            run_rebuild(nowhere, deployment_id=1, archive=b"", attr="web", action=action, on_output=out)
    for deployment_id in (-1, True, "1"):
        with pytest.raises(ValueError, match="deployment id"):
            run_rebuild(nowhere, deployment_id=deployment_id, archive=b"", attr="web", action="switch", on_output=out)
    assert lines == []


def test_the_shared_patterns_match_whole_values_only():
    assert FLAKE_ATTR_RE.match("web-1.prod_2") and FLAKE_ATTR_RE.match("A")
    assert COMMIT_SHA_RE.match("0123456789abcdef" * 2 + "01234567")
    # match() must not accept a trailing newline (a bare "$" would).
    for bad in ("web\n", ".web", "-web", "a" * 101):
        assert not FLAKE_ATTR_RE.match(bad)
    for bad in ("main", "A" * 40, "a" * 39, "a" * 41, "a" * 40 + "\n", "HEAD"):
        assert not COMMIT_SHA_RE.match(bad)


def test_run_rebuild_errors_are_remote_errors(node):
    lines, out = collect()
    with pytest.raises(RemoteError) as e:
        run_rebuild(node.target(host_key=None), deployment_id=1, archive=b"", attr="x", action="switch", on_output=out)
    assert e.value.kind == "host-key-missing"
    with pytest.raises(RemoteError) as e:
        run_rebuild(node.target(), deployment_id=2, archive=b"not a tar", attr="x", action="switch", on_output=out)
    assert e.value.kind == "ship"
    assert ("sys", b"cleaning up") in lines
    assert not os.path.exists(shipped_to(lines))


def test_run_rebuild_with_sudo_password_on_stdin(node):
    # A fake sudo on the session PATH checks the password it reads from stdin.
    archive = make_tar({"flake.nix": b"{}\n"})
    base = 800_000 + secrets.randbelow(10_000) * 10
    lines, out = collect()
    t = node.target(sudo=True, sudo_password=node.sudo_password)
    result = run_rebuild(t, deployment_id=base + 7, archive=archive, attr="web", action="test", on_output=out)
    assert result.exit_code == 0
    assert ("out", b"ARG:test") in lines
    assert any(s == "sys" and line.startswith(b"running: sudo -S -p '' nixos-rebuild test") for s, line in lines)
    assert not any(node.sudo_password.encode() in line for _, line in lines)

    for deployment_id, sudo_password, says in (
        (base + 8, "wrong-sudo-pw", "incorrect password"),
        (base + 9, None, "sudo -n"),
    ):
        with pytest.raises(RemoteError) as e:
            run_rebuild(
                replace(t, sudo_password=sudo_password),
                deployment_id=deployment_id,
                archive=archive,
                attr="web",
                action="test",
                on_output=out,
            )
        assert e.value.kind == "sudo" and says in e.value.message
        assert "wrong-sudo-pw" not in e.value.message
    for dep in (base + 7, base + 8, base + 9):
        assert not glob.glob(f"{WORKDIR_ROOT}-{node.user}/deploy-{dep}-*")


def test_the_next_run_removes_folders_whose_run_is_gone_and_keeps_the_others(node, tmp_path):
    parent = f"{WORKDIR_ROOT}-{node.user}"
    os.makedirs(parent, mode=0o700, exist_ok=True)
    tag = secrets.token_hex(4)

    def left_folder(name: str, owner: str | None) -> str:
        folder = f"{parent}/deploy-{name}-{tag}"
        os.makedirs(f"{folder}/sub")
        with open(f"{folder}/sub/flake.nix", "w") as f:
            f.write("{}\n")
        if owner is not None:
            with open(folder + OWNER_SUFFIX, "w") as f:
                f.write(owner + "\n")
        return folder

    gone = subprocess.Popen(["true"], start_new_session=True)
    gone.wait()  # its process group no longer exists
    alive = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        stale = left_folder("1", str(gone.pid))
        in_use = left_folder("2", str(alive.pid))
        unowned = left_folder("3", None)
        garbled = left_folder("4", "not a pid")
        lines, out = collect()
        result = run_rebuild(
            node.target(), deployment_id=5, archive=make_tar({"flake.nix": b"{}\n"}), attr="web", action="build",
            on_output=out,
        )  # fmt: skip
        assert result.exit_code == 0
        notes = [line.decode() for s, line in lines if s == "sys"]
        assert not os.path.exists(stale) and not os.path.exists(stale + OWNER_SUFFIX)
        assert f"removed {stale}, left behind by an earlier run that is no longer running" in notes
        assert os.path.exists(f"{in_use}/sub/flake.nix") and os.path.exists(in_use + OWNER_SUFFIX)
        assert any(n.startswith(f"left {in_use} in place") and f"process group {alive.pid}" in n for n in notes)
        assert os.path.exists(unowned) and os.path.exists(garbled)
        # The run's own folder and owner file are gone too.
        assert not os.path.exists(shipped_to(lines)) and not os.path.exists(shipped_to(lines) + OWNER_SUFFIX)
    finally:
        alive.kill()
        alive.wait()
        for name in ("1", "2", "3", "4"):
            shutil.rmtree(f"{parent}/deploy-{name}-{tag}", ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{parent}/deploy-{name}-{tag}{OWNER_SUFFIX}")
