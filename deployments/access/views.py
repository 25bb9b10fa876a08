"""Team and grant pages: for those the gate lets manage teams; every change through ``teams`` (audited)."""

from __future__ import annotations

from functools import wraps

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from . import gate, teams
from .forms import GrantForm, MemberForm, TeamForm
from .models import Grant, Team


def manager_required(event: str):
    """Only team managers pass; a refused change (POST) is recorded in the audit trail as ``event``."""

    def decorator(view):
        @login_required
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if not gate.may(request.user, gate.MANAGE_TEAMS):
                if request.method == "POST":
                    teams.require_manager(request.user, event=event)
                raise PermissionDenied("Only superusers manage teams and grants.")
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


@manager_required("team.viewed")
def team_list(request):
    teams = Team.objects.annotate(
        member_count=Count("members", distinct=True), grant_count=Count("grants", distinct=True)
    )
    return render(request, "access/team_list.html", {"teams": teams})


def _detail(request, team: Team, *, member_form=None, grant_form=None):
    # A refused form (POST) is a 400 with the form and its errors.
    status = 400 if request.method == "POST" else 200
    return render(
        request,
        "access/team_detail.html",
        {
            "team": team,
            "members": team.members.order_by("username"),
            "grants": team.grants.select_related("node").order_by("scope", "tag", "node__name", "role"),
            "member_form": member_form or MemberForm(),
            "grant_form": grant_form or GrantForm(team=team),
        },
        status=status,
    )


@manager_required("team.viewed")
def team_detail(request, pk):
    return _detail(request, get_object_or_404(Team, pk=pk))


@manager_required("team.changed")
def team_edit(request, pk=None):
    team = get_object_or_404(Team, pk=pk) if pk is not None else Team()
    form = TeamForm(request.POST or None, instance=team)
    if request.method == "POST" and form.is_valid():
        team = teams.save_team(form.save(commit=False), user=request.user)
        messages.success(request, f"Saved team {team.name}.")
        return redirect("access:team-detail", team.pk)
    return render(request, "access/team_form.html", {"form": form, "team": team}, status=400 if form.errors else 200)


@manager_required("team.deleted")
@require_POST
def team_delete(request, pk):
    team = get_object_or_404(Team, pk=pk)
    teams.delete_team(team, user=request.user)
    messages.success(request, f"Deleted team {team.name}.")
    return redirect("access:team-list")


@manager_required("team.member_added")
@require_POST
def member_add(request, pk):
    team = get_object_or_404(Team, pk=pk)
    form = MemberForm(request.POST)
    if not form.is_valid():
        return _detail(request, team, member_form=form)
    member = form.cleaned_data["username"]
    teams.add_member(team, member, user=request.user)
    messages.success(request, f"Added {member.get_username()} to {team.name}.")
    return redirect("access:team-detail", team.pk)


@manager_required("team.member_removed")
@require_POST
def member_remove(request, pk, user_id):
    team = get_object_or_404(Team, pk=pk)
    member = get_object_or_404(get_user_model(), pk=user_id, teams=team)
    teams.remove_member(team, member, user=request.user)
    messages.success(request, f"Removed {member.get_username()} from {team.name}.")
    return redirect("access:team-detail", team.pk)


@manager_required("team.grant_added")
@require_POST
def grant_add(request, pk):
    team = get_object_or_404(Team, pk=pk)
    form = GrantForm(request.POST, team=team)
    if form.is_valid():
        try:
            grant = teams.add_grant(form.save(commit=False), user=request.user)
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, f"Granted {grant.get_role_display().lower()} on {grant.scope_label}.")
            return redirect("access:team-detail", team.pk)
    return _detail(request, team, grant_form=form)


@manager_required("team.grant_removed")
@require_POST
def grant_remove(request, pk, grant_id):
    grant = get_object_or_404(Grant.objects.select_related("team", "node"), pk=grant_id, team_id=pk)
    teams.remove_grant(grant, user=request.user)
    messages.success(request, f"Removed {grant.get_role_display().lower()} on {grant.scope_label}.")
    return redirect("access:team-detail", pk)
