"""Admin pages for the inventory.  Every save goes through ``inventory`` so it is audited;
secrets are write-only; deployments and logs are read-only here."""

from django.contrib import admin

from . import inventory
from .audit.admin import ReadOnlyAdmin
from .forms import CredentialForm, NodeForm, RepositoryForm
from .models import Credential, Deployment, Node, Repository, Tag


class AuditedAdmin(admin.ModelAdmin):
    def save_model(self, request, obj, form, change):
        inventory.save_object(obj, user=request.user)

    def delete_model(self, request, obj):
        inventory.delete_object(obj, user=request.user)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            inventory.delete_object(obj, user=request.user)


@admin.register(Credential)
class CredentialAdmin(AuditedAdmin):
    form = CredentialForm
    list_display = ["name", "kind", "display_fingerprint", "updated_at"]
    readonly_fields = ["display_fingerprint", "public_key"]
    fields = ["name", "kind", "secret", "passphrase", "sudo_password", "display_fingerprint", "public_key"]

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        inventory.save_credential(
            obj,
            secret=data.get("secret") or None,
            passphrase=data.get("passphrase") or "",
            sudo_password=data.get("sudo_password") or None,
            user=request.user,
        )


@admin.register(Repository)
class RepositoryAdmin(AuditedAdmin):
    form = RepositoryForm  # a token left in a stored URL is shown redacted, and a new one refused
    list_display = ["name", "display_url", "branch", "deploy_key"]


@admin.register(Tag)
class TagAdmin(AuditedAdmin):
    list_display = ["name"]


@admin.register(Node)
class NodeAdmin(AuditedAdmin):
    form = NodeForm
    list_display = ["name", "host", "port", "ssh_user", "jump_host", "flake_attr", "repository", "host_key_fingerprint"]
    list_filter = ["tags", "repository"]
    list_select_related = ["jump_host", "repository"]
    search_fields = ["name", "host"]
    readonly_fields = ["host_key_fingerprint", "host_key_pinned_at", "host_key_pinned_by"]

    def get_form(self, request, obj=None, **kwargs):
        """The node form for this user: only credentials, repositories and jump hosts they may use (all, for superusers,
        the only users of the admin today; ``save_object`` refuses any other whatever the form offers)."""
        form = super().get_form(request, obj, **kwargs)

        class ForUser(form):
            def __init__(self, *args, **kw):
                super().__init__(*args, user=request.user, **kw)

        return ForUser

    def save_model(self, request, obj, form, change):
        inventory.save_object(obj, user=request.user, tags=form.cleaned_data.get("tag_names"))

    def save_related(self, request, form, formsets, change):
        """Nothing: tags were saved by save_object() inside the audited transaction."""


@admin.register(Deployment)
class DeploymentAdmin(ReadOnlyAdmin):
    """Deployments change only through ``lifecycle``."""

    list_display = ["id", "node", "action", "status", "commit_sha", "requested_by_name", "created_at"]
    list_filter = ["status", "action"]
