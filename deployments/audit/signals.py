"""Logins, logouts and failed logins, on the chain (connected in ``AuditConfig.ready``)."""

from django.db import transaction

from .writer import record


def logged_in(sender, request, user, **kwargs) -> None:
    with transaction.atomic():
        record("auth.login", user=user, obj=user, object_type="user")


def logged_out(sender, request, user, **kwargs) -> None:
    if user is None:  # logging out while not logged in
        return
    with transaction.atomic():
        record("auth.logout", user=user, obj=user, object_type="user")


def login_failed(sender, credentials, request=None, **kwargs) -> None:
    # Django has already masked the password in ``credentials``; keep only the name tried.
    username = str(credentials.get("username", ""))[:150]
    with transaction.atomic():
        record(
            "auth.login_failed",
            actor_kind="anonymous",
            actor_name=username,
            outcome="failure",
            object_type="user",
            object_repr=username,
        )


def locked_out(sender, request, username=None, ip_address=None, **kwargs) -> None:
    """django-axes refused a sign-in: too many recent failures for this name or from this address."""
    from django.conf import settings

    username = str(username or "")[:150]
    with transaction.atomic():
        record(
            "auth.locked_out",
            actor_kind="anonymous",
            actor_name=username,
            outcome="denied",
            object_type="user",
            object_repr=username,
            details={
                "failure_limit": settings.AXES_FAILURE_LIMIT,
                "lockout_minutes": settings.AXES_COOLOFF_TIME.total_seconds() / 60,
            },
        )
