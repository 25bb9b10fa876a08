"""Request a deployment from the command line, optionally following its log.

Exit status: 0 when the deployment succeeded (or was queued, without
--follow), 1 when it did not succeed, 2 when the request was refused (see
_base.py); 130 when Ctrl-C stopped following (the deployment goes on).
"""

import sys
import time

from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand

from deployments import lifecycle, logstream
from deployments.errors import RequestError
from deployments.models import Deployment

from ._base import NOT_SUCCEEDED, REFUSED, acting_user, lookup_node, no_qcluster_warning

# The shell's status for a command stopped by SIGINT (128 + 2).
INTERRUPTED = 130


class Command(BaseCommand):
    help = "Deploy NODE: nixos-rebuild ACTION at REV (default: the tracked branch's head)."

    def add_arguments(self, parser):
        parser.add_argument("node")
        parser.add_argument("--action", default="switch", choices=Deployment.Action.values)
        parser.add_argument("--rev", default="", help="branch, tag or commit SHA")
        parser.add_argument("--follow", action="store_true", help="stream the log and wait for the outcome")
        parser.add_argument("--as", dest="as_user", help="request as this panel user (their permissions apply)")

    def handle(self, node, action, rev, follow, as_user, **opts):
        user = acting_user(as_user)
        target = lookup_node(user, node)
        try:
            deployment = lifecycle.request_deployment(
                target, action=action, revision=rev, user=user, trigger=Deployment.Trigger.CLI
            )
        except (RequestError, PermissionDenied) as exc:
            self.stderr.write(f"refused: {exc}")
            sys.exit(REFUSED)
        pk = deployment.pk
        # From here on the deployment exists: Ctrl-C, whenever it comes, leaves it be and says so.
        try:
            self.stderr.write(f"deployment #{pk}: {action} {target.name} at {deployment.commit_sha}")
            warning = no_qcluster_warning(pk, following=follow)
            if warning:
                self.stderr.write(warning)
            if not follow:
                return
            status = self.follow(pk)
        except KeyboardInterrupt:
            d = Deployment.objects.get(pk=pk)
            if not d.is_active:  # it ended as the key was pressed
                self.stderr.write(self.summary(d))
                status = d.status
            else:
                self.stderr.write(
                    f"\n{'stopped following; ' if follow else ''}deployment #{pk} is still {d.status} "
                    f"(Ctrl-C does not stop it): cancel it with manage.py cancel {pk}"
                )
                sys.exit(INTERRUPTED)
        sys.exit(0 if status == Deployment.Status.SUCCEEDED else NOT_SUCCEEDED)

    def follow(self, pk: int) -> str:
        after, out = -1, sys.stdout
        while True:
            # Status before lines: a terminal status means every line is already stored.
            d = Deployment.objects.get(pk=pk)
            lines = logstream.lines_after(pk, after, limit=20000)
            for seq, stream, text in lines:
                if stream == "s":
                    out.write(f"[panel] {text}\n")
                else:
                    (self.stderr if stream == "e" else out).write(text + "\n")
                after = seq
            out.flush()
            if d.status in Deployment.TERMINAL and not lines:
                break
            if not lines:
                time.sleep(0.2)
        self.stderr.write(self.summary(d))
        return d.status

    @staticmethod
    def summary(d: Deployment) -> str:
        """``deployment #N <status> (exit code E): <first error line>; generation …`` (no "None" anywhere)."""
        summary = f"deployment #{d.pk} {d.status}"
        if d.exit_code is not None:
            summary += f" (exit code {d.exit_code})"
        if d.error_message and d.status != Deployment.Status.SUCCEEDED:
            summary += f": {d.error_message.splitlines()[0]}"
        before, after = d.generation_before, d.generation_after
        if after is not None:
            if before is None:
                summary += f"; generation {after} (none before)"
            elif before == after:
                summary += f"; generation {after} (unchanged)"
            else:
                summary += f"; generation {before} -> {after}"
        return summary
