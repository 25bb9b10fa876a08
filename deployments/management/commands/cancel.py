"""Cancel a deployment from the command line: a queued one at once, a running one through its worker.

Exit status: 0 cancelled (or cancel requested), 1 it had already finished,
2 refused (an unknown or unseen deployment, no permission to deploy on its node).
"""

from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError

from deployments import lifecycle
from deployments.errors import RequestError
from deployments.models import Deployment
from deployments.queue_status import qcluster_running

from ._base import NOT_SUCCEEDED, acting_user, lookup_deployment, refused


class Command(BaseCommand):
    help = "Cancel deployment DEPLOYMENT (its number): a queued one at once, a running one within a second or so."

    def add_arguments(self, parser):
        parser.add_argument("deployment", type=int, help="the deployment's number (#N)")
        parser.add_argument("--as", dest="as_user", help="cancel as this panel user (their permissions apply)")

    def handle(self, deployment, as_user, **opts):
        user = acting_user(as_user)
        d = lookup_deployment(user, deployment)
        already_asked = d.cancel_requested
        try:
            d = lifecycle.cancel_deployment(d, user=user, actor_kind="cli")
        except PermissionDenied as exc:
            raise refused(f"refused: {exc}") from None
        except RequestError:
            raise CommandError(
                f"deployment #{d.pk} has already finished: {d.status}", returncode=NOT_SUCCEEDED
            ) from None
        if d.status == Deployment.Status.CANCELLED:
            self.stdout.write(f"deployment #{d.pk} cancelled")
            return
        # Running: its worker sees the flag at its next heartbeat and kills the remote process group.
        self.stdout.write(
            f"deployment #{d.pk}: cancel {'was already requested' if already_asked else 'requested'}; "
            "its worker stops nixos-rebuild on the node within a few seconds"
        )
        if qcluster_running() is False:
            self.stderr.write(
                "warning: no qcluster is running, so no worker will act on it: once its heartbeat is stale, "
                "manage.py reapdeployments marks it interrupted"
            )
