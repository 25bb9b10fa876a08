"""Ask the node what became of an interrupted deployment and record it (``lifecycle.reconcile_deployment``).

Exit status: 0 the outcome is recorded (succeeded, failed, killed, never started);
1 it is not known yet or cannot be (the run is still going, the node cannot be
reached, the node no longer holds the run's folder, the deployment is not
interrupted); 2 refused (an unknown or unseen deployment, no permission to
deploy on its node).
"""

from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError

from deployments import lifecycle
from deployments.errors import RequestError

from ._base import NOT_SUCCEEDED, acting_user, lookup_deployment, refused


class Command(BaseCommand):
    help = (
        "Reconcile interrupted deployment DEPLOYMENT (its number) with its node: read the run's exit status, "
        "the generation and /run/current-system, and record what actually happened."
    )

    def add_arguments(self, parser):
        parser.add_argument("deployment", type=int, help="the deployment's number (#N)")
        parser.add_argument("--as", dest="as_user", help="reconcile as this panel user (their permissions apply)")

    def handle(self, deployment, as_user, **opts):
        user = acting_user(as_user)
        d = lookup_deployment(user, deployment)
        try:
            done = lifecycle.reconcile_deployment(d, user=user, actor_kind="cli")
        except PermissionDenied as exc:
            raise refused(f"refused: {exc}") from None
        except RequestError as exc:
            raise CommandError(str(exc), returncode=NOT_SUCCEEDED) from None
        self.stdout.write(f"deployment #{d.pk}: {done.summary}")
        self.stdout.write(f"status: {done.deployment.status}")
        if not done.final or done.deployment.status == "interrupted":
            raise CommandError(
                "the outcome is not known yet: reconcile again once the run has ended"
                if done.running
                else "the outcome stays unknown",
                returncode=NOT_SUCCEEDED,
            )
