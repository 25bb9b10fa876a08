"""Start the whole panel on one machine: data directory and keys, migrate, first admin, daphne and the worker.

This is the README's one command for trying the panel: it runs on the
embedded defaults (SQLite, the django-q2 ORM broker) with no other service,
and on a fresh machine creates the data directory and its keys first
(controlpanel/bootstrap.py: importing the settings writes nothing).
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
        procs = {
            "daphne": subprocess.Popen(daphne_command(host, port), cwd=settings.BASE_DIR),
            "worker": subprocess.Popen([*manage, "qcluster"], cwd=settings.BASE_DIR),
        }
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
            for name, proc in procs.items():
                if proc.poll() is not None:
                    self.stderr.write(f"{name} exited with code {proc.returncode}; stopping the panel")
                    code, stopping = proc.returncode or 1, True
            time.sleep(0.5)
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        sys.exit(code)
