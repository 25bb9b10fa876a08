"""A real, throwaway OpenSSH server on 127.0.0.1 for the deployments.remote tests.

It runs `/usr/sbin/sshd -D` with its own config, host key, pid file and
authorized-keys directory (nothing of the machine's own sshd or ~/.ssh is
touched). As root it also creates a throwaway password user. A fake
`nixos-rebuild` (prints its arguments and the files it was given) and a fake
`sudo` are put first on the session PATH via sshd's SetEnv, so run_rebuild can
be tested end to end without NixOS.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from deployments.remote import HostKey, Target
from tests.helpers import wait_for
from tests.testbed import free_port, node_processes

SSHD = "/usr/sbin/sshd"
IS_ROOT = os.geteuid() == 0

FAKE_NIXOS_REBUILD = r"""#!/bin/sh
# Stand-in for nixos-rebuild: shows what it was given and where it ran.
echo "building the system configuration..." >&2
for a in "$@"; do printf 'ARG:%s\n' "$a"; done
printf 'PWD:%s\n' "$PWD"
find . -type f | sort | sed 's/^/FILE:/'
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


def missing_tools() -> str | None:
    """Why these tests cannot run here, or None."""
    if not os.path.exists(SSHD):
        return f"OpenSSH server ({SSHD}) not installed"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen not installed"
    return None


def keygen(path: Path, kind: str, passphrase: str = "") -> tuple[str, str]:
    """Write a key pair with ssh-keygen; return (private key text, public key line)."""
    args = ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "", "-f", str(path)]
    if kind == "rsa":
        args[4:4] = ["-b", "2048"]
    subprocess.run(args, check=True)
    return path.read_text(), Path(str(path) + ".pub").read_text().strip()


def ssh_keygen_fingerprint(pub_path: Path) -> str:
    """The fingerprint `ssh-keygen -lf` prints for a public key file."""
    out = subprocess.run(["ssh-keygen", "-lf", str(pub_path)], check=True, capture_output=True, text=True).stdout
    return out.split()[1]


def collect():
    """(lines, on_output): on_output appends each (stream, line) to lines."""
    lines: list[tuple[str, bytes]] = []
    return lines, lambda stream, line: lines.append((stream, line))


@dataclass
class Sshd:
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

    def session_pids(self) -> list[int]:
        """Pids of this sshd's per-connection processes (not the listener)."""
        found = node_processes(below=self.proc.pid)
        return [pid for pid, cmdline in found.items() if cmdline.startswith(("sshd: ", "sshd-session: "))]

    def target(self, key: str = "ed25519", **kw) -> Target:
        t = Target(self.host, self.port, self.user, self.host_key, private_key=self.keys[key][0])
        if key == "ed25519-enc":
            t.passphrase = self.passphrase
        return replace(t, **kw) if kw else t


@contextlib.contextmanager
def running_sshd(d: Path):
    """Start an sshd whose files live in ``d``; yield its Sshd; stop it and remove what it added."""
    os.chmod(d, 0o755)
    _, host_pub = keygen(d / "host_ed25519", "ed25519")
    user = "root" if IS_ROOT else getpass.getuser()
    cleanup_dirs: list[Path] = []
    n = Sshd(
        "127.0.0.1",
        free_port(),
        user,
        HostKey.parse(host_pub),
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
        wait_for(ready, 10, interval=0.02, what="test sshd to accept connections")
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
