"""The credential and repository pages: list, add, rotate, delete if unused, who may use each.

Secrets are write-only (no response ever carries one back); every page answers
anonymous users with the login page, users without the capability with 403
and one audit event, and auditors read the lists only.
"""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse

from deployments.access.models import CredentialUse, RepositoryUse, Team
from deployments.audit.models import AuditEvent
from deployments.models import Credential, Repository
from tests.support.keys import ed25519_private_key

PASSWORD = "correct horse battery staple"  # the world's root-pw credential


@pytest.fixture
def unused(world):
    """A credential and a repository no node uses."""
    credential = Credential(name="spare", kind=Credential.Kind.PASSWORD)
    credential.set_secret("spare-secret-password")
    credential.save()
    repository = Repository.objects.create(name="spare-flakes", url="https://git.example.org/spare.git")
    return {"credential": credential, "repository": repository}


def every_url(world, unused) -> list[tuple[str, str]]:
    """(method, url) of every credential and repository page."""
    urls = []
    for kind, obj in (("credential", unused["credential"]), ("repository", unused["repository"])):
        urls += [
            ("GET", reverse(f"deployments:{kind}-list")),
            ("GET", reverse(f"deployments:{kind}-add")),
            ("POST", reverse(f"deployments:{kind}-add")),
            ("GET", reverse(f"deployments:{kind}-edit", args=[obj.pk])),
            ("POST", reverse(f"deployments:{kind}-edit", args=[obj.pk])),
            ("POST", reverse(f"deployments:{kind}-delete", args=[obj.pk])),
            ("POST", reverse(f"deployments:{kind}-use-add", args=[obj.pk])),
            ("POST", reverse(f"deployments:{kind}-use-remove", args=[obj.pk, world.ops.pk])),
        ]
    return urls


def everything(_=None) -> tuple:
    """What a refused request must leave as it was."""
    return (
        list(Credential.objects.values_list("name", "secret_encrypted", "fingerprint").order_by("pk")),
        list(Repository.objects.values_list("name", "url").order_by("pk")),
        list(CredentialUse.objects.values_list("team", "credential").order_by("pk")),
        list(RepositoryUse.objects.values_list("team", "repository").order_by("pk")),
    )


def all_text(response) -> str:
    return response.content.decode()


# --- who may use the pages --------------------------------------------------------


def test_anonymous_users_are_sent_to_log_in_from_every_page(client, world, unused):
    for method, url in every_url(world, unused):
        response = client.get(url) if method == "GET" else client.post(url, {"name": "x"})
        assert response.status_code == 302 and response["Location"].startswith("/login/"), (method, url)


def test_a_user_without_rights_gets_403_and_one_audit_event_per_request_and_nothing_changes(client, world, unused, bob):
    client.force_login(bob)
    before = everything()
    for method, url in every_url(world, unused):
        denied = AuditEvent.objects.filter(outcome="denied").count()
        # Valid input or not: the gate decides first.
        data = {"name": "evil", "kind": "password", "secret": "x", "url": "-oProxyCommand=x", "team": world.ops.pk}
        response = client.get(url) if method == "GET" else client.post(url, data)
        assert response.status_code == 403, (method, url)
        assert AuditEvent.objects.filter(outcome="denied").count() == denied + 1, (method, url)
    assert everything() == before
    assert AuditEvent.objects.filter(actor_name="bob", action="credential.use_granted", outcome="denied").exists()


def test_a_node_admin_may_not_manage_credentials_either(client, world, unused):
    admin = world.persona("admin-all")
    team = Team.objects.get(members=admin)
    client.force_login(admin)
    assert client.get("/credentials/").status_code == 403
    assert client.post(f"/credentials/{unused['credential'].pk}/uses/", {"team": team.pk}).status_code == 403
    assert not CredentialUse.objects.exists()


def test_auditors_read_the_lists_and_nothing_else(client, world, unused, carol):
    client.force_login(carol)
    page = all_text(client.get("/credentials/"))
    assert "root-pw" in page and "spare" in page
    assert "Add credential" not in page and f"/credentials/{unused['credential'].pk}/" not in page
    assert "flakes" in all_text(client.get("/repositories/"))
    assert client.get(f"/credentials/{unused['credential'].pk}/").status_code == 403
    assert client.get("/credentials/new/").status_code == 403
    before = everything()
    assert client.post(f"/repositories/{unused['repository'].pk}/delete/").status_code == 403
    assert everything() == before


def test_the_navigation_links_follow_the_gate(client, world, carol, bob, alice):
    for user, shown in ((alice, True), (carol, True), (bob, False)):
        client.force_login(user)
        page = all_text(client.get("/"))
        assert ('href="/credentials/"' in page) is shown and ('href="/repositories/"' in page) is shown


def test_a_post_without_a_csrf_token_is_refused(world, alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    response = client.post("/credentials/new/", {"name": "sneaky", "kind": "password", "secret": "pw"})
    assert response.status_code == 403
    assert not Credential.objects.filter(name="sneaky").exists()


# --- credentials ----------------------------------------------------------------


def test_the_list_shows_fingerprints_users_and_teams_never_secrets(alice_client, world, unused):
    CredentialUse.objects.create(team=world.ops, credential=unused["credential"])
    key = ed25519_private_key()
    alice_client.post("/credentials/new/", {"name": "deploy-key", "kind": "ssh-key", "secret": key})
    page = all_text(alice_client.get("/credentials/"))
    fingerprint = Credential.objects.get(name="deploy-key").fingerprint
    assert fingerprint.startswith("SHA256:") and fingerprint in page
    assert "web-1" in page and "db-1" in page  # root-pw's nodes
    assert "ops" in page  # who may use spare
    for secret in (PASSWORD, "spare-secret-password", key.splitlines()[1]):
        assert secret not in page


def test_adding_a_credential_stores_it_encrypted_and_audits_no_secret(alice_client, world):
    response = alice_client.post("/credentials/new/", {"name": "web-pw", "kind": "password", "secret": "s3cret-pw"})
    assert response.status_code == 302 and response["Location"] == "/credentials/"
    credential = Credential.objects.get(name="web-pw")
    assert credential.secret() == "s3cret-pw" and "s3cret-pw" not in credential.secret_encrypted
    event = AuditEvent.objects.get(action="credential.created")
    assert event.details["secret"] == "set" and "s3cret-pw" not in json.dumps(event.details)
    assert "s3cret-pw" not in all_text(alice_client.get(response["Location"]))


@pytest.mark.parametrize("problem", ["name taken", "unreadable key"])
def test_a_refused_form_does_not_show_the_typed_secret_again(alice_client, world, problem):
    key = ed25519_private_key()
    if problem == "unreadable key":
        lines = key.splitlines()
        key = "\n".join([lines[0], lines[1][::-1], *lines[2:]])
    name = "root-pw" if problem == "name taken" else "new-key"
    response = alice_client.post(
        "/credentials/new/", {"name": name, "kind": "ssh-key", "secret": key, "passphrase": "pp-secret"}
    )
    assert response.status_code == 200 and "field-error" in all_text(response)
    assert key.splitlines()[1] not in all_text(response) and "pp-secret" not in all_text(response)
    assert not Credential.objects.filter(kind="ssh-key").exists()


def test_the_edit_page_never_renders_the_stored_secret(alice_client, world):
    credential = Credential.objects.get(name="root-pw")
    credential.set_sudo_password("sudo-secret-pw")
    credential.save()
    page = all_text(alice_client.get(f"/credentials/{credential.pk}/"))
    assert PASSWORD not in page and "sudo-secret-pw" not in page and "sudo password set" in page
    assert "web-1" in page and "db-1" in page  # what uses it


def test_rotating_replaces_the_secret_and_records_the_fingerprints(alice_client, world):
    first, second = ed25519_private_key(), ed25519_private_key()
    alice_client.post("/credentials/new/", {"name": "k", "kind": "ssh-key", "secret": first})
    credential = Credential.objects.get(name="k")
    old_fingerprint = credential.fingerprint
    response = alice_client.post(f"/credentials/{credential.pk}/", {"name": "k", "kind": "ssh-key", "secret": second})
    assert response.status_code == 302
    credential.refresh_from_db()
    assert credential.secret() == second and credential.fingerprint != old_fingerprint
    event = AuditEvent.objects.get(action="credential.rotated")
    assert event.details["secret"] == "replaced"
    assert event.details["changes"]["fingerprint"] == {"before": old_fingerprint, "after": credential.fingerprint}
    assert second.splitlines()[1] not in json.dumps(event.details)


def test_saving_without_a_secret_keeps_the_stored_one(alice_client, world):
    credential = Credential.objects.get(name="root-pw")
    response = alice_client.post(f"/credentials/{credential.pk}/", {"name": "root-password", "kind": "password"})
    assert response.status_code == 302
    credential.refresh_from_db()
    assert credential.name == "root-password" and credential.secret() == PASSWORD
    event = AuditEvent.objects.get(action="credential.changed")
    assert event.details["secret"] == "unchanged" and event.details["changes"]["name"]["after"] == "root-password"


def test_changing_the_kind_needs_a_new_secret(alice_client, world):
    credential = Credential.objects.get(name="root-pw")
    response = alice_client.post(f"/credentials/{credential.pk}/", {"name": "root-pw", "kind": "ssh-key"})
    assert response.status_code == 200 and "needs the new private key" in all_text(response)
    credential.refresh_from_db()
    assert credential.kind == "password"


def test_a_credential_in_use_is_not_deleted_and_the_message_names_its_nodes(alice_client, world):
    credential = Credential.objects.get(name="root-pw")
    response = alice_client.post(f"/credentials/{credential.pk}/delete/", follow=True)
    page = all_text(response)
    assert "still used by node db-1, node web-1" in page
    assert Credential.objects.filter(pk=credential.pk).exists()
    assert not AuditEvent.objects.filter(action="credential.deleted").exists()


def test_a_deploy_key_in_use_by_a_repository_is_not_deleted(alice_client, world, unused):
    key = Credential(name="dk", kind=Credential.Kind.SSH_KEY)
    key.set_secret(ed25519_private_key())
    key.save()
    unused["repository"].deploy_key = key
    unused["repository"].save()
    alice_client.post(f"/credentials/{key.pk}/delete/")
    assert Credential.objects.filter(pk=key.pk).exists()


def test_an_unused_credential_is_deleted_with_its_grants_and_audited(alice_client, world, unused):
    credential = unused["credential"]
    CredentialUse.objects.create(team=world.ops, credential=credential)
    response = alice_client.post(f"/credentials/{credential.pk}/delete/")
    assert response.status_code == 302 and not Credential.objects.filter(pk=credential.pk).exists()
    assert not CredentialUse.objects.exists()
    event = AuditEvent.objects.get(action="credential.deleted")
    assert event.details["before"]["teams"] == ["ops"] and "spare-secret-password" not in json.dumps(event.details)


def test_a_missing_credential_is_404_for_a_superuser(alice_client, world):
    assert alice_client.get("/credentials/999999/").status_code == 404
    assert alice_client.post("/credentials/999999/delete/").status_code == 404


# --- granting and revoking use ------------------------------------------------------


@pytest.mark.parametrize("kind", ["credential", "repository"])
def test_a_team_manager_grants_and_revokes_use_audited_before_and_after(alice_client, world, unused, kind):
    obj = unused[kind]
    url = reverse(f"deployments:{kind}-use-add", args=[obj.pk])
    assert alice_client.post(url, {"team": world.ops.pk}).status_code == 302
    assert list(obj.uses.values_list("team__name", flat=True)) == ["ops"]
    granted = AuditEvent.objects.get(action=f"{kind}.use_granted")
    assert granted.details == {"team": "ops", "before": [], "after": ["ops"]}
    edit = all_text(alice_client.get(reverse(f"deployments:{kind}-edit", args=[obj.pk])))
    assert "Revoke the use by ops" in edit
    assert alice_client.post(url, {"team": world.ops.pk}).status_code == 302, "granting twice is harmless"
    assert AuditEvent.objects.filter(action=f"{kind}.use_granted").count() == 1
    remove = reverse(f"deployments:{kind}-use-remove", args=[obj.pk, world.ops.pk])
    assert alice_client.post(remove).status_code == 302
    assert not obj.uses.exists()
    revoked = AuditEvent.objects.get(action=f"{kind}.use_revoked")
    assert revoked.details == {"team": "ops", "before": ["ops"], "after": []}


def test_a_granted_team_shows_in_the_team_trail(alice_client, world, unused):
    alice_client.post(f"/credentials/{unused['credential'].pk}/uses/", {"team": world.ops.pk})
    alice_client.post(f"/teams/{world.ops.pk}/edit/", {"name": "ops", "description": "x"})
    event = AuditEvent.objects.filter(action="team.changed").latest("seq")
    assert event.details["after"]["credentials"] == ["spare"]


def test_granting_to_no_team_explains_itself(alice_client, world, unused):
    response = alice_client.post(f"/credentials/{unused['credential'].pk}/uses/", {"team": "999999"}, follow=True)
    assert "Choose a team" in all_text(response) and not CredentialUse.objects.exists()


# --- repositories ---------------------------------------------------------------


def test_adding_editing_and_deleting_a_repository(alice_client, world):
    response = alice_client.post(
        "/repositories/new/", {"name": "infra", "url": "git@git.example.org:infra/fleet.git", "branch": "main"}
    )
    assert response.status_code == 302
    repository = Repository.objects.get(name="infra")
    response = alice_client.post(
        f"/repositories/{repository.pk}/",
        {"name": "infra", "url": "ssh://git@git.example.org:2222/infra/fleet.git", "branch": "release/2026"},
    )
    assert response.status_code == 302
    repository.refresh_from_db()
    assert repository.branch == "release/2026"
    assert AuditEvent.objects.get(action="repository.changed").details["changes"]["branch"]["after"] == "release/2026"
    assert alice_client.post(f"/repositories/{repository.pk}/delete/").status_code == 302
    assert not Repository.objects.filter(pk=repository.pk).exists()


def test_a_repository_in_use_is_not_deleted(alice_client, world):
    response = alice_client.post(f"/repositories/{world.repository.pk}/delete/", follow=True)
    assert "still used by node db-1, node web-1" in all_text(response)
    assert Repository.objects.filter(pk=world.repository.pk).exists()


@pytest.mark.parametrize(
    ("url", "text"), [("/credentials/", "No credentials yet."), ("/repositories/", "No repositories yet.")]
)
def test_an_empty_list_says_so_and_offers_the_first_one(db, alice_client, url, text):
    Credential.objects.all().delete()
    Repository.objects.all().delete()
    page = alice_client.get(url).content.decode()
    assert text in page and "Add the first" in page
