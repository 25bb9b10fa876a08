"""Start the whole panel on one machine: data directory and keys, migrate, first admin, daphne and the worker.

This is the README's one command for trying the panel: it runs on the
embedded defaults (SQLite, the django-q2 ORM broker) with no other service,
and on a fresh machine creates the data directory and its keys first
(controlpanel/bootstrap.py: importing the settings writes nothing).

It behaves like a service: daphne and the qcluster each run in a process group
of their own; if either dies, the other group (and what is left of the dead
one's, such as the qcluster's worker processes) gets SIGTERM, then SIGKILL
after ``GRACE_AFTER_FAILURE`` seconds, every process is reaped (runpanel is a
child subreaper, so the qcluster's orphans come back to it), and runpanel exits
1 so systemd restarts it.  Ctrl-C or SIGTERM stops both and exits 0.
"""

import os
import secrets
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from controlpanel.bootstrap import ensure_data_dir
from deployments.lifecycle import reap_stale


def daphne_command(host: str, port: int) -> list[str]:
    """daphne serving the panel: no ``Server`` banner; behind a TLS proxy, the client address from its
    ``X-Forwarded-For`` (the audit trail's ``source_ip`` and login throttling count the real client)."""
    command = [sys.executable, "-m", "daphne", "-b", host, "-p", str(port), "--no-server-name"]
    if settings.BEHIND_TLS_PROXY:
        command.append("--proxy-headers")
    return [*command, "controlpanel.asgi:application"]


class Command(BaseCommand):
    help = "Run daphne and the qcluster worker together (Ctrl-C stops both)."
    # Checked in handle(), once the keys the checks look for exist.
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("PANEL_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PANEL_PORT", "8000")))
        parser.add_argument("--no-admin", action="store_true", help="do not create a first admin account")

    def handle(self, host, port, no_admin, **opts):
        for path in ensure_data_dir():
            self.stdout.write(f"Generated {path}")
        self.check()
        call_command("migrate", interactive=False, verbosity=0)
        User = get_user_model()
        if not no_admin and not User.objects.exists():
            password = secrets.token_urlsafe(12)
            User.objects.create_superuser("admin", "", password)
            self.stdout.write(
                self.style.WARNING(
                    "\nFirst admin account created (shown only this once, write it down):\n"
                    f"    user: admin\n    password: {password}\n"
                )
            )
        interrupted = reap_stale()
        if interrupted:
            self.stdout.write(f"{interrupted} deployment(s) left running by a stopped worker marked interrupted")
        manage = [sys.executable, str(settings.BASE_DIR / "manage.py")]
        supervisor = Supervisor()
        supervisor.start("daphne", daphne_command(host, port), cwd=settings.BASE_DIR)
        supervisor.start("worker", [*manage, "qcluster"], cwd=settings.BASE_DIR)
        shown = f"[{host}]" if ":" in host else host
        self.stdout.write(
            self.style.SUCCESS(f"Panel at http://{shown}:{port}/  (data in {settings.DATA_DIR}; Ctrl-C stops)")
        )
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        code = 0
        while not stopping:
            died = supervisor.reap()
            if died:
                name, returncode = died
                self.stderr.write(f"{name} exited with code {returncode}; stopping the panel")
                code, stopping = 1, True
            else:
                time.sleep(POLL_INTERVAL)
        # A child that died leaves the others nothing to serve: they get less time than on Ctrl-C,
        # so a service manager sees the failure (and restarts the panel) within seconds.
        supervisor.stop(grace=GRACE_AFTER_FAILURE if code else GRACE_ON_REQUEST)
        sys.exit(code)


POLL_INTERVAL = 0.2  # seconds between looks at the children
GRACE_AFTER_FAILURE = 3.0  # seconds the surviving children get to stop after one died
GRACE_ON_REQUEST = 20.0  # seconds they get on Ctrl-C or SIGTERM (the qcluster finishes its bookkeeping)
PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    """Have orphans of our children (the qcluster's workers when it dies) re-parented to us, not to init,
    so we can reap them and none is left a zombie or running on its own.  Linux only; False elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Supervisor:
    """The panel's children, each the leader of its own process group (a child and everything it forks).

    Stopping sends SIGTERM to each group, waits up to a grace period, then SIGKILLs the groups; every
    process that ends up our child (the children, and with the subreaper flag their orphans) is reaped.
    """

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.subreaper = _become_subreaper()

    def start(self, name: str, command: list[str], **kwargs) -> None:
        # Own process group: a signal for the group reaches the qcluster's worker processes too, and a
        # terminal's Ctrl-C reaches only us, so we stop the children in order.
        self.procs[name] = subprocess.Popen(command, process_group=0, **kwargs)

    def reap(self) -> tuple[str, int] | None:
        """(name, return code) of a child that has exited, if any; reaps adopted orphans on the way."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return name, proc.returncode
        self._reap_adopted()
        return None

    def stop(self, grace: float) -> None:
        groups = [proc.pid for proc in self.procs.values()]
        self._signal_groups(groups, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(self._group_alive(g) for g in groups):
            for proc in self.procs.values():
                proc.poll()
            self._reap_adopted()
            time.sleep(0.05)
        self._signal_groups(groups, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait()
        # The killed groups' last members: wait for each to be gone (reaping those that are ours).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(self._group_alive(g) for g in groups):
            self._reap_adopted()
            time.sleep(0.02)
        self._reap_adopted()

    @staticmethod
    def _signal_groups(groups: list[int], sig: int) -> None:
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _reap_adopted(self) -> None:
        """Reap orphans re-parented to us (never our own children: Popen reaps those)."""
        if not self.subreaper:
            return
        ours = {proc.pid for proc in self.procs.values()}
        for pid in _children_of(os.getpid()) - ours:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _children_of(parent: int) -> set[int]:
    """Pids whose parent is ``parent`` (Linux /proc)."""
    found = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.add(int(entry))
    return found
