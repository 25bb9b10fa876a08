"""Roll NODE back to its previous generation (or ``--generation N``), switching to it now (or ``--boot``: at the
next boot), as a deployment of its own (``rollbacks.request_rollback``); optionally follow its log.

Exit status as ``deploy``: 0 succeeded (or queued without --follow); 1 it did not succeed (the
generation does not exist, the node could not be reached, the activation failed); 2 refused (an unknown
or unseen node, no permission to deploy on it, an invalid generation, the node busy); 130 Ctrl-C while
following (the rollback goes on).
"""

import sys

from django.core.exceptions import PermissionDenied, ValidationError

from deployments import rollbacks
from deployments.errors import AwaitingApproval, RequestError
from deployments.models import Deployment
from deployments.validators import validate_generation

from ._base import AWAITING, NOT_SUCCEEDED, REFUSED, CtrlC, acting_user, lookup_node, no_qcluster_warning, refused
from .deploy import INTERRUPTED
from .deploy import Command as DeployCommand


class Command(DeployCommand):
    help = (
        "Roll NODE back to its previous system generation, or to --generation N, as nixos-rebuild --rollback "
        "does: switch to it now, or with --boot make it the boot default only."
    )

    def add_arguments(self, parser):
        parser.add_argument("node", help="the node to roll back")
        parser.add_argument("--generation", help="the generation number to go to (default: the previous one)")
        parser.add_argument("--boot", action="store_true", help="boot it next time; the running system stays")
        parser.add_argument("--follow", action="store_true", help="stream the log and wait for the outcome")
        parser.add_argument("--as", dest="as_user", help="request as this panel user (their permissions apply)")
        parser.add_argument("--timeout", type=int, help="seconds the run may take on the node (default: the panel's)")

    def handle(self, node, generation, boot, follow, as_user, timeout, **opts):
        user = acting_user(as_user)
        if generation is not None:
            try:
                validate_generation(generation)
            except ValidationError as exc:
                raise refused(f"--generation: {exc.messages[0]}") from None
        target = lookup_node(user, node)
        action = "boot" if boot else "switch"
        try:
            deployment = rollbacks.request_rollback(
                target,
                generation=int(generation) if generation else None,
                action=action,
                user=user,
                trigger=Deployment.Trigger.CLI,
                timeout_seconds=timeout,
            )
        except AwaitingApproval as exc:
            self.stderr.write(f"{exc} ({exc.approval.get_absolute_url()})")
            sys.exit(AWAITING)
        except (RequestError, PermissionDenied) as exc:
            self.stderr.write(f"refused: {exc}")
            sys.exit(REFUSED)
        pk = deployment.pk
        try:
            self.stderr.write(f"deployment #{pk}: {rollbacks.describe(deployment)} on {target.name}")
            warning = no_qcluster_warning(pk, following=follow)
            if warning:
                self.stderr.write(warning)
            if not follow:
                return
            with CtrlC() as ctrl_c:
                status = self.follow(pk, ctrl_c)
        except KeyboardInterrupt:
            d = Deployment.objects.get(pk=pk)
            if not d.is_active:
                self.stderr.write(self.summary(d))
                status = d.status
            else:
                self.stderr.write(
                    f"\n{'stopped following; ' if follow else ''}deployment #{pk} is still {d.status} "
                    f"(Ctrl-C does not stop it): cancel it with manage.py cancel {pk}"
                )
                sys.exit(INTERRUPTED)
        sys.exit(0 if status == Deployment.Status.SUCCEEDED else NOT_SUCCEEDED)
