"""Shared helpers of the panel's management commands."""

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management.base import CommandError


def acting_user(username: str | None):
    """The user a command acts for (``--as``), or None: the command line itself is the actor."""
    if not username:
        return None
    try:
        return get_user_model().objects.get(username=username, is_active=True)
    except get_user_model().DoesNotExist:
        raise CommandError(f"no active user {username!r}") from None


def lookup_node(user, name: str, permission: str = "view"):
    """The node ``name`` as the gate lets ``user`` see it (anyone, for the command line itself)."""
    from django.http import Http404

    from deployments.access import gate
    from deployments.models import Node

    try:
        return gate.node_for(user, name, permission) if user else Node.objects.get(name=name)
    except (Http404, Node.DoesNotExist):
        raise CommandError(f"no node {name!r}") from None
    except PermissionDenied as exc:
        raise CommandError(f"refused: {exc}", returncode=2) from None


def require_capability(user, *, event: str, object_type: str) -> None:
    """Inventory outside one node's scope (credentials, repositories, new nodes): the gate decides, audited."""
    from deployments.access import gate

    try:
        gate.require_global(user, gate.MANAGE_INVENTORY, event=event, object_type=object_type, actor_kind="cli")
    except PermissionDenied as exc:
        raise CommandError(f"refused: {exc}", returncode=2) from None


def clean(obj) -> None:
    """full_clean() with messages a terminal user can read."""
    try:
        obj.full_clean()
    except ValidationError as exc:
        raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None
