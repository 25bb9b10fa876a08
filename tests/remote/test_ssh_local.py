"""deployments.remote against a real, throwaway OpenSSH server on 127.0.0.1.

The module fixture starts `/usr/sbin/sshd -D` with its own config, host key,
pid file and authorized-keys directory (nothing of the machine's own sshd or
~/.ssh is touched). As root it also creates a throwaway password user.
A fake `nixos-rebuild` (prints its arguments) is put first on the session PATH
via sshd's SetEnv, so run_rebuild can be tested end to end without NixOS.
"""

from __future__ import annotations

import getpass
import glob
import io
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import paramiko
import pytest

from deployments.remote import (
    Cancelled,
    Connection,
    HostKey,
    RemoteError,
    Target,
    build_command,
    key_fingerprint,
    load_private_key,
    read_system_state,
    remote_workdir,
    run_rebuild,
    scan_host_key,
    validate_action,
    validate_attr,
    validate_rev,
)
from tests.testbed import free_port, node_processes, refusing_address

SSHD = "/usr/sbin/sshd"
IS_ROOT = os.geteuid() == 0

pytestmark = [
    pytest.mark.skipif(not os.path.exists(SSHD), reason="OpenSSH server (/usr/sbin/sshd) not installed"),
    pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed"),
    pytest.mark.timeout(120),
]

FAKE_NIXOS_REBUILD = r"""#!/bin/sh
# Stand-in for nixos-rebuild: shows what it was given and where it ran.
echo "building the system configuration..." >&2
for a in "$@"; do printf 'ARG:%s\n' "$a"; done
printf 'PWD:%s\n' "$PWD"
ls -1A | sed 's/^/FILE:/'
case "$3" in
  *'#fail-me') echo "warning: the following units failed: foo.service" >&2; exit 4 ;;
esac
if [ "$1" = build ]; then ln -s /usr result; fi
echo "done" >&2
exit 0
"""


FAKE_SUDO = r"""#!/bin/sh
# Stand-in for sudo (not installed here): -n always needs a password; -S -p '' reads one line.
if [ "$1" = "-n" ]; then echo "sudo: a password is required" >&2; exit 1; fi
if [ "$1" = "-S" ] && [ "$2" = "-p" ]; then
  shift 3
  IFS= read -r pw || pw=
  if [ "$pw" != "$(cat "$(dirname "$0")/sudo-password")" ]; then
    echo "sudo: 1 incorrect password attempt" >&2; exit 1
  fi
  exec "$@"
fi
echo "fake sudo: unexpected arguments: $*" >&2; exit 2
"""


def wait_until(pred, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def keygen(path: Path, kind: str, passphrase: str = "") -> tuple[str, str]:
    args = ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "", "-f", str(path)]
    if kind == "rsa":
        args[4:4] = ["-b", "2048"]
    subprocess.run(args, check=True)
    return path.read_text(), Path(str(path) + ".pub").read_text().strip()


def ssh_keygen_fingerprint(pub_path: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(pub_path)], check=True, capture_output=True, text=True).stdout
    return out.split()[1]


@dataclass
class Node:
    host: str
    port: int
    user: str
    host_key: HostKey
    host_key_pub: Path
    keys: dict = field(default_factory=dict)  # name -> (private text, pub path)
    proc: subprocess.Popen | None = None
    password_user: str | None = None
    password: str | None = None
    passphrase: str = ""
    unauthorized_key: str = ""
    sudo_password: str = ""
    session_marker: str = field(default_factory=lambda: "PANEL_TEST_NODE=" + secrets.token_hex(8))

    def pids(self, text: str) -> list[int]:
        """Pids of this sshd's own processes (sessions, and orphans of its sessions) whose command line has ``text``."""
        found = node_processes(below=self.proc.pid, environ=self.session_marker)
        return [pid for pid, cmdline in found.items() if text in cmdline]

    def target(self, key: str = "ed25519", **kw) -> Target:
        t = Target(self.host, self.port, self.user, self.host_key, private_key=self.keys[key][0])
        if key == "ed25519-enc":
            t.passphrase = self.passphrase
        return replace(t, **kw) if kw else t


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o755)
    _, host_pub = keygen(d / "host_ed25519", "ed25519")
    host_key = HostKey.parse(host_pub)

    user = "root" if IS_ROOT else getpass.getuser()
    cleanup_dirs: list[Path] = []
    n = Node(
        "127.0.0.1",
        free_port(),
        user,
        host_key,
        d / "host_ed25519.pub",
        passphrase="correct horse " + secrets.token_hex(4),
    )
    pubs = []
    for name, kind, pw in (
        ("ed25519", "ed25519", ""),
        ("rsa", "rsa", ""),
        ("ecdsa", "ecdsa", ""),
        ("ed25519-enc", "ed25519", n.passphrase),
    ):
        priv, pub = keygen(d / f"client_{name}", kind, pw)
        n.keys[name] = (priv, Path(d / f"client_{name}.pub"))
        pubs.append(pub)
    n.unauthorized_key, _ = keygen(d / "client_stranger", "ed25519")

    ak = d / "authorized_keys"
    ak.mkdir(mode=0o755)
    (ak / user).write_text("\n".join(pubs) + "\n")

    bindir = d / "bin"
    bindir.mkdir(mode=0o755)
    (bindir / "nixos-rebuild").write_text(FAKE_NIXOS_REBUILD)
    os.chmod(bindir / "nixos-rebuild", 0o755)
    (bindir / "sudo").write_text(FAKE_SUDO)
    os.chmod(bindir / "sudo", 0o755)
    n.sudo_password = "sudo-" + secrets.token_hex(8)
    (bindir / "sudo-password").write_text(n.sudo_password + "\n")

    if IS_ROOT:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        n.password_user = "paneltest" + secrets.token_hex(3)
        n.password = "pw-" + secrets.token_hex(8)
        # Outside pytest's 0700 tmp tree, or sshd cannot chdir there as that user.
        home = Path(tempfile.mkdtemp(prefix="paneltest-home-"))
        cleanup_dirs.append(home)
        subprocess.run(
            ["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh", n.password_user],
            check=True,
        )
        shutil.chown(home, n.password_user)
        subprocess.run(["chpasswd"], input=f"{n.password_user}:{n.password}\n", text=True, check=True)

    cfg = d / "sshd_config"
    cfg.write_text(
        f"""
Port {n.port}
ListenAddress 127.0.0.1
HostKey {d}/host_ed25519
PidFile {d}/sshd.pid
AuthorizedKeysFile {ak}/%u
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication {"yes" if IS_ROOT else "no"}
KbdInteractiveAuthentication no
MaxStartups 50
MaxSessions 50
LogLevel VERBOSE
SetEnv PATH={bindir}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin {n.session_marker}
Subsystem sftp /usr/lib/openssh/sftp-server
"""
    )
    log = open(d / "sshd.log", "wb")
    n.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)

    def ready():
        if n.proc.poll() is not None:
            raise AssertionError("sshd exited:\n" + (d / "sshd.log").read_text())
        try:
            with socket.create_connection((n.host, n.port), timeout=1) as s:
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    try:
        wait_until(ready, 10, what="test sshd to accept connections")
        yield n
    finally:
        n.proc.terminate()
        try:
            n.proc.wait(5)
        except subprocess.TimeoutExpired:
            n.proc.kill()
        log.close()
        if n.password_user:
            subprocess.run(["userdel", n.password_user], check=False, capture_output=True)
        for p in cleanup_dirs:
            shutil.rmtree(p, ignore_errors=True)


def collect():
    lines: list[tuple[str, bytes]] = []
    return lines, lambda stream, line: lines.append((stream, line))


# ----------------------------------------------------------------- host keys


def test_scan_host_key_matches_ssh_keygen(node):
    key = scan_host_key(node.host, node.port, timeout=5)
    assert key == node.host_key
    assert key.key_type == "ssh-ed25519"
    assert key.openssh == node.host_key_pub.read_text().split()[0] + " " + node.host_key_pub.read_text().split()[1]
    assert key.fingerprint == ssh_keygen_fingerprint(node.host_key_pub)


def test_host_key_parse_forms_and_junk(node):
    pub = node.host_key_pub.read_text().strip()
    assert HostKey.parse(pub) == node.host_key
    assert HostKey.parse(f"[127.0.0.1]:{node.port} {pub}") == node.host_key  # ssh-keyscan / known_hosts
    assert HostKey.parse("# comment\n" + pub + " some comment") == node.host_key
    for junk in ("", "hello", "ssh-ed25519 not-base64!!", "ssh-rsa " + node.host_key.base64, "ssh-dss AAAAB3Nza"):
        with pytest.raises(ValueError):
            HostKey.parse(junk)


def test_scan_errors():
    with pytest.raises(RemoteError) as e:
        scan_host_key("nonexistent.invalid", 22, timeout=5)
    assert e.value.kind == "unknown-host"
    with refusing_address() as (host, port), pytest.raises(RemoteError) as e:
        scan_host_key(host, port, timeout=5)
    assert e.value.kind == "unreachable"


# ----------------------------------------------------------------- connect / auth


@pytest.mark.parametrize("key", ["ed25519", "rsa", "ecdsa", "ed25519-enc"])
def test_pinned_key_login_with_each_key_type(node, key):
    lines, out = collect()
    t0 = time.monotonic()
    with Connection(node.target(key)) as conn:
        connect_s = time.monotonic() - t0
        assert conn.run("echo hello; id -un", out) == 0
    assert lines == [("out", b"hello"), ("out", node.user.encode())]
    assert connect_s < 5


def test_wrong_pinned_key_is_a_mismatch_naming_both_fingerprints(node, tmp_path):
    _, other_pub = keygen(tmp_path / "other", "ed25519")
    other = HostKey.parse(other_pub)
    with pytest.raises(RemoteError) as e:
        Connection(node.target(host_key=other)).open()
    assert e.value.kind == "host-key-mismatch"
    assert other.fingerprint in e.value.message
    assert node.host_key.fingerprint in e.value.message
    assert f"{node.host}:{node.port}" in e.value.message


def test_pinned_key_of_another_type_is_a_mismatch(node, tmp_path):
    # The server only has ed25519; we pinned an RSA key: it must not be accepted.
    _, rsa_pub = keygen(tmp_path / "other_rsa", "rsa")
    pinned = HostKey.parse(rsa_pub)
    with pytest.raises(RemoteError) as e:
        Connection(node.target(host_key=pinned)).open()
    assert e.value.kind == "host-key-mismatch"
    assert pinned.fingerprint in e.value.message and node.host_key.fingerprint in e.value.message


def test_missing_pinned_key(node):
    with pytest.raises(RemoteError) as e:
        Connection(node.target(host_key=None)).open()
    assert e.value.kind == "host-key-missing"


def test_refused_login_is_auth(node):
    t = Target(node.host, node.port, node.user, node.host_key, private_key=node.unauthorized_key)
    with pytest.raises(RemoteError) as e:
        Connection(t).open()
    assert e.value.kind == "auth"
    assert node.user in e.value.message


def test_unknown_host_and_closed_port():
    hk = HostKey.parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHAlM0yNmeVN1XCm8+N+f2E4mbSmTHcSWdHnGEB1qhlA")
    with pytest.raises(RemoteError) as e:
        Connection(Target("nonexistent.invalid", 22, "root", hk, password="x")).open()
    assert e.value.kind == "unknown-host"
    assert "nonexistent.invalid" in e.value.message
    with refusing_address() as (host, port), pytest.raises(RemoteError) as e:
        Connection(Target(host, port, "root", hk, password="x", connect_timeout=3)).open()
    assert e.value.kind == "unreachable"
    assert str(port) in e.value.message


@pytest.mark.skipif(not IS_ROOT, reason="password login needs a throwaway user (root only)")
def test_password_login_and_secret_hygiene(node):
    t = Target(node.host, node.port, node.password_user, node.host_key, password=node.password)
    lines, out = collect()
    with Connection(t) as conn:
        assert conn.run("id -un", out) == 0
    assert lines == [("out", node.password_user.encode())]

    bad = replace(t, password="wrong-" + node.password)
    with pytest.raises(RemoteError) as e:
        Connection(bad).open()
    assert e.value.kind == "auth"
    assert bad.password not in e.value.message and bad.password not in repr(e.value)


def test_secrets_absent_from_repr_and_errors(node):
    t = node.target("ed25519-enc", password="s3cret-pw", sudo=True, sudo_password="sudo-s3cret")
    for text in (repr(t), str(t), repr(Connection(t))):
        assert "s3cret" not in text
        assert node.passphrase not in text
        assert "PRIVATE KEY" not in text and t.private_key.splitlines()[1][:20] not in text
    wrong = replace(t, passphrase="wrong-passphrase-xyz", host_key=node.host_key)
    with pytest.raises(RemoteError) as e:
        Connection(wrong).open()
    assert e.value.kind == "auth"
    assert "wrong-passphrase-xyz" not in e.value.message and "s3cret" not in e.value.message
    assert "passphrase" in e.value.message


# ----------------------------------------------------------------- private keys


def test_private_key_loading_and_fingerprints(node):
    for name, (priv, pub_path) in node.keys.items():
        pp = node.passphrase if name == "ed25519-enc" else None
        assert key_fingerprint(priv, pp) == ssh_keygen_fingerprint(pub_path)
    enc = node.keys["ed25519-enc"][0]
    with pytest.raises(ValueError, match="passphrase is required"):
        load_private_key(enc)
    with pytest.raises(ValueError, match="wrong passphrase") as e:
        load_private_key(enc, "nope-not-it")
    assert "nope-not-it" not in str(e.value)
    with pytest.raises(ValueError, match="not a valid private key"):
        load_private_key("-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n-----END OPENSSH PRIVATE KEY-----\n")
    # A passphrase stored for an unencrypted key is ignored, not an error.
    assert isinstance(load_private_key(node.keys["ed25519"][0], "unused"), paramiko.Ed25519Key)
    assert isinstance(load_private_key(node.keys["rsa"][0]), paramiko.RSAKey)
    assert isinstance(load_private_key(node.keys["ecdsa"][0]), paramiko.ECDSAKey)


# ----------------------------------------------------------------- streaming


def test_streaming_throughput_no_loss_in_order(node):
    n = 200_000
    cmd = f"seq -f '%074.0f' 1 {n}"  # 74 digits + newline = 75 bytes a line
    with Connection(node.target()) as conn:
        got: list[bytes] = []
        append = got.append
        t0 = time.perf_counter()
        code = conn.run(cmd, lambda stream, line: append(line))
        ours = time.perf_counter() - t0

        # Bare paramiko on the same connection, as the reference ceiling.
        t0 = time.perf_counter()
        chan = conn.transport.open_session()
        chan.exec_command(cmd)
        buf = bytearray()
        while True:
            data = chan.recv(65536)
            if not data:
                break
            buf += data
        bare_code = chan.recv_exit_status()
        bare = time.perf_counter() - t0
        chan.close()

    assert code == 0 and bare_code == 0
    assert len(got) == n
    assert all(len(line) == 74 for line in got)
    assert [int(x) for x in got] == list(range(1, n + 1))
    assert buf.count(b"\n") == n
    ours_rate, bare_rate = n / ours, n / bare
    print(
        f"\nstreaming {n} lines x 75 B: Connection.run {ours_rate:,.0f} lines/s ({ours:.3f} s); "
        f"bare paramiko {bare_rate:,.0f} lines/s ({bare:.3f} s)"
    )
    # Loose bounds: shared CI machines are noisy; the figures above are the real result.
    assert ours_rate > 0.4 * bare_rate
    assert ours_rate > 100_000


def test_stdout_stderr_separated_ordered_and_partial_lines(node):
    lines, out = collect()
    cmd = (
        "echo o1; sleep 0.05; echo e1 >&2; sleep 0.05; echo o2; sleep 0.05; "
        "printf 'e2\\ne3\\n' >&2; sleep 0.05; printf 'o-partial'; sleep 0.05; printf 'e-partial' >&2; exit 3"
    )
    with Connection(node.target()) as conn:
        assert conn.run(cmd, out) == 3
    assert lines[:5] == [("out", b"o1"), ("err", b"e1"), ("out", b"o2"), ("err", b"e2"), ("err", b"e3")]
    assert sorted(lines[5:]) == [("err", b"e-partial"), ("out", b"o-partial")]
    assert not any(b"PGID" in line for _, line in lines)


def test_stdin_is_fed_and_closed(node):
    lines, out = collect()
    with Connection(node.target()) as conn:
        assert conn.run("cat; echo end", out, stdin=b"one\ntwo") == 0
        assert conn.run("cat; echo end2", out) == 0  # no stdin: EOF at once, no hang
    assert lines == [("out", b"one"), ("out", b"twoend"), ("out", b"end2")]


def test_read_output(node):
    with Connection(node.target()) as conn:
        assert conn.read_output("printf 'a\\nb\\n'") == "a\nb"
        with pytest.raises(RemoteError) as e:
            conn.read_output("echo boom >&2; exit 2")
    assert e.value.kind == "protocol" and "boom" in e.value.message and "exit 2" in e.value.message


def test_cancel_kills_the_remote_process_group(node):
    marker = f"sleep 100.{secrets.randbelow(10**6):06d}"
    lines: list = []
    cancel = {"now": False}

    def out(stream, line):
        lines.append((stream, line))
        if line == b"started":
            cancel["now"] = True

    with Connection(node.target()) as conn:
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            conn.run(f"{marker} & echo started; wait; echo never", out, should_cancel=lambda: cancel["now"], poll=0.05)
        assert time.monotonic() - t0 < 4  # SIGTERM sufficed; no 5 s KILL grace needed
        # The connection stays usable after a cancel.
        assert conn.read_output("echo still-here") == "still-here"
    wait_until(lambda: not node.pids(marker), 5, what="remote sleep to be gone")
    assert ("out", b"never") not in lines


def test_cancel_escalates_to_kill_when_term_is_ignored(node, monkeypatch):
    import deployments.remote.ssh as ssh_mod

    monkeypatch.setattr(ssh_mod, "CANCEL_GRACE_SECONDS", 0.5)
    marker = f"sleep 101.{secrets.randbelow(10**6):06d}"
    flag = {"now": False}

    def out(stream, line):
        if line == b"started":
            flag["now"] = True

    with Connection(node.target()) as conn:
        with pytest.raises(Cancelled):
            conn.run(f"trap '' TERM; {marker} & echo started; wait", out, should_cancel=lambda: flag["now"], poll=0.05)
    wait_until(lambda: not node.pids(marker), 5, what="remote sleep to be gone")


def test_dropped_connection_is_disconnected(node):
    marker = f"sleep 77.{secrets.randbelow(10**6):06d}"
    killed: list[int] = []

    def out(stream, line):
        if line == b"started" and not killed:
            # Kill this connection's sshd processes (those below the listening sshd).
            for pid, cmdline in node_processes(below=node.proc.pid).items():
                if cmdline.startswith(("sshd: ", "sshd-session: ")):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

    conn = Connection(node.target())
    conn.open()
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as e:
            conn.run(f"echo started; {marker}; echo never", out)
        assert e.value.kind == "disconnected"
        assert killed
        assert time.monotonic() - t0 < 10
        with pytest.raises(RemoteError) as e2:
            conn.run("true", out)
        assert e2.value.kind == "disconnected"
    finally:
        conn.close()
        for pid in node.pids(marker):  # the orphaned remote sleep
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------- validation / quoting


def test_validators_reject_shell_metacharacters():
    for ok in ("web-1", "host_2.example", "A"):
        assert validate_attr(ok) == ok
    for bad in ("", "web;reboot", "a b", "$(id)", "`id`", "x'y", "-flag", ".hidden", "a#b", "a\nb", "a" * 101, None):
        with pytest.raises(ValueError):
            validate_attr(bad)
    for action in ("switch", "boot", "test", "dry-activate", "build"):
        assert validate_action(action) == action
    for bad in ("switch; reboot", "rollback", "--rollback", "SWITCH", ""):
        with pytest.raises(ValueError, match="action"):
            validate_action(bad)
    assert validate_rev("a" * 40) == "a" * 40
    for bad in ("main", "A" * 40, "a" * 39, "a" * 40 + "\n", "HEAD"):
        with pytest.raises(ValueError, match="revision"):
            validate_rev(bad)
    hk = HostKey.parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHAlM0yNmeVN1XCm8+N+f2E4mbSmTHcSWdHnGEB1qhlA")
    with pytest.raises(ValueError):
        build_command(Target("h", 22, "root", hk), "switch", "/tmp/nixos-panel-root/deploy-1", "x;reboot")
    with pytest.raises(ValueError):
        build_command(Target("h", 22, "root", hk), "switch; reboot", "/tmp/nixos-panel-root/deploy-1", "x")


def test_quoted_values_arrive_literally(node):
    weird = "a b'c\"d $(echo pwned) `id` ; | & > < * ? \\ \t end"
    lines, out = collect()
    with Connection(node.target()) as conn:
        assert conn.run(f"printf '%s\\n' {shlex.quote(weird)}", out) == 0
    assert lines == [("out", weird.encode())]


# ----------------------------------------------------------------- files


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


def test_put_archive_then_ls_and_remove(node, tmp_path):
    archive = make_tar({"flake.nix": b"{ outputs = _: {}; }\n", "hosts/web 1.nix": b"{}\n"})
    workdir = f"/tmp/nixos-panel-test-{secrets.token_hex(4)}/deploy-1"
    with Connection(node.target()) as conn:
        conn.put_archive(archive, workdir)
        assert (
            conn.read_output(f"cd {shlex.quote(workdir)} && find . -type f | sort") == "./flake.nix\n./hosts/web 1.nix"
        )
        # From a local path too, replacing what was there.
        p = tmp_path / "src.tar"
        p.write_bytes(make_tar({"other.txt": b"x"}))
        conn.put_archive(str(p), workdir)
        assert conn.read_output(f"ls -A {shlex.quote(workdir)}") == "other.txt"
        # No temp upload file left behind.
        parent = os.path.dirname(workdir)
        assert conn.read_output(f"ls -A {shlex.quote(parent)}") == "deploy-1"
        conn.remove_dir(workdir)
        assert conn.read_output(f"test -e {shlex.quote(workdir)} && echo yes || echo no") == "no"
        conn.remove_dir(parent)
        with pytest.raises(ValueError):
            conn.remove_dir("/")
        with pytest.raises(ValueError):
            conn.remove_dir("/tmp")
        with pytest.raises(RemoteError) as e:
            conn.put_archive(b"this is not a tar archive", workdir)
        assert e.value.kind == "ship"
        conn.remove_dir(parent)


# ----------------------------------------------------------------- run_rebuild


def test_run_rebuild_end_to_end_with_fake_nixos_rebuild(node):
    archive = make_tar({"flake.nix": b"{}\n", "configuration.nix": b"{}\n"})
    dep_id = 900_000 + secrets.randbelow(10_000)
    lines, out = collect()
    result = run_rebuild(
        node.target(), deployment_id=dep_id, archive=archive, attr="web-1.prod", action="build", on_output=out
    )
    workdir = shipped_to(lines)
    assert workdir.startswith(remote_workdir(dep_id, node.user) + "-")
    assert result.exit_code == 0
    assert result.toplevel == "/usr"  # the fake's ./result -> /usr, resolved in the workdir
    out_lines = [line.decode() for s, line in lines if s == "out"]
    assert out_lines[:3] == ["ARG:build", "ARG:--flake", f"ARG:path:{workdir}#web-1.prod"]
    assert f"PWD:{workdir}" in out_lines
    assert {"FILE:flake.nix", "FILE:configuration.nix"} <= set(out_lines)
    assert ("err", b"building the system configuration...") in lines
    sys_lines = [line.decode() for s, line in lines if s == "sys"]
    assert sys_lines[0] == f"connecting to {node.user}@{node.host}:{node.port}"
    assert sys_lines[1] == f"host key verified ({node.host_key.fingerprint})"
    assert any(x.startswith(f"shipping source ({len(archive)} bytes") for x in sys_lines)
    assert any(x.startswith("running: ") and "nixos-rebuild build --flake" in x for x in sys_lines)
    assert "exit code 0" in sys_lines and "cleaning up" in sys_lines
    assert isinstance(result.before.generation, (int, type(None)))
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

    with pytest.raises(ValueError):
        run_rebuild(node.target(), deployment_id=dep_id, archive=archive, attr="x;y", action="switch", on_output=out)


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


def test_read_system_state_tolerates_missing_links(node):
    with Connection(node.target()) as conn:
        state = read_system_state(conn)
    expected_gen = None
    link = "/nix/var/nix/profiles/system"
    if os.path.islink(link):
        name = os.readlink(link)
        if name.startswith("system-") and name.endswith("-link"):
            expected_gen = int(name.split("-")[1])
    assert state.generation == expected_gen
    assert state.current_system == (
        os.path.realpath("/run/current-system") if os.path.exists("/run/current-system") else ""
    )


def test_run_rebuild_with_sudo_password_on_stdin(node):
    # A fake sudo on the session PATH checks the password it reads from stdin.
    archive = make_tar({"flake.nix": b"{}\n"})
    base = 800_000 + secrets.randbelow(10_000) * 10
    lines, out = collect()
    t = node.target(sudo=True, sudo_password=node.sudo_password)
    result = run_rebuild(t, deployment_id=base + 7, archive=archive, attr="web", action="test", on_output=out)
    assert result.exit_code == 0
    assert ("out", b"ARG:test") in lines
    assert any(s == "sys" and b"sudo -S -p '' nixos-rebuild test" in line for s, line in lines)
    assert not any(node.sudo_password.encode() in line for _, line in lines)

    with pytest.raises(RemoteError) as e:
        run_rebuild(
            replace(t, sudo_password="wrong-sudo-pw"),
            deployment_id=base + 8,
            archive=archive,
            attr="web",
            action="test",
            on_output=out,
        )
    assert e.value.kind == "sudo" and "incorrect password" in e.value.message
    assert "wrong-sudo-pw" not in e.value.message
    with pytest.raises(RemoteError) as e:
        run_rebuild(
            replace(t, sudo_password=None),
            deployment_id=base + 9,
            archive=archive,
            attr="web",
            action="test",
            on_output=out,
        )
    assert e.value.kind == "sudo" and "sudo -n" in e.value.message
    for dep in (base + 7, base + 8, base + 9):
        assert not glob.glob(remote_workdir(dep, node.user) + "-*")
