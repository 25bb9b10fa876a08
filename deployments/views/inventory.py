"""Credential and repository pages: the list (with who may use each), add, edit or rotate, delete if
unused, and granting or revoking a team's use.

Thin, in this order: sign-in, the gate (403 and one audit event for a refused request, whatever it
carries), the object (404), the form, then one ``inventory`` function.  Secrets are write-only:
only fingerprints are ever shown.  Auditors may read the lists; superusers change things.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from .. import inventory
from ..access import gate
from ..access.models import CredentialUse, RepositoryUse, Team
from ..errors import RequestError
from ..forms import CredentialForm, RepositoryForm, UseForm
from ..models import Credential, Node, Repository


@dataclass(frozen=True)
class Kind:
    """What differs between the credential and the repository pages."""

    name: str  # credential, repository: the URL name prefix and the audit event subject
    model: type
    use_model: type
    form: type
    plural: str


KINDS = {
    "credential": Kind("credential", Credential, CredentialUse, CredentialForm, "credentials"),
    "repository": Kind("repository", Repository, RepositoryUse, RepositoryForm, "repositories"),
}


def _require(request, kind: Kind, capability: str, event: str, obj=None) -> None:
    gate.require_global(request.user, capability, event=f"{kind.name}.{event}", obj=obj, object_type=kind.name)


def _object(kind: Kind, pk: int):
    return get_object_or_404(kind.model, pk=pk)


@login_required
@require_GET
def object_list(request, kind: str):
    kind = KINDS[kind]
    _require(request, kind, gate.VIEW_INVENTORY, "viewed")
    objects = kind.model.objects.prefetch_related(
        Prefetch("uses", queryset=kind.use_model.objects.select_related("team").order_by("team__name")),
        Prefetch("nodes", queryset=Node.objects.only("name", kind.name).order_by("name")),
    )
    if kind.model is Repository:
        objects = objects.select_related("deploy_key")
    return render(
        request,
        f"deployments/{kind.name}_list.html",
        {
            "objects": objects,
            "can_manage": gate.may(request.user, gate.MANAGE_INVENTORY),
            "noun": kind.name,
            "nouns": "repositories" if kind.name == "repository" else f"{kind.name}s",
            "add_url": reverse(f"deployments:{kind.name}-add"),
        },
    )


def _save(kind: Kind, form, user):
    if kind.model is Credential:
        data = form.cleaned_data
        return inventory.save_credential(
            form.save(commit=False),
            secret=data.get("secret") or None,
            passphrase=data.get("passphrase") or "",
            sudo_password=data.get("sudo_password") or None,
            user=user,
        )
    return inventory.save_object(form.save(commit=False), user=user)


@login_required
def object_edit(request, kind: str, pk: int | None = None):
    """Add (no ``pk``) or edit one; for a credential, a new secret here is a rotation."""
    kind = KINDS[kind]
    if pk is None:
        _require(request, kind, gate.MANAGE_INVENTORY, "created")
        obj = kind.model()
    else:
        _require(request, kind, gate.MANAGE_INVENTORY, "changed" if request.method == "POST" else "viewed")
        obj = _object(kind, pk)
    saved_name = obj.name
    form = kind.form(request.POST or None, instance=obj)
    if request.method == "POST" and form.is_valid():
        try:
            obj = _save(kind, form, request.user)
        except (RequestError, ValueError) as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Saved {kind.name} {obj.name}.")
            return redirect(f"deployments:{kind.name}-list")
    context = {"form": form, "obj": obj, "saved_name": saved_name, "kind": kind.name}
    if obj.pk:
        context |= {
            "uses": obj.uses.select_related("team").order_by("team__name"),
            "use_form": UseForm(),
            "used_by": inventory.users_of(obj),
            "can_grant": gate.may(request.user, gate.MANAGE_TEAMS),
        }
    return render(request, f"deployments/{kind.name}_form.html", context)


@login_required
@require_POST
def object_delete(request, kind: str, pk: int):
    kind = KINDS[kind]
    _require(request, kind, gate.MANAGE_INVENTORY, "deleted")
    obj = _object(kind, pk)
    try:
        inventory.delete_unused(obj, user=request.user)
    except RequestError as exc:
        messages.error(request, str(exc))
        return redirect(f"deployments:{kind.name}-edit", obj.pk)
    messages.success(request, f"Deleted {kind.name} {obj.name}.")
    return redirect(f"deployments:{kind.name}-list")


@login_required
@require_POST
def use_add(request, kind: str, pk: int):
    """Let a team use the credential or repository (team managers only)."""
    kind = KINDS[kind]
    _require(request, kind, gate.MANAGE_TEAMS, "use_granted")
    obj = _object(kind, pk)
    form = UseForm(request.POST)
    if form.is_valid():
        team = form.cleaned_data["team"]
        inventory.grant_use(obj, team, user=request.user)
        messages.success(request, f"Team {team.name} may now use {kind.name} {obj.name}.")
    else:
        messages.error(request, "Choose a team.")
    return redirect(f"deployments:{kind.name}-edit", obj.pk)


@login_required
@require_POST
def use_remove(request, kind: str, pk: int, team_id: int):
    kind = KINDS[kind]
    _require(request, kind, gate.MANAGE_TEAMS, "use_revoked")
    obj = _object(kind, pk)
    team = get_object_or_404(Team, pk=team_id)
    inventory.revoke_use(obj, team, user=request.user)
    messages.success(request, f"Team {team.name} may no longer use {kind.name} {obj.name}.")
    return redirect(f"deployments:{kind.name}-edit", obj.pk)
