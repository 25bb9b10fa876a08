"""The deployments.remote tests' server: the suite's test sshd (tests/support/sshd.py) on 127.0.0.1.

It gets a client key of every kind, stand-ins for ``nixos-rebuild`` (prints its
arguments and the files it was given) and ``sudo`` first on the session PATH,
so run_rebuild can be tested end to end without NixOS, and, as root, a
throwaway password user.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from deployments.remote import HostKey, Target
from tests.support.keys import client_keys, keygen
from tests.support.net import free_port
from tests.support.processes import matching, processes_of, sshd_sessions
from tests.support.sshd import sshd_command, sshd_config, start_sshd, stop_sshd

IS_ROOT = os.geteuid() == 0

FAKE_NIXOS_REBUILD = r"""#!/bin/sh
# Stand-in for nixos-rebuild: shows what it was given and where it ran.
echo "building the system configuration..." >&2
for a in "$@"; do printf 'ARG:%s\n' "$a"; done
printf 'PWD:%s\n' "$PWD"
find . -type f | sort | sed 's/^/FILE:/'
case "$3" in
  *'#fail-me') echo "warning: the following units failed: foo.service" >&2; exit 4 ;;
  *'#lines-'*)  # <n> lines on each stream, 40 a second, the last stdout one without a newline
    n=${3##*#lines-}; i=1
    while [ "$i" -le "$n" ]; do echo "out line $i"; echo "err line $i" >&2; sleep 0.025; i=$((i + 1)); done
    printf 'last words'; exit 3 ;;
  *'#hang-'*) echo "hanging" >&2; exec sleep "${3##*#hang-}" ;;
esac
if [ "$1" = build ]; then ln -s /usr result; fi
echo "done" >&2
exit 0
"""

FAKE_SUDO = r"""#!/bin/sh
# Stand-in for sudo (not installed here): -n always needs a password; -S -p '' reads one line. With a
# file "nopasswd" beside it (a NOPASSWD rule), -S -p '' reads nothing, as sudo does then.
if [ "$1" = "-n" ]; then echo "sudo: a password is required" >&2; exit 1; fi
if [ "$1" = "-S" ] && [ "$2" = "-p" ] && [ -e "$(dirname "$0")/nopasswd" ]; then shift 3; exec "$@"; fi
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


def collect():
    """(lines, on_output): on_output appends each (stream, line) to lines."""
    lines: list[tuple[str, bytes]] = []
    return lines, lambda stream, line: lines.append((stream, line))


@dataclass
class Server:
    host: str
    port: int
    user: str
    host_key: HostKey
    host_key_pub: Path
    keys: dict = field(default_factory=dict)  # name -> (private text, public line, pub path)
    proc: subprocess.Popen | None = None
    password_user: str | None = None
    password: str | None = None
    passphrase: str = ""
    unauthorized_key: str = ""
    sudo_password: str = ""
    bindir: Path | None = None  # the session PATH's stand-ins (nixos-rebuild, sudo)
    session_marker: str = field(default_factory=lambda: "PANEL_TEST_NODE=" + secrets.token_hex(8))

    def pids(self, text: str) -> list[int]:
        """Pids of this sshd's own processes (sessions, and orphans of its sessions) whose command line has ``text``."""
        return matching(processes_of(below=self.proc.pid, environ=self.session_marker), text)

    def session_pids(self) -> list[int]:
        """Pids of this sshd's per-connection processes (not the listener)."""
        return sshd_sessions(processes_of(below=self.proc.pid))

    def target(self, key: str = "ed25519", **kw) -> Target:
        t = Target(self.host, self.port, self.user, self.host_key, private_key=self.keys[key][0])
        if key == "ed25519-enc":
            t.passphrase = self.passphrase
        return replace(t, **kw) if kw else t


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o755)


@contextlib.contextmanager
def running_server(d: Path):
    """Start the server with its files in ``d``; yield its Server; stop it and remove what it added."""
    os.chmod(d, 0o755)
    _, host_pub = keygen(d / "host_ed25519", "ed25519")
    user = "root" if IS_ROOT else getpass.getuser()
    cleanup_dirs: list[Path] = []
    n = Server(
        "127.0.0.1",
        free_port(),
        user,
        HostKey.parse(host_pub),
        d / "host_ed25519.pub",
        passphrase="correct horse " + secrets.token_hex(4),
    )
    n.keys = client_keys(d, n.passphrase, prefix="client_")
    n.unauthorized_key, _ = keygen(d / "client_stranger", "ed25519")

    ak = d / "authorized_keys"
    ak.mkdir(mode=0o755)
    (ak / user).write_text("".join(public + "\n" for _, public, _ in n.keys.values()))

    bindir = d / "bin"
    bindir.mkdir(mode=0o755)
    _executable(bindir / "nixos-rebuild", FAKE_NIXOS_REBUILD)
    _executable(bindir / "sudo", FAKE_SUDO)
    n.bindir = bindir
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

    marker_name, marker_value = n.session_marker.split("=", 1)
    (d / "sshd_config").write_text(
        sshd_config(
            listen=f"{n.host}:{n.port}",
            host_key=d / "host_ed25519",
            pid_file=d / "sshd.pid",
            authorized_keys=f"{ak}/%u",
            passwords=IS_ROOT,
            set_env={
                "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
                marker_name: marker_value,
            },
        )
    )
    try:
        n.proc = start_sshd(
            sshd_command(d / "sshd_config", d / "sshd.log"),
            pid_file=d / "sshd.pid",
            logs=[d / "start.log", d / "sshd.log"],
            name="the remote tests' sshd",
        )
        yield n
    finally:
        if n.proc is not None:
            stop_sshd(n.proc)
        if n.password_user:
            subprocess.run(["userdel", n.password_user], check=False, capture_output=True)
        for p in cleanup_dirs:
            shutil.rmtree(p, ignore_errors=True)
