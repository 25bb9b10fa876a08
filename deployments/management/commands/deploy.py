"""Request a deployment from the command line, optionally following its log.

Exit status: 0 when the deployment succeeded (or was queued, without
--follow), 1 when it did not succeed, 2 when the request was refused.
"""

import sys
import time

from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand

from deployments import lifecycle, logstream
from deployments.errors import RequestError
from deployments.models import Deployment

from ._base import acting_user, lookup_node


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
            sys.exit(2)
        self.stderr.write(f"deployment #{deployment.pk}: {action} {target.name} at {deployment.commit_sha}")
        if not follow:
            return
        sys.exit(0 if self.follow(deployment.pk) == Deployment.Status.SUCCEEDED else 1)

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
        summary = f"deployment #{pk} {d.status}"
        if d.exit_code is not None:
            summary += f" (exit code {d.exit_code})"
        if d.error_message and d.status != Deployment.Status.SUCCEEDED:
            summary += f": {d.error_message.splitlines()[0]}"
        if d.generation_after is not None:
            summary += f"; generation {d.generation_before} -> {d.generation_after}"
        self.stderr.write(summary)
        return d.status
