"""The GitOps settings: webhook secrets (encrypted, shown once), polling, node and tag policies, protected
tags, each from the side of who may and who may not."""

from __future__ import annotations

import pytest
from django.test import Client

from deployments.audit.models import AuditEvent
from deployments.gitops import changes
from deployments.gitops.models import ProtectedTag, RepositoryWatch, SyncPolicy
from deployments.models import Tag
from tests.support import personas


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_a_new_secret_is_shown_once_and_stored_encrypted(repository, alice_client):
    response = alice_client.post(f"/gitops/repositories/{repository.pk}/secret/")
    assert response.status_code == 200
    secret = response.context["secret"]
    assert len(secret) >= 40
    watch = RepositoryWatch.objects.get(repository=repository)
    assert secret not in watch.secret_encrypted and watch.secret() == secret
    assert response["Cache-Control"].startswith("no-store") or "no-store" in response["Cache-Control"]
    assert secret.encode() not in alice_client.get("/gitops/").content
    event = AuditEvent.objects.get(action="repository.webhook_secret")
    assert secret not in str(event.details) and event.details == {"rotated": False}


def test_rotating_replaces_the_old_secret(repository, alice):
    first = changes.rotate_webhook_secret(repository, user=alice)
    second = changes.rotate_webhook_secret(repository, user=alice)
    assert first != second and RepositoryWatch.objects.get().secret() == second
    assert AuditEvent.objects.filter(action="repository.webhook_secret").order_by("seq").last().details == {
        "rotated": True
    }


@pytest.mark.parametrize("name", ["bob", "carol", "wendy"])
def test_only_inventory_managers_set_secrets_and_polling(repository, name):
    user = personas.person(name)
    assert client_for(user).post(f"/gitops/repositories/{repository.pk}/secret/").status_code == 403
    assert (
        client_for(user).post(f"/gitops/repositories/{repository.pk}/poll/", {"poll_interval": 60}).status_code == 403
    )
    assert not RepositoryWatch.objects.exists()
    assert AuditEvent.objects.filter(action="repository.webhook_secret", outcome="denied").exists()


def test_the_overview_is_for_who_sees_the_inventory(repository, alice_client):
    assert client_for(personas.person("bob")).get("/gitops/").status_code == 403
    assert client_for(personas.person("carol")).get("/gitops/").status_code == 200  # the auditor reads
    page = alice_client.get("/gitops/")
    assert page.status_code == 200 and b"/hooks/github/" in page.content


def test_polling_intervals(repository, alice_client):
    assert alice_client.post(f"/gitops/repositories/{repository.pk}/poll/", {"poll_interval": 300}).status_code == 302
    assert RepositoryWatch.objects.get().poll_interval == 300
    response = alice_client.post(f"/gitops/repositories/{repository.pk}/poll/", {"poll_interval": 5}, follow=True)
    assert b"between 60 and" in response.content
    assert RepositoryWatch.objects.get().poll_interval == 300
    event = AuditEvent.objects.get(action="repository.changed")
    assert event.details == {"before": {"poll_interval": 0}, "after": {"poll_interval": 300}}


def test_a_node_admin_sets_their_node_policy(world):
    wendy = personas.person("wendy")  # admin of the nodes tagged web
    response = client_for(wendy).post(
        "/gitops/nodes/web-1/policy/",
        {"mode": "auto", "action": "switch", "days": ["1", "2", "3", "4", "5"], "start": "02:00", "end": "04:00"},
    )
    assert response.status_code == 302
    policy = SyncPolicy.objects.get(node=world.nodes["web-1"])
    assert policy.mode == "auto" and policy.days == [1, 2, 3, 4, 5]
    assert AuditEvent.objects.get(action="sync_policy.changed").actor_name == "wendy"


def test_who_is_not_the_node_admin_may_not(world):
    wendy = personas.person("wendy")
    assert client_for(wendy).post("/gitops/nodes/db-1/policy/", {"mode": "auto"}).status_code == 404  # unseen
    deployer = world.persona("deployer-tag")
    assert (
        client_for(deployer).post("/gitops/nodes/web-1/policy/", {"mode": "auto", "action": "switch"}).status_code
        == 403
    )
    assert not SyncPolicy.objects.exists()
    assert AuditEvent.objects.get(action="sync_policy.changed").outcome == "denied"


def test_tag_policies_and_protection_need_the_inventory_capability(world, alice_client):
    wendy = personas.person("wendy")
    form = {"mode": "notify", "action": "switch", "protected": "on"}
    assert client_for(wendy).post("/gitops/tags/web/", form).status_code == 403
    assert not ProtectedTag.objects.exists()
    assert alice_client.post("/gitops/tags/web/", form).status_code == 302
    web = Tag.objects.get(name="web")
    assert SyncPolicy.objects.get(tag=web).mode == "notify"
    assert ProtectedTag.objects.filter(tag=web).exists()
    assert AuditEvent.objects.get(action="tag.protection_changed").details == {"protected": True}


def test_a_bad_window_on_the_page_is_a_400_with_the_reason(world, alice_client):
    response = alice_client.post("/gitops/tags/web/", {"mode": "auto", "action": "switch", "days": ["1"]})
    assert response.status_code == 400
    assert b"start and an end" in response.content


def test_the_webhook_is_the_only_csrf_exempt_view(world, alice):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    assert strict.post("/gitops/tags/web/", {"mode": "notify", "action": "switch"}).status_code == 403
    assert strict.post(f"/gitops/repositories/{world.repository.pk}/secret/").status_code == 403
    assert not SyncPolicy.objects.exists() and not RepositoryWatch.objects.exists()
