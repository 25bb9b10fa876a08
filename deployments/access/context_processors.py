"""Template flags for navigation links, from the permission gate (lazily: no query unless a page asks)."""

from django.utils.functional import SimpleLazyObject

from . import gate


def access(request) -> dict:
    user = getattr(request, "user", None)
    return {
        "can_audit": SimpleLazyObject(lambda: gate.may(user, gate.AUDIT)),
        "can_manage_teams": SimpleLazyObject(lambda: gate.may(user, gate.MANAGE_TEAMS)),
        "can_view_inventory": SimpleLazyObject(lambda: gate.may(user, gate.VIEW_INVENTORY)),
        "can_use_admin_site": SimpleLazyObject(lambda: gate.may(user, gate.ADMIN_SITE)),
    }
