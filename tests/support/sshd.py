"""The one throwaway OpenSSH server of the test suite: ``sshd -D`` with its own config, keys, pid file and log.

Nothing of the machine's own sshd or ``~/.ssh`` is touched.  The testbed's
nodes (``tests/support/testbed``, inside their namespaces as root or on
127.0.0.1 without) and the deployments.remote tests' server
(``tests/remote/server.py``) are all started, awaited and stopped here; they
differ only in the files and the config values they give it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from .processes import descendants, kill_all
from .wait import wait_for

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


class SshdError(RuntimeError):
    """sshd did not start; the message holds what it logged."""


def missing_tools() -> str | None:
    """Why no test sshd can run here, or None."""
    if not os.path.exists(SSHD):
        return f"OpenSSH server ({SSHD}) not installed"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen not installed"
    return None


def sshd_config(
    *,
    listen: str,
    host_key: str | Path,
    pid_file: str | Path,
    authorized_keys: str | Path,
    passwords: bool = False,
    root_passwords: bool = False,
    set_env: dict[str, str] | None = None,
) -> str:
    """The sshd_config of a test server: public keys always; passwords (checked against /etc/shadow) if asked.

    ``root_passwords`` lets root log in with a password too, which only a
    node with its own ``/etc/shadow`` may allow.  ``set_env`` is given to
    every session (sshd's SetEnv).
    """
    lines = [
        f"ListenAddress {listen}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        "UsePAM no",
        "StrictModes no",
        f"PermitRootLogin {'yes' if root_passwords else 'prohibit-password'}",
        "PubkeyAuthentication yes",
        f"PasswordAuthentication {'yes' if passwords or root_passwords else 'no'}",
        "KbdInteractiveAuthentication no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "MaxStartups 200:30:400",
        "MaxSessions 64",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
    ]
    if set_env:
        lines.append("SetEnv " + " ".join(f'"{k}={v}"' for k, v in set_env.items()))
    return "\n".join(lines) + "\n"


def sshd_command(config: str | Path, log: str | Path) -> list[str]:
    """The command line of a test sshd: in the foreground, logging to ``log``."""
    return [SSHD, "-D", "-f", str(config), "-E", str(log)]


def start_sshd(
    argv: list[str],
    *,
    pid_file: Path,
    logs: list[Path],
    name: str,
    env: dict[str, str] | None = None,
    timeout: float = 15,
) -> subprocess.Popen:
    """Start ``argv`` (sshd_command(), maybe behind nsenter and unshare that exec into it) in its own session.

    Returns once sshd listens: it writes ``pid_file`` (as this process sees
    it) only then.  ``logs[0]`` gets the wrapper's stderr; on failure every
    one of ``logs`` is quoted in the SshdError.
    """
    with open(logs[0], "wb") as start_log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=start_log, env=env, start_new_session=True
        )

    def listening() -> bool:
        if pid_file.exists() and pid_file.read_text().strip():
            return True
        if proc.poll() is not None:
            raise SshdError(f"{name} exited {proc.returncode}: {_read(logs)}")
        return False

    try:
        wait_for(listening, timeout, interval=0.002, what=f"{name} to listen")
    except AssertionError:
        stop_sshd(proc)
        raise SshdError(f"{name} did not start in {timeout} s: {_read(logs)}") from None
    except BaseException:
        stop_sshd(proc)
        raise
    return proc


def stop_sshd(proc: subprocess.Popen) -> None:
    """Kill sshd and every session it forked (they outlive their listener), and reap it."""
    if proc.poll() is None:
        kill_all([*descendants(proc.pid), proc.pid])
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _read(logs: list[Path]) -> str:
    text = ""
    for log in logs:
        with contextlib.suppress(OSError):
            text += log.read_text(errors="replace")
    return text.strip()
