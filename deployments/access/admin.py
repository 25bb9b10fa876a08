"""Teams and grants in the Django admin: superusers only, every change audited before/after."""

from django.contrib import admin

from deployments.audit.writer import record

from . import gate, teams
from .models import Grant, Team


class TeamManagersOnly:
    """Team management is for those the gate lets manage teams, whatever Django model permissions say."""

    def _may_manage(self, request) -> bool:
        return gate.may(request.user, gate.MANAGE_TEAMS)

    def has_module_permission(self, request):
        return self._may_manage(request)

    def has_view_permission(self, request, obj=None):
        return self._may_manage(request)

    def has_add_permission(self, request, obj=None):
        return self._may_manage(request)

    def has_change_permission(self, request, obj=None):
        return self._may_manage(request)

    def has_delete_permission(self, request, obj=None):
        return self._may_manage(request)


class GrantInline(TeamManagersOnly, admin.TabularInline):
    model = Grant
    extra = 0
    raw_id_fields = ["node"]
    fields = ["role", "scope", "node", "tag"]


@admin.register(Team)
class TeamAdmin(TeamManagersOnly, admin.ModelAdmin):
    list_display = ["name", "description"]
    search_fields = ["name", "members__username"]
    filter_horizontal = ["members"]
    inlines = [GrantInline]

    # changeform_view runs in one transaction: the team, its members, its grants
    # and the audit event recorded in save_related() land together or not at all.
    def save_model(self, request, obj, form, change):
        request._team_before = teams.team_snapshot(Team.objects.get(pk=obj.pk)) if change else {}
        obj.save()

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        team = form.instance
        record(
            "team.changed" if change else "team.created",
            user=request.user,
            obj=team,
            details={
                "before": getattr(request, "_team_before", {}),
                "after": teams.team_snapshot(team),
                "via": "admin",
            },
        )

    def delete_model(self, request, obj):
        teams.delete_team(obj, user=request.user)

    def delete_queryset(self, request, queryset):
        for team in queryset:
            teams.delete_team(team, user=request.user)
