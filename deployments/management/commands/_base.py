"""Shared helpers of the panel's management commands.

Exit status, the same for every command: 0 it did what was asked; 1 it tried
and that did not succeed (a deployment that failed, a node that could not be
reached, a deployment that had already finished); 2 the request was refused
before anything was tried (no permission, an unknown node, user or deployment,
invalid input: what argparse itself answers with 2 too).
"""

from __future__ import annotations

import signal
import threading

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management.base import CommandError

NOT_SUCCEEDED = 1
REFUSED = 2
# A deploy to a protected node was held for a second person's approval (deployments/gitops/approvals.py).
AWAITING = 3


def refused(message: str) -> CommandError:
    """The error for a request refused before anything was tried (exit status 2)."""
    return CommandError(message, returncode=REFUSED)


def acting_user(username: str | None):
    """The user a command acts for (``--as``), or None: the command line itself is the actor."""
    if not username:
        return None
    try:
        return get_user_model().objects.get(username=username, is_active=True)
    except get_user_model().DoesNotExist:
        raise refused(f"no active user {username!r}") from None


def lookup_node(user, name: str, permission: str = "view"):
    """The node ``name`` as the gate lets ``user`` see it (anyone, for the command line itself)."""
    from django.http import Http404

    from deployments.access import gate
    from deployments.models import Node

    try:
        return gate.node_for(user, name, permission) if user else Node.objects.get(name=name)
    except (Http404, Node.DoesNotExist):
        raise refused(f"no node {name!r}") from None
    except PermissionDenied as exc:
        raise refused(f"refused: {exc}") from None


def lookup_deployment(user, pk: int):
    """Deployment ``pk`` as the gate lets ``user`` see it (any, for the command line itself)."""
    from django.http import Http404

    from deployments.access import gate
    from deployments.models import Deployment

    try:
        if user:
            return gate.deployment_for(user, pk)
        return Deployment.objects.select_related("node").get(pk=pk)
    except (Http404, Deployment.DoesNotExist):
        raise refused(f"no deployment #{pk}") from None


def require_capability(user, *, event: str, object_type: str) -> None:
    """Inventory outside one node's scope (credentials, repositories, new nodes): the gate decides, audited."""
    from deployments.access import gate

    try:
        gate.require_global(user, gate.MANAGE_INVENTORY, event=event, object_type=object_type, actor_kind="cli")
    except PermissionDenied as exc:
        raise refused(f"refused: {exc}") from None


def clean(obj) -> None:
    """full_clean() with messages a terminal user can read (invalid input: refused)."""
    try:
        obj.full_clean()
    except ValidationError as exc:
        raise refused("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None


def no_qcluster_warning(pk: int, *, following: bool) -> str | None:
    """What to tell a user whose deployment waits for a worker that is not there (None: one is there)."""
    from deployments.queue_status import qcluster_running

    running = qcluster_running()
    if running:
        return None
    if running is None:
        head = "cannot tell whether a qcluster is running (the broker did not answer)"
    else:
        head = "no qcluster is running"
    return (
        f"warning: {head}: deployment #{pk} stays queued until one starts (manage.py qcluster, or runpanel); "
        + ("Ctrl-C leaves it queued, " if following else "")
        + f"cancel it with manage.py cancel {pk}"
    )


class CtrlC:
    """Ctrl-C while a command follows a deployment: ``KeyboardInterrupt`` where it lands, and again at the
    follow loop's next ``check()`` if some library on the way caught it; SIGINT is unblocked and handled
    even if the command was started with it ignored or blocked. Outside the main thread it changes nothing."""

    def __enter__(self) -> CtrlC:
        self.pressed = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return self

    def _on_sigint(self, signum, frame) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
