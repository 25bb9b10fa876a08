"""remote/generations.py without a node: the listing and the target check run in a real shell over a
profile of real symlinks in a temporary folder, the parser meets noise, and nothing unquoted reaches a
command line.  (Reading and rolling back over SSH: tests/integration/test_generations_over_ssh.py.)"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess

import pytest

from deployments.remote import HostKey, Target
from deployments.remote.generations import (
    _NO_GENERATION_EXIT,
    _NO_PREVIOUS_EXIT,
    Generations,
    _listing,
    _target_check,
    check_generation,
    parse_generations,
    rollback_invocation,
    run_rollback,
)
from tests.support.keys import HOST_KEY
from tests.support.wait import wait_for


def profile_with(tmp_path, numbers: list[int], current: int | None) -> str:
    """A profile folder like /nix/var/nix/profiles: system-N-link for each number, system -> the current."""
    for n in numbers:
        store = tmp_path / "store" / f"sys-{n}"
        store.mkdir(parents=True, exist_ok=True)
        os.symlink(store, tmp_path / f"system-{n}-link")
        os.utime(tmp_path / f"system-{n}-link", (1_700_000_000 + n, 1_700_000_000 + n), follow_symlinks=False)
    if current is not None:
        os.symlink(f"system-{current}-link", tmp_path / "system")
    return str(tmp_path / "system")


def sh(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True)


def test_the_listing_reads_numbers_dates_paths_and_the_profile(tmp_path):
    profile = profile_with(tmp_path, [1, 2, 10], current=2)
    gens = parse_generations(sh(_listing(profile)).stdout)
    assert [g.number for g in gens.generations] == [1, 2, 10]  # by number, not by name (10 after 2)
    assert [g.created_at for g in gens.generations] == [1_700_000_001, 1_700_000_002, 1_700_000_010]
    assert gens.generations[2].path == str(tmp_path / "store" / "sys-10")
    assert gens.profile_generation == 2 and gens.get(2).default and not gens.get(10).default
    assert gens.previous().number == 1


def test_a_node_without_a_profile_has_no_generations(tmp_path):
    gens = parse_generations(sh(_listing(str(tmp_path / "system"))).stdout)
    assert gens.generations == [] and gens.profile_generation is None and gens.previous() is None
    assert gens.numbers() == "none"


def test_noise_around_the_listing_is_ignored():
    text = "\n".join(
        [
            "Welcome to NixOS!",
            "__NIXOS_PANEL_GEN__ 1700000001 system-1-link /nix/store/a-sys",
            "__NIXOS_PANEL_GEN__ 1700000002 system-x-link /nix/store/evil",  # not a generation link
            "__NIXOS_PANEL_GEN__ 1700000003 system-3-link relative/path",  # not a store path
            "__NIXOS_PANEL_GEN__ notatime system-2-link /nix/store/b-sys",
            "__NIXOS_PANEL_GEN_PROFILE__ system-2-link",
            "__NIXOS_PANEL_GEN_CURRENT__ /nix/store/b-sys",
            "__NIXOS_PANEL_GEN_BOOTED__ /nix/store/a-sys",
            "system-9-link /nix/store/unmarked",
        ]
    )
    gens = parse_generations(text)
    assert [(g.number, g.created_at, g.path) for g in gens.generations] == [
        (1, 1700000001, "/nix/store/a-sys"),
        (2, None, "/nix/store/b-sys"),
    ]
    assert [g.number for g in gens.generations if g.current] == [2]
    assert [g.number for g in gens.generations if g.booted] == [1]


def test_a_system_held_by_several_generations_is_marked_once():
    lines = [f"__NIXOS_PANEL_GEN__ 1 system-{n}-link /nix/store/{p}" for n, p in ((1, "a"), (2, "b"), (3, "a"))]
    # The profile's own generation holds the running system: that one is current.
    gens = parse_generations("\n".join([*lines, "__NIXOS_PANEL_GEN_PROFILE__ system-1-link"]) + "\n"
                             "__NIXOS_PANEL_GEN_CURRENT__ /nix/store/a\n__NIXOS_PANEL_GEN_BOOTED__ /nix/store/a")  # fmt: skip
    assert [g.number for g in gens.generations if g.current] == [1]
    # Otherwise the newest generation holding it.
    gens = parse_generations("\n".join([*lines, "__NIXOS_PANEL_GEN_PROFILE__ system-2-link"]) + "\n"
                             "__NIXOS_PANEL_GEN_BOOTED__ /nix/store/a")  # fmt: skip
    assert [g.number for g in gens.generations if g.booted] == [3] and not any(g.current for g in gens.generations)


def test_the_kept_form_round_trips():
    gens = parse_generations(
        "__NIXOS_PANEL_GEN__ 5 system-4-link /nix/store/d\n__NIXOS_PANEL_GEN_PROFILE__ system-4-link\n"
        "__NIXOS_PANEL_GEN_CURRENT__ /nix/store/d\n__NIXOS_PANEL_GEN_BOOTED__ \n"
    )
    assert Generations.from_dict(gens.as_dict()) == gens


@pytest.mark.parametrize(
    "numbers,current,expect",
    [([1, 3, 7], 7, 3), ([1, 3, 7], 3, 1), ([2, 5, 9], 9, 5), ([4, 12], 12, 4), ([1, 3, 7], 1, None), ([1], 1, None)],
)
def test_the_previous_generation_is_the_newest_older_than_the_profiles(tmp_path, numbers, current, expect):
    profile = profile_with(tmp_path, numbers, current)
    done = sh(_target_check(None, profile))
    if expect is None:
        assert done.returncode == _NO_PREVIOUS_EXIT and done.stdout == ""
    else:
        assert done.returncode == 0
        assert done.stdout == f"__NIXOS_PANEL_ROLLBACK_TARGET__ {expect} {tmp_path}/store/sys-{expect}\n"
        assert parse_generations(sh(_listing(profile)).stdout).previous().number == expect  # the same answer


def test_a_chosen_generation_must_exist(tmp_path):
    profile = profile_with(tmp_path, [1, 2], current=2)
    assert sh(_target_check(1, profile)).stdout.split()[1:] == ["1", f"{tmp_path}/store/sys-1"]
    assert sh(_target_check(3, profile)).returncode == _NO_GENERATION_EXIT


@pytest.mark.parametrize("bad", [0, -1, True, "1", "1; reboot", 1.0, 10**9, [1]])
def test_anything_but_a_generation_number_is_refused_before_a_command_is_built(bad):
    with pytest.raises(ValueError, match="invalid generation"):
        check_generation(bad)
    target = Target("192.0.2.1", 22, "root", HostKey.parse(HOST_KEY))
    with pytest.raises(ValueError, match="invalid generation"):
        rollback_invocation(target, bad, "switch")
    with pytest.raises(ValueError, match="invalid generation"):
        run_rollback(target, deployment_id=1, generation=bad, action="switch", on_output=lambda s, line: None)


@pytest.mark.parametrize("bad", ["test", "build", "switch; reboot", ""])
def test_only_switch_and_boot_end_a_rollback(bad):
    target = Target("192.0.2.1", 22, "root", HostKey.parse(HOST_KEY))
    with pytest.raises(ValueError, match="invalid rollback action"):
        rollback_invocation(target, 1, bad)


def test_the_invocation_goes_through_sudo_as_one_shell():
    target = Target("192.0.2.1", 22, "deploy", HostKey.parse(HOST_KEY), password="pw", sudo=True)
    command = rollback_invocation(target, 12, "boot")
    assert command.startswith("sudo -S -p '' sh -c ")
    inner = shlex.split(command)[-1]
    assert "nix-env -p /nix/var/nix/profiles/system --switch-generation 12 || exit $?" in inner
    assert "/nix/var/nix/profiles/system/bin/switch-to-configuration boot" in inner
    assert "pw" not in command
    previous = shlex.split(rollback_invocation(target, None, "switch", privileged=False))
    assert previous[:2] == ["sh", "-c"] and "--rollback" in previous[2]


def test_a_refused_sudo_stops_the_rollback_before_anything_runs(node):
    from dataclasses import replace

    from deployments.remote import RemoteError
    from deployments.remote.rebuild import WORKDIR_ROOT

    lines: list[tuple[str, bytes]] = []
    target = node.target(sudo=True, sudo_password=node.sudo_password)
    for deployment_id, password, says in ((901_001, "wrong-sudo-pw", "incorrect password"), (901_002, None, "sudo -n")):
        with pytest.raises(RemoteError) as e:
            run_rollback(
                replace(target, sudo_password=password),
                deployment_id=deployment_id,
                generation=2,
                action="switch",
                on_output=lambda s, line: lines.append((s, line)),
            )
        assert e.value.kind == "sudo" and says in e.value.message and "wrong-sudo-pw" not in e.value.message
        assert not any(line.startswith(b"running:") for _, line in lines)
        assert not glob.glob(f"{WORKDIR_ROOT}-{node.user}/deploy-{deployment_id}-*")


def test_a_read_that_hangs_on_the_node_is_stopped_and_said(node, monkeypatch):
    from deployments.remote import RemoteError, generations

    monkeypatch.setattr(generations, "list_script", lambda: "echo __NIXOS_PANEL_GEN_PROFILE__ x; exec sleep 60")
    with pytest.raises(RemoteError) as e:
        generations.read_generations(node.target(), timeout=1)
    assert e.value.kind == "protocol" and "took longer than 1 s: stopped" in e.value.message
    wait_for(lambda: not node.pids("sleep 60"), timeout=10, what="the hung read to be killed on the node")
