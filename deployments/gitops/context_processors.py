"""The navigation's approvals badge: how many pending requests the user may decide (lazily: one query,
only when a page shows it)."""

from django.utils.functional import SimpleLazyObject

from . import approvals


def approvals_badge(request) -> dict:
    user = getattr(request, "user", None)
    return {"approvals_to_decide": SimpleLazyObject(lambda: approvals.decidable(user).count())}
