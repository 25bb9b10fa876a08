"""The testbed itself: nodes behave like NixOS machines over real SSH.

The ``testbed`` fixture comes from tests/conftest.py (``from tests.support.testbed import testbed``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from tests.support.net import closing_server, refusing_address
from tests.support.testbed import (
    NamespacesUnavailable,
    NixUnavailable,
    NodeConfigSpec,
    Testbed,
    TestbedError,
    commit_change,
    git_archive,
    make_flake_repo,
    namespaces_missing_reason,
    rotate_host_key,
)
from tests.support.wait import wait_for


def needs_namespaces(tb):
    if not tb.isolated:
        pytest.skip(namespaces_missing_reason())


def needs_nix(tb):
    try:
        tb.require_nix()
    except NixUnavailable as e:
        pytest.skip(str(e))


class Result:
    def __init__(self, status: int, out: bytes, err: bytes, seconds: float):
        self.status, self.out, self.err, self.seconds = status, out, err, seconds

    @property
    def stdout(self) -> str:
        return self.out.decode()

    @property
    def stderr(self) -> str:
        return self.err.decode()


def ssh(node, command: str, *, stdin: bytes | None = None, password: bool = False) -> Result:
    """Run a command over SSH with the host key pinned; read both streams to EOF."""
    client = node.ssh_client(password=password)
    try:
        chan = client.get_transport().open_session()
        started = time.monotonic()
        chan.exec_command(command)
        if stdin is not None:
            chan.sendall(stdin)
        chan.shutdown_write()
        err_chunks: list[bytes] = []

        def read_err():
            while chunk := chan.recv_stderr(65536):
                err_chunks.append(chunk)

        reader = threading.Thread(target=read_err)
        reader.start()
        out_chunks = []
        while chunk := chan.recv(262144):
            out_chunks.append(chunk)
        reader.join()
        status = chan.recv_exit_status()
        return Result(status, b"".join(out_chunks), b"".join(err_chunks), time.monotonic() - started)
    finally:
        client.close()


def ship(node, repo, dest: str) -> None:
    """Copy the repo's HEAD into dest (under the node's home) as the panel does: git archive over SSH."""
    q = shlex.quote(f"{node.home}/{dest}")
    result = ssh(node, f"rm -rf {q} && mkdir -p {q} && tar -x -C {q}", stdin=git_archive(repo))
    assert result.status == 0, result.stderr


def rebuild(node, action: str, flake_dir: str, attr: str, password: bool = False) -> Result:
    """nixos-rebuild over SSH, in the node's home, with flake_dir relative to it."""
    home = shlex.quote(node.home)
    command = f"cd {home} && nixos-rebuild {action} --flake {home}/{flake_dir}#{attr}"
    return ssh(node, command, password=password)


def node_with_flake(testbed, flake: Path, name: str, configs=None, *, dest: str = "flake", **options):
    """A new node (skips without a Nix that builds) with a flake repository made at ``flake`` and shipped to ``dest``."""
    needs_nix(testbed)
    node = testbed.add_node(name, **options)
    make_flake_repo(flake, configs)
    ship(node, flake, dest)
    return node


@pytest.fixture
def flake(tmp_path):
    return tmp_path / "flake"


def test_make_flake_repo_returns_head_and_commit_change_a_new_one(flake):
    first = make_flake_repo(flake)
    assert len(first) == 40
    second = commit_change(flake, "devm")
    assert second != first and len(second) == 40
    assert '"version_tag": "2"' in (flake / "testbed.json").read_text()


def test_two_nodes_have_separate_stores(testbed, flake):
    needs_nix(testbed)
    needs_namespaces(testbed)
    a = testbed.add_node("stores-a")
    b = testbed.add_node("stores-b")
    make_flake_repo(flake, {"devm": NodeConfigSpec(version_tag="only-on-a")})
    ship(a, flake, "flake")

    built = rebuild(a, "build", "flake", "devm")

    assert built.status == 0, built.stderr
    path = a.run("readlink result").stdout.strip()
    assert path.startswith("/nix/store/") and path.endswith("-nixos-system-devm-24.05.testbed-only-on-a")
    assert a.run(f"test -e {path}", check=False).returncode == 0
    assert b.run(f"test -e {path}", check=False).returncode == 1
    assert a.run("hostname").stdout.strip() == "stores-a"
    assert b.run("hostname").stdout.strip() == "stores-b"
    assert a.host != b.host and a.host_key_public != b.host_key_public


def test_switch_makes_a_new_generation_and_current_system(testbed, flake):
    node = node_with_flake(testbed, flake, "switch", dest="deploy-1")
    before = node.generations()
    initial = node.current_system()

    result = rebuild(node, "switch", "deploy-1", "devm")

    assert result.status == 0, result.stderr
    assert "building the system configuration...\n" in result.stderr
    assert "activating the configuration...\n" in result.stderr
    assert "the following new units were started: testbed-devm.service" in result.stderr
    assert node.generations() == before + [before[-1] + 1 if before else 1]
    assert node.current_system() != initial
    assert node.current_system().endswith("-nixos-system-devm-24.05.testbed-1")
    assert node.system_profile() == node.current_system()
    version = node.run(f"cat {node.current_system()}/nixos-version").stdout
    assert version == "24.05.testbed-1 (Uakari)\n"
    # The closure has the toplevel and its dependency.
    closure = node.run(f"nix-store -qR {node.current_system()}").stdout.split()
    assert len(closure) >= 2


def test_switching_two_new_commits_adds_two_generations(testbed, flake):
    needs_nix(testbed)
    node = testbed.add_node("twice")
    make_flake_repo(flake)
    start = node.generations()
    systems = []
    for n in range(2):
        commit_change(flake, "devm")
        ship(node, flake, f"deploy-{n}")
        result = rebuild(node, "switch", f"deploy-{n}", "devm")
        assert result.status == 0, result.stderr
        systems.append(node.current_system())

    assert node.generations() == start + [start[-1] + 1, start[-1] + 2]
    assert systems[0] != systems[1]
    assert systems[1].endswith("testbed-3")


def test_deploying_the_same_store_path_twice_adds_no_generation(testbed, flake):
    node = node_with_flake(testbed, flake, "same")
    assert rebuild(node, "switch", "flake", "devm").status == 0
    after_first = node.generations()

    again = rebuild(node, "switch", "flake", "devm")

    assert again.status == 0, again.stderr
    assert node.generations() == after_first
    listing = ssh(node, "nixos-rebuild list-generations")
    assert listing.status == 0
    assert len(listing.stdout.splitlines()) == len(after_first)


def test_dry_activate_changes_nothing(testbed, flake):
    node = node_with_flake(testbed, flake, "dry")
    before = (node.generations(), node.current_system(), node.system_profile())

    result = rebuild(node, "dry-activate", "flake", "devm")

    assert result.status == 0, result.stderr
    assert "would activate the configuration...\n" in result.stderr
    assert "would start the following units: testbed-devm.service" in result.stderr
    assert "activating the configuration..." not in result.stderr.replace("would activate", "")
    assert (node.generations(), node.current_system(), node.system_profile()) == before


def test_failing_configuration_exits_1_with_nixos_messages(testbed, flake):
    node = node_with_flake(testbed, flake, "failing")
    before = node.generations()

    result = rebuild(node, "switch", "flake", "failing")

    assert result.status == 1
    assert "warning: the following units failed: foo.service\n" in result.stderr
    assert result.stderr.rstrip().endswith("warning: error(s) occurred while switching to the new configuration")
    # As on NixOS: the profile got the new generation and activation ran.
    assert len(node.generations()) == len(before) + 1
    assert "nixos-system-failing" in node.current_system()
    # switch-to-configuration itself exits 4.
    direct = node.run(
        '"${TESTBED_SYSTEM_PROFILE:-/nix/var/nix/profiles/system}"/bin/switch-to-configuration test',
        check=False,
    )
    assert direct.returncode == 4


def test_a_failing_build_exits_with_nix_code_and_changes_nothing(testbed, flake):
    node = node_with_flake(testbed, flake, "nobuild")
    before = (node.generations(), node.current_system())

    result = rebuild(node, "switch", "flake", "missing")

    assert result.status == 1
    assert "building the system configuration...\n" in result.stderr
    assert "does not provide attribute" in result.stderr
    assert "error(s) occurred while switching" not in result.stderr
    assert (node.generations(), node.current_system()) == before


@pytest.mark.parametrize("code", [2, 3, 100])
def test_switch_to_configuration_exit_codes(testbed, flake, code):
    node = node_with_flake(
        testbed, flake, f"exit-{code}", {"devm": NodeConfigSpec(activation_exit=code, version_tag=f"exit{code}")}
    )
    assert rebuild(node, "build", "flake", "devm").status == 0

    direct = node.run("result/bin/switch-to-configuration test", check=False)
    via_rebuild = rebuild(node, "test", "flake", "devm")

    assert direct.returncode == code
    assert via_rebuild.status == 1
    usage = node.run("result/bin/switch-to-configuration bogus", check=False)
    assert usage.returncode == 1 and "Usage:" in usage.stderr


def test_build_leaves_a_result_link_and_changes_nothing(testbed, flake):
    node = node_with_flake(testbed, flake, "build")
    before = (node.generations(), node.current_system())

    out = f"{node.home}/out"
    flake_ref = f"{node.home}/flake#devm"
    built = ssh(node, f"mkdir {out} && cd {out} && nixos-rebuild build -L --show-trace --flake {flake_ref}")

    assert built.status == 0, built.stderr
    assert node.run("readlink out/result").stdout.startswith("/nix/store/")
    assert (node.generations(), node.current_system()) == before


def test_nixos_rebuild_is_on_the_ssh_path_and_rejects_unknown_actions(testbed):
    node = testbed.add_node("usage")

    where = ssh(node, "command -v nixos-rebuild")
    bogus = ssh(node, "nixos-rebuild frobnicate --flake /nowhere#devm")
    bare = ssh(node, "nixos-rebuild")

    assert where.status == 0 and where.stdout.strip().endswith("/nixos-rebuild")
    assert bogus.status == 1 and "unknown option `frobnicate'" in bogus.stderr
    assert "Usage:" in bogus.stderr
    assert bare.status == 1 and "Usage:" in bare.stderr


def test_rollback_returns_to_the_previous_generation(testbed, flake):
    needs_namespaces(testbed)
    node = node_with_flake(testbed, flake, "rollback")
    initial = node.current_system()
    assert rebuild(node, "switch", "flake", "devm").status == 0

    result = ssh(node, "nixos-rebuild switch --rollback")

    assert result.status == 0, result.stderr
    assert node.current_system() == initial
    assert node.system_profile() == initial


def test_password_login_works_on_a_password_node(testbed, flake):
    needs_namespaces(testbed)
    node = node_with_flake(testbed, flake, "passworded", password="correct horse")

    result = rebuild(node, "switch", "flake", "devm", password=True)

    assert result.status == 0, result.stderr
    node.password = "wrong"
    with pytest.raises(paramiko.AuthenticationException):
        node.ssh_client(password=True)


def test_key_only_node_refuses_passwords(testbed):
    node = testbed.add_node("keyonly")
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(node.host, node.port, username=node.user, password="anything",
                       allow_agent=False, look_for_keys=False, timeout=10)  # fmt: skip
    client.close()


def test_rotated_host_key_is_rejected_when_the_old_one_is_pinned(testbed):
    node = testbed.add_node("rotating")
    old = node.host_key_public
    pinned = node.ssh_client()
    pinned.close()

    new = rotate_host_key(node)

    assert new != old and node.host_key_public == new
    node.host_key_public = old
    with pytest.raises(paramiko.BadHostKeyException):
        node.ssh_client()
    node.host_key_public = new
    node.ssh_client().close()


def test_unreachable_addresses_fail_fast():
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    started = time.monotonic()
    with refusing_address() as (host, port), pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        client.connect(host, port, username="root", timeout=5)
    assert time.monotonic() - started < 2
    with closing_server() as (host, port):
        with pytest.raises(paramiko.SSHException):
            client.connect(host, port, username="root", timeout=5, banner_timeout=5)


def test_extra_lines_stream_exactly_and_fast(testbed, flake):
    node = node_with_flake(testbed, flake, "chatty", {"chatty": NodeConfigSpec(extra_lines=200_000)})
    assert rebuild(node, "build", "flake", "chatty").status == 0

    result = rebuild(node, "test", "flake", "chatty")

    assert result.status == 0, result.stderr
    lines = result.out.split(b"\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    assert len(lines) == 200_000
    assert {len(line) + 1 for line in lines} == {75}
    assert lines[0].startswith(b"activation output line 000000000001 ")
    rate = len(lines) / result.seconds
    print(f"\n200000 activation lines over SSH in {result.seconds:.2f} s: {rate:,.0f} lines/s")
    assert rate > 100_000


def test_paced_lines_carry_their_timestamp(testbed, flake):
    node = node_with_flake(testbed, flake, "paced", {"paced": NodeConfigSpec(extra_lines=10, lines_per_second=20)})

    result = rebuild(node, "test", "flake", "paced")

    assert result.status == 0, result.stderr
    lines = result.out.splitlines()
    assert len(lines) == 10
    assert {len(line) + 1 for line in lines} == {75}
    stamps = [float(line.split()[0]) for line in lines]
    assert stamps == sorted(stamps)
    # 20 lines/s: the 10th line comes about 0.45 s after the first.
    assert 0.35 < stamps[-1] - stamps[0] < 2
    assert abs(stamps[-1] - time.time()) < 60


def test_slow_activation_prints_while_it_runs_and_stops_with_the_node(testbed, flake):
    node = node_with_flake(testbed, flake, "slow")
    client = node.ssh_client()
    chan = client.get_transport().open_session()
    chan.exec_command(f"nixos-rebuild test --flake {node.home}/flake#slow")
    buf = b""
    chan.settimeout(0.1)

    def second_step() -> bool:
        nonlocal buf
        with contextlib.suppress(TimeoutError):
            buf += chan.recv(4096)
        return b"step 2 of 60" in buf

    wait_for(second_step, timeout=20, interval=0, what="the second activation step")
    assert b"activation in progress: step 1 of 60\n" in buf
    assert b"step 2 of 60" in buf

    node.stop()

    chan.settimeout(10)
    while chan.recv(4096):
        pass
    assert chan.recv_exit_status() in (-1, 255) or chan.exit_status_ready()
    client.close()
    with pytest.raises(TestbedError):
        node.run("true")


def test_stopped_node_leaves_no_namespace(testbed):
    needs_namespaces(testbed)
    node = testbed.add_node("ephemeral")
    netns = Path("/run/netns") / node.netns
    assert netns.exists() and node.processes()

    node.stop()

    assert not netns.exists()


def test_a_node_lists_only_its_own_processes(testbed):
    a, b = testbed.add_node("own-a"), testbed.add_node("own-b")
    text = f"sleep 60.{secrets.randbelow(10**6):06d}"
    outside = subprocess.Popen(text.split())  # the same command line, not on any node
    try:
        a.run(f"{text} >/dev/null 2>&1 &")

        on_a = [pid for pid, cmdline in a.processes().items() if text in cmdline]

        assert on_a and outside.pid not in on_a
        assert not [pid for pid, cmdline in b.processes().items() if text in cmdline]
    finally:
        outside.kill()
        outside.wait()
        for pid, cmdline in a.processes().items():
            if text in cmdline:
                os.kill(pid, signal.SIGKILL)


def test_nodes_start_quickly(testbed):
    testbed.add_node("warmup")  # the first node builds the initial system once
    started = time.monotonic()
    for i in range(5):
        testbed.add_node(f"quick-{i}")
    per_node = (time.monotonic() - started) / 5
    print(f"\nnode start: {per_node * 1000:.0f} ms each")
    assert per_node < 1.0


def test_a_node_behind_a_bastion_is_reachable_only_through_it(tmp_path):
    """Its own testbed, to see its private bridge and route go away on close."""
    import json
    import socket

    try:
        tb = Testbed(tmp_path / "tb")
    except NamespacesUnavailable as e:
        pytest.skip(str(e))
    with tb:
        needs_namespaces(tb)
        gw = tb.add_node("gw")
        app = tb.add_node("app", behind=gw)
        other = tb.add_node("other")
        assert app.host.rsplit(".", 1)[0] != gw.host.rsplit(".", 1)[0]  # another subnet
        with pytest.raises(OSError):  # the host has no way there
            socket.create_connection((app.host, 22), timeout=3)
        probe = shlex.quote(f"exec 3<>/dev/tcp/{app.host}/22")
        probe = f"timeout 3 bash -c {probe} >/dev/null 2>&1; echo $?"
        assert gw.run(probe).stdout.strip() == "0"  # the bastion reaches it
        assert other.run(probe).stdout.strip() != "0"  # another node does not
        assert app.run("hostname").stdout.strip() == "app"
        before = gw.ssh_connections()
        client = gw.ssh_client()
        client.close()
        wait_for(lambda: gw.ssh_connections() == before + 1, timeout=5, what="the bastion's sshd to log it")
        bridge = tb._private["gw"][0]
        net = str(tb._private["gw"][1])
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout)
    assert bridge not in {link["ifname"] for link in links}
    routes = subprocess.run(["ip", "-4", "route", "show", "type", "unreachable"], capture_output=True, text=True)
    assert net not in routes.stdout
