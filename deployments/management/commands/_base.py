"""Shared helpers of the panel's management commands."""

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError


def acting_user(username: str | None):
    """The user a command acts for (``--as``), or None: the command line itself is the actor."""
    if not username:
        return None
    try:
        return get_user_model().objects.get(username=username, is_active=True)
    except get_user_model().DoesNotExist:
        raise CommandError(f"no active user {username!r}") from None


def clean(obj) -> None:
    """full_clean() with messages a terminal user can read."""
    try:
        obj.full_clean()
    except ValidationError as exc:
        raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None
