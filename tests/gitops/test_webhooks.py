"""POST /hooks/<provider>/: forges' pushes verified as each forge signs them, refused alike whether the
repository exists or not, deduplicated by delivery id, recorded, and handed to the worker."""

from __future__ import annotations

import json
import time

import pytest
from django.test import Client

from deployments.audit.models import AuditEvent
from deployments.gitops import changes, hooks
from deployments.gitops.models import Delivery
from deployments.models import Repository

from .payloads import FORGES, post

AFTER = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"


@pytest.fixture
def hooked(repository, alice):
    """The repository ``fleet`` with a webhook secret; (repository, secret, url the forge names)."""
    secret = changes.rotate_webhook_secret(repository, user=alice)
    return repository, secret, repository.url


def events(name):
    return list(AuditEvent.objects.filter(action=name).order_by("seq"))


@pytest.mark.parametrize("provider", sorted(FORGES))
def test_a_signed_push_is_accepted_recorded_and_queued(provider, hooked, django_capture_on_commit_callbacks):
    repository, secret, url = hooked
    headers, body = FORGES[provider](url, after=AFTER, secret=secret)
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(Client(enforce_csrf_checks=True), provider, headers, body)
    assert response.status_code == 202, response.content
    assert response.json()["status"] == "accepted"
    (event,) = events("webhook.received")
    assert event.object_id == str(repository.pk)
    assert event.details["before"] == "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
    assert event.details["after"] == AFTER
    assert event.details["provider"] == provider
    assert event.actor_kind == "webhook"
    assert Delivery.objects.filter(provider=provider).count() == 1
    assert len(callbacks) == 1  # handle_push, queued after commit


@pytest.mark.parametrize("provider", sorted(FORGES))
def test_a_wrong_secret_is_refused_and_audited_without_the_secret(provider, hooked):
    repository, secret, url = hooked
    headers, body = FORGES[provider](url, after=AFTER, secret="not-the-secret")
    response = post(Client(), provider, headers, body, REMOTE_ADDR="198.51.100.7")
    assert response.status_code == 401
    assert not events("webhook.received")
    assert not Delivery.objects.exists()
    (event,) = events("webhook.refused")
    assert event.outcome == "denied"
    assert event.details["provider"] == provider
    assert event.details["source"] == "198.51.100.7"
    assert secret not in json.dumps(event.details) and "not-the-secret" not in json.dumps(event.details)


@pytest.mark.parametrize("provider", sorted(FORGES))
def test_a_missing_signature_is_refused(provider, hooked):
    repository, secret, url = hooked
    headers, body = FORGES[provider](url, after=AFTER, secret=secret)
    for name in (
        "X-Hub-Signature-256",
        "X-Gitea-Signature",
        "X-Forgejo-Signature",
        "X-Gitlab-Token",
        "X-Panel-Signature-256",
    ):
        headers.pop(name, None)
    assert post(Client(), provider, headers, body).status_code == 401


@pytest.mark.parametrize("provider", sorted(FORGES))
def test_an_unknown_repository_and_a_wrong_secret_get_the_same_answer(provider, hooked):
    repository, secret, url = hooked
    unknown = post(
        Client(), provider, *FORGES[provider]("https://git.example.org/nobody/else.git", secret=secret, after=AFTER)
    )
    wrong = post(Client(), provider, *FORGES[provider](url, secret="guess", after=AFTER))
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.content == wrong.content
    assert {e.details["reason"] for e in events("webhook.refused")} == {"bad signature", "no repository with this URL"}


def test_a_repository_without_a_secret_refuses_every_push(repository):
    headers, body = FORGES["github"](repository.url, after=AFTER, secret="")
    assert post(Client(), "github", headers, body).status_code == 401


@pytest.mark.parametrize("provider", sorted(FORGES))
def test_a_replayed_delivery_id_is_acknowledged_and_does_nothing(provider, hooked, django_capture_on_commit_callbacks):
    repository, secret, url = hooked
    headers, body = FORGES[provider](url, after=AFTER, secret=secret, delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    assert post(Client(), provider, headers, body).status_code == 202
    with django_capture_on_commit_callbacks() as callbacks:
        again = post(Client(), provider, headers, body)
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert len(events("webhook.received")) == 1
    assert callbacks == []


def test_the_generic_webhook_refuses_a_stale_timestamp(hooked):
    repository, secret, url = hooked
    headers, body = FORGES["generic"](url, after=AFTER, secret=secret, timestamp=int(time.time()) - 3600)
    assert post(Client(), "generic", headers, body).status_code == 401
    assert events("webhook.refused")[0].details["provider"] == "generic"


def test_the_generic_webhook_needs_a_delivery_id(hooked):
    repository, secret, url = hooked
    headers, body = FORGES["generic"](url, after=AFTER, secret=secret)
    del headers["X-Panel-Delivery"]
    response = post(Client(), "generic", headers, body)
    assert response.status_code == 400
    assert "X-Panel-Delivery" in response.json()["error"]


def test_the_generic_signature_covers_the_timestamp(hooked):
    repository, secret, url = hooked
    headers, body = FORGES["generic"](url, after=AFTER, secret=secret)
    headers["X-Panel-Timestamp"] = str(int(headers["X-Panel-Timestamp"]) + 1)  # moved, signature kept
    assert post(Client(), "generic", headers, body).status_code == 401


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_a_body_that_is_not_a_json_object_is_400(body, hooked):
    response = post(Client(), "github", {"X-GitHub-Event": "push", "X-GitHub-Delivery": "abc"}, body)
    assert response.status_code == 400
    assert "error" in response.json()


@pytest.mark.parametrize(
    "ref", ["refs/heads/main;reboot", "refs/heads/$(id)", "refs/heads/a b", "refs/heads/-rf", "refs/heads/`x`"]
)
def test_shell_characters_in_the_ref_are_refused(ref, hooked):
    repository, secret, url = hooked
    headers, body = FORGES["github"](url, ref=ref, after=AFTER, secret=secret)
    response = post(Client(), "github", headers, body)
    assert response.status_code == 400
    assert "branch name" in response.json()["error"]
    assert not events("webhook.received")


def test_shell_characters_in_the_delivery_id_are_refused(hooked):
    repository, secret, url = hooked
    headers, body = FORGES["github"](url, after=AFTER, secret=secret, delivery="abc;rm -rf /")
    assert post(Client(), "github", headers, body).status_code == 400


def test_a_commit_that_is_not_a_sha_is_refused(hooked):
    repository, secret, url = hooked
    headers, body = FORGES["github"](url, after="HEAD~1", secret=secret)
    assert post(Client(), "github", headers, body).status_code == 400


def test_a_push_to_another_branch_is_verified_and_ignored(hooked, django_capture_on_commit_callbacks):
    repository, secret, url = hooked
    headers, body = FORGES["github"](url, ref="refs/heads/feature", after=AFTER, secret=secret)
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(Client(), "github", headers, body)
    assert response.status_code == 202
    assert response.json()["status"] == "ignored"
    assert not events("webhook.received")
    assert callbacks == []


def test_a_github_ping_is_verified_and_ignored(hooked):
    repository, secret, url = hooked
    headers, body = FORGES["github"](url, after=AFTER, secret=secret)
    headers["X-GitHub-Event"] = "ping"
    assert post(Client(), "github", headers, body).json()["status"] == "ignored"


def test_a_deleted_branch_deploys_nothing(hooked):
    repository, secret, url = hooked
    headers, body = FORGES["github"](url, after=hooks.ZERO_SHA, secret=secret)
    assert post(Client(), "github", headers, body).json()["status"] == "ignored"


def test_a_body_over_the_limit_is_413(hooked, settings):
    settings.WEBHOOK_MAX_BYTES = 2048
    repository, secret, url = hooked
    headers, body = FORGES["github"](url, after=AFTER, secret=secret)
    big = body[:-1] + b', "padding": "' + b"x" * 4096 + b'"}'
    assert post(Client(), "github", headers, big).status_code == 413


def test_unknown_providers_and_other_methods_are_refused(hooked):
    assert Client().post("/hooks/bitbucket/", data=b"{}", content_type="application/json").status_code == 404
    response = Client().get("/hooks/github/")
    assert response.status_code == 405


def test_the_push_finds_the_repository_by_any_spelling_of_its_url(alice):
    repository = Repository.objects.create(name="octo", url="git@github.com:Octo-Org/fleet.git", branch="main")
    secret = changes.rotate_webhook_secret(repository, user=alice)
    headers, body = FORGES["github"]("https://github.com/octo-org/fleet", after=AFTER, secret=secret)
    assert post(Client(), "github", headers, body).status_code == 202


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("https://github.com/o/r.git", "git@github.com:o/r"),
        ("ssh://git@github.com:22/o/r.git", "https://token@github.com/o/r/"),
        ("/srv/git/fleet.git", "file:///srv/git/fleet"),
    ],
)
def test_urls_of_one_repository_normalize_alike(a, b):
    assert hooks.normalize_url(a) == hooks.normalize_url(b)


def test_urls_of_other_repositories_differ():
    assert hooks.normalize_url("https://github.com/o/r") != hooks.normalize_url("https://github.com/o/r2")
    assert hooks.normalize_url("https://github.com/o/r") != hooks.normalize_url("https://gitlab.com/o/r")
