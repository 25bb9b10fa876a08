"""Every change to teams, members and grants, one function each.

Each is atomic and writes its audit event, with the team as it was before
and after, inside the same transaction.  Only superusers manage teams;
``user=None`` means the system acts (management commands, tests).
A removed member loses access on their next request; their open log
WebSockets close at the consumer's next permission check.
"""

from __future__ import annotations

from django.db import transaction

from deployments.audit.writer import record

from . import gate
from .models import Grant, Team


def team_snapshot(team: Team) -> dict:
    """What the audit trail keeps of a team: its name, members, grants, and what it may use."""
    if team.pk is None:
        return {}
    return {
        "name": team.name,
        "description": team.description,
        "members": sorted(team.members.values_list("username", flat=True)),
        "grants": [g.snapshot() for g in team.grants.select_related("node").order_by("pk")],
        "credentials": sorted(team.credential_uses.values_list("credential__name", flat=True)),
        "repositories": sorted(team.repository_uses.values_list("repository__name", flat=True)),
    }


def require_manager(user, *, event: str, team: Team | None = None) -> None:
    """Refuse (and audit the refusal as ``event``) unless ``user`` may manage teams."""
    gate.require_global(user, gate.MANAGE_TEAMS, event=event, obj=team, object_type="team")


def _record(event: str, team: Team, before: dict, *, user, node=None, details: dict | None = None) -> None:
    record(
        event,
        user=user,
        obj=team,
        node=node,
        details={**(details or {}), "before": before, "after": team_snapshot(team)},
    )


def save_team(team: Team, *, user=None) -> Team:
    """Create or rename/describe a team (already validated)."""
    created = team.pk is None
    event = "team.created" if created else "team.changed"
    require_manager(user, event=event, team=team)
    with transaction.atomic():
        before = {} if created else team_snapshot(Team.objects.get(pk=team.pk))
        team.save()
        _record(event, team, before, user=user)
    return team


def delete_team(team: Team, *, user=None) -> None:
    """Delete a team with its grants: its members lose what it granted."""
    require_manager(user, event="team.deleted", team=team)
    with transaction.atomic():
        before = team_snapshot(team)
        pk, name = team.pk, team.name
        team.delete()
        record(
            "team.deleted",
            user=user,
            object_type="team",
            object_id=str(pk),
            object_repr=name,
            details={"before": before, "after": {}},
        )


def add_member(team: Team, member, *, user=None) -> None:
    require_manager(user, event="team.member_added", team=team)
    with transaction.atomic():
        before = team_snapshot(team)
        team.members.add(member)
        _record("team.member_added", team, before, user=user, details={"member": member.get_username()})


def remove_member(team: Team, member, *, user=None) -> None:
    require_manager(user, event="team.member_removed", team=team)
    with transaction.atomic():
        before = team_snapshot(team)
        team.members.remove(member)
        _record("team.member_removed", team, before, user=user, details={"member": member.get_username()})


def add_grant(grant: Grant, *, user=None) -> Grant:
    """Give ``grant.team`` a role over a scope; ValidationError if invalid or already held."""
    require_manager(user, event="team.grant_added", team=grant.team)
    grant.full_clean()
    with transaction.atomic():
        before = team_snapshot(grant.team)
        grant.save()
        _record("team.grant_added", grant.team, before, user=user, node=grant.node, details={"grant": grant.snapshot()})
    return grant


def remove_grant(grant: Grant, *, user=None) -> None:
    require_manager(user, event="team.grant_removed", team=grant.team)
    with transaction.atomic():
        team = grant.team
        before = team_snapshot(team)
        snapshot = grant.snapshot()
        node = grant.node
        grant.delete()
        _record("team.grant_removed", team, before, user=user, node=node, details={"grant": snapshot})
