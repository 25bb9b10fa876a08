"""Cancel a deployment from the command line: a queued one at once, a running one through its worker;
or a whole rollout (``--rollout N``): its queued nodes never start, its running ones are stopped.

Exit status: 0 cancelled (or cancel requested), 1 it had already finished,
2 refused (an unknown or unseen deployment or rollout, no permission to deploy on its nodes).
"""

from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError

from deployments import lifecycle, rollouts
from deployments.errors import RequestError
from deployments.models import Deployment, Rollout
from deployments.queue_status import qcluster_running

from ._base import NOT_SUCCEEDED, acting_user, lookup_deployment, refused


class Command(BaseCommand):
    help = "Cancel deployment DEPLOYMENT (its number): a queued one at once, a running one within a second or so."

    def add_arguments(self, parser):
        parser.add_argument("deployment", type=int, nargs="?", help="the deployment's number (#N)")
        parser.add_argument("--rollout", type=int, help="cancel rollout #N instead (every node of it)")
        parser.add_argument("--as", dest="as_user", help="cancel as this panel user (their permissions apply)")

    def handle(self, deployment, rollout, as_user, **opts):
        user = acting_user(as_user)
        if (deployment is None) == (rollout is None):
            raise refused("give a DEPLOYMENT number or --rollout N")
        if rollout is not None:
            return self.cancel_rollout(user, rollout)
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

    def cancel_rollout(self, user, pk: int) -> None:
        from django.http import Http404

        from deployments.access import gate

        try:
            rollout = gate.rollout_for(user, pk) if user else Rollout.objects.get(pk=pk)
        except (Http404, Rollout.DoesNotExist):
            raise refused(f"no rollout #{pk}") from None
        try:
            rollout = rollouts.cancel_rollout(rollout, user=user, actor_kind="cli")
        except PermissionDenied as exc:
            raise refused(f"refused: {exc}") from None
        except RequestError as exc:
            raise CommandError(str(exc), returncode=NOT_SUCCEEDED) from None
        self.stdout.write(
            f"rollout #{rollout.pk} {rollout.status}: queued nodes will not start"
            + (", running ones are being stopped" if rollout.status == Rollout.Status.CANCELLING else "")
        )
