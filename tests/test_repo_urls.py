"""Repository URLs are refused unless git fetches them safely; a token stored before that is never shown.

Also: the node form re-shows a name the URL cannot hold with its error instead of failing.
"""

from __future__ import annotations

import json

import pytest
from django.core.exceptions import ValidationError
from django.db import transaction

from deployments import inventory
from deployments.audit.models import AuditEvent
from deployments.audit.writer import record
from deployments.models import Credential, Node, Repository
from deployments.validators import redact_url_secrets, validate_repo_url
from tests.support.forms import node_form_data

pytestmark = pytest.mark.django_db

TOKEN = "ghp_L3akedT0kenDoNotShow"
LEGACY_URL = f"https://deploy:{TOKEN}@github.com/org/fleet.git"

# (URL, a word the refusal's message must hold)
HOSTILE = [
    ("-oProxyCommand=touch /tmp/pwned", "not allowed"),
    ("--upload-pack=touch /tmp/pwned", "not allowed"),
    ("--upload-pack=id", "Enter a git URL"),
    ("ssh://-oProxyCommand=id/x", "not a host"),
    ("ssh://%2doProxyCommand=id/x", "not a host"),  # git percent-decodes before it splits the URL
    ("ssh://-u@host/x", "user name"),
    ("git@-x:y", "not a host"),
    ("-x:y", "Enter a git URL"),
    ("git@host:-y", "start with '-'"),
    ("ssh://host/-x/repo.git", "start with '-'"),
    ("/srv/-x/repo", "start with '-'"),
    ("ext::sh -c id", "not allowed"),
    ("ext::id", "remote helpers"),
    ("fd::17", "remote helpers"),
    ("ftp://example.org/repo.git", "not allowed"),
    ("file://evil.example.org/repo", "local path"),
    ("https://example.org", "no repository path"),
    ("https://example.org:port/x.git", "port"),
    ("https://example.org/x.git?upload-pack=id", "not allowed"),
    ("relative/path", "Enter a git URL"),
    ("https://example.org/$(id).git", "'$'"),
    ("repo; id", "not allowed"),
    ("https://example.org/fleet\u202egit.exe", "U+202E"),
    ("https://example.org/a\u2066b\u2069.git", "U+2066"),
    ("https://example.org/a\u200bb.git", "U+200B"),
    ("https://example.org/a\x00b.git", "U+0000"),
    ("https://example.org/a%0ab.git", "U+000A"),
    ("https://example.org/a\nb.git", "U+000A"),
    ("", "Enter a git URL"),
]
TOKENS = [
    LEGACY_URL,
    f"https://{TOKEN}@github.com/org/fleet.git",
    f"https://x-access-token:{TOKEN}@github.com/org/fleet.git",
    f"ssh://git:{TOKEN}@example.org/fleet.git",
    f"git:{TOKEN}@example.org:fleet.git",
    f"http://oauth2:{TOKEN}@gitlab.example.org/fleet.git",
]
GOOD = [
    "https://github.com/NixOS/nixpkgs.git",
    "ssh://git@example.org:2222/infra/fleet.git",
    "ssh://[fe80::1]/srv/fleet",
    "git@github.com:org/fleet.git",
    "example.org:fleet.git",
    "git://git.example.org/fleet",
    "file:///srv/flakes/fleet",
    "/srv/flakes/fleet",
    "http://10.0.0.5:8080/fleet.git",
]


@pytest.mark.parametrize("url,reason", HOSTILE, ids=[repr(u)[:40] for u, _ in HOSTILE])
def test_hostile_urls_are_refused_with_a_reason(url, reason):
    with pytest.raises(ValidationError) as exc:
        validate_repo_url(url)
    assert reason in exc.value.messages[0]


@pytest.mark.parametrize("url", TOKENS)
def test_a_token_in_the_url_is_refused_pointing_to_credentials_and_never_repeated(url):
    with pytest.raises(ValidationError) as exc:
        validate_repo_url(url)
    message = exc.value.messages[0]
    assert "credential" in message and TOKEN not in message


@pytest.mark.parametrize("url", GOOD)
def test_ordinary_urls_pass(url):
    validate_repo_url(url)


@pytest.mark.parametrize("url", [u for u, _ in HOSTILE] + TOKENS, ids=lambda u: repr(u)[:40])
def test_the_repository_form_refuses_each_with_a_message_and_stores_nothing(alice_client, url):
    events = AuditEvent.objects.count()
    response = alice_client.post("/repositories/new/", {"name": "fleet", "url": url, "branch": "main"})
    page = response.content.decode()
    assert response.status_code == 200 and "field-error" in page
    assert not Repository.objects.exists() and AuditEvent.objects.count() == events
    assert TOKEN not in page, "a refused token is not shown back"


# --- rows stored before URLs were validated -----------------------------------------


@pytest.fixture
def legacy(db):
    """A repository stored with a token in its URL (validators bypassed, as before they existed), used by a node."""
    repository = Repository.objects.create(name="fleet", url=LEGACY_URL, branch="main")
    credential = Credential(name="pw", kind=Credential.Kind.PASSWORD)
    credential.set_secret("pw-secret")
    credential.save()
    node = Node.objects.create(
        name="web1", host="192.0.2.1", flake_attr="web1", repository=repository, credential=credential
    )
    with transaction.atomic():
        # An event written then: the URL in its details is part of the hashed record.
        record("repository.created", obj=repository, actor_kind="cli", details={"after": {"url": LEGACY_URL}})
    return {"repository": repository, "node": node}


def test_display_url_redacts_the_token_and_keeps_the_rest(legacy):
    assert legacy["repository"].display_url == "https://***@github.com/org/fleet.git"
    assert redact_url_secrets("ssh://git@example.org/x") == "ssh://git@example.org/x"
    assert redact_url_secrets(f"git:{TOKEN}@example.org:fleet.git") == "***@example.org:fleet.git"


def test_no_page_shows_a_legacy_token(alice_client, legacy):
    repository = legacy["repository"]
    event = AuditEvent.objects.get(action="repository.created")
    pages = [
        "/nodes/web1/",
        "/repositories/",
        f"/repositories/{repository.pk}/",
        "/admin/deployments/repository/",
        f"/admin/deployments/repository/{repository.pk}/change/",
        f"/audit/events/{event.seq}/",
    ]
    for url in pages:
        response = alice_client.get(url)
        assert response.status_code == 200, url
        page = response.content.decode()
        assert TOKEN not in page, url
        assert "github.com/org/fleet.git" in page or url == "/nodes/web1/" and "fleet" in page, url


def test_the_stored_event_is_left_as_hashed(legacy):
    """Only what is shown is redacted: the event keeps its details, so the chain and exports still verify."""
    assert AuditEvent.objects.get(action="repository.created").details["after"]["url"] == LEGACY_URL


def test_changing_or_deleting_a_legacy_row_does_not_write_the_token_again(alice, legacy):
    repository = legacy["repository"]
    repository.branch = "release"
    inventory.save_object(repository, user=alice)
    legacy["node"].delete()
    inventory.delete_unused(repository, user=alice)
    for action in ("repository.changed", "repository.deleted"):
        details = json.dumps(AuditEvent.objects.get(action=action).details)
        assert TOKEN not in details, action
    assert "https://***@github.com/org/fleet.git" in details


def test_saving_a_legacy_row_from_its_page_needs_a_clean_url(alice_client, legacy):
    repository = legacy["repository"]
    shown = repository.display_url
    response = alice_client.post(f"/repositories/{repository.pk}/", {"name": "fleet", "url": shown, "branch": "main"})
    assert response.status_code == 200 and "credential" in response.content.decode()
    repository.refresh_from_db()
    assert repository.url == LEGACY_URL, "nothing changed until a clean URL is given"
    clean = "git@github.com:org/fleet.git"
    response = alice_client.post(f"/repositories/{repository.pk}/", {"name": "fleet", "url": clean, "branch": "main"})
    assert response.status_code == 302
    repository.refresh_from_db()
    assert repository.url == clean


# --- node names the URL cannot hold ----------------------------------------------------


@pytest.mark.parametrize("name", ["a/b", "web1/../x", "we b", "web\u202e1", "%2F"])
def test_the_node_form_shows_a_bad_name_again_with_its_error(alice_client, legacy, name):
    node = legacy["node"]
    response = alice_client.post("/nodes/web1/edit/", node_form_data(node, name=name))
    page = response.content.decode()
    assert response.status_code in (200, 400) and "Node names use" in page
    assert 'href="/nodes/web1/"' in page, "the page links the node as saved"
    node.refresh_from_db()
    assert node.name == "web1"
