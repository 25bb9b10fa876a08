"""deployments.remote.closure against the suite's test sshd: data for a root command on a sudo node reaches
it whole, whether sudo reads the password line or not. (Copies and diffs between real Nix stores:
tests/integration/test_change_over_ssh.py.)"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from deployments.remote.closure import privileged_with_stdin
from deployments.remote.connection import Connection
from deployments.remote.stream import run_command


def send(target, script: str, data: bytes) -> tuple[int, list[bytes]]:
    err: list[bytes] = []
    with Connection(target) as conn:
        code = run_command(
            conn,
            privileged_with_stdin(target, script),
            lambda s, line: err.append(line) if s == "err" else None,
            stdin=(target.privileged_stdin() or b"") + data,
        )
    return code, err


@pytest.mark.parametrize("sudo_reads_the_password", [True, False], ids=["password", "nopasswd"])
def test_the_data_reaches_the_root_command_whole(node, tmp_path, sudo_reads_the_password):
    target = node.target(sudo=True, sudo_password=node.sudo_password)
    data = os.urandom(300_000) + b"\nlast line without a newline"
    out = tmp_path / "received"
    marker = node.bindir / "nopasswd"
    if not sudo_reads_the_password:
        marker.write_text("")
    try:
        code, err = send(target, f"cat > {out}", data)
    finally:
        marker.unlink(missing_ok=True)
    assert code == 0, err
    assert out.read_bytes() == data  # not a byte of the password line, none of the data lost


def test_a_refused_sudo_ends_the_command_with_its_status(node, tmp_path):
    target = node.target(sudo=True, sudo_password="wrong-sudo-pw")
    out = tmp_path / "received"
    code, err = send(target, f"cat > {out}", b"data\n" * 10_000)
    assert code == 1 and any(b"incorrect password" in line for line in err)
    assert not out.exists()


def test_without_a_sudo_password_the_command_runs_under_sudo_n(node, tmp_path):
    target = replace(node.target(sudo=True), sudo_password=None)
    code, err = send(target, f"cat > {tmp_path / 'x'}", b"data\n")
    assert code == 1 and any(b"a password is required" in line for line in err)
    assert privileged_with_stdin(node.target(), "true") == "sh -c true"  # root needs no sudo
