"""The audit trail in the admin: read-only, like everywhere else."""

from django.contrib import admin

from deployments.access import gate

from .models import AuditEvent


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows the admin shows and never adds, changes or deletes (their changes go through the panel)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["seq", "created_at", "actor_name", "action", "object_repr", "node_name", "outcome"]
    list_filter = ["outcome", "actor_kind"]
    search_fields = ["=actor_name", "=node_name", "=action", "=request_id"]
    show_full_result_count = False
    list_per_page = 50

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]

    def has_view_permission(self, request, obj=None):
        return gate.may(request.user, gate.AUDIT)
