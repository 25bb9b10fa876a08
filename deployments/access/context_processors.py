"""Template flags for navigation links, from the permission gate (lazily: no query unless a page asks)."""

from django.utils.functional import SimpleLazyObject

from deployments import permissions


def access(request) -> dict:
    user = getattr(request, "user", None)
    return {
        "can_audit": SimpleLazyObject(lambda: permissions.can_audit(user)),
        "can_manage_teams": SimpleLazyObject(lambda: permissions.can_manage_teams(user)),
    }
