"""Hostile values × every field a user can type into: each is answered with a 4xx that says what is wrong,
nothing is stored, and the server logs no error (``django.request`` ERROR means a 500).

A field is an *identifier* (node, host, user, attribute, tag, revision, team names; filters on them),
which refuses every hostile value here, or *free text* (search terms, a team's description), which
refuses what cannot be seen or is overlong and otherwise searches for, or keeps, what was typed — a
reviewer may search the trail for ``$(id)``.  The credential and repository pages add their fields to
``CREDENTIAL_AND_REPOSITORY_FIELDS``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.test import Client

from deployments.access.models import Grant, Team
from deployments.models import Deployment, Node, Tag

pytestmark = pytest.mark.django_db

HOSTILE = {
    "NUL": "web\x00x",
    "escape sequence": "web\x1b[2Jx",
    "newline": "web\nx",
    "bidi override": "web\u202ex",
    "zero-width space": "web\u200bx",
    "10 kB": "w" * 10_000,
    "shell metacharacters": "$(reboot);id`x`|y",
    "dot-dot path": "../../etc/passwd",
    "URL-encoded slash": "a%2Fb",
    "unicode look-alike": "w\u0435b-1",  # Cyrillic е
    "option": "--upload-pack=touch /tmp/x",
}
# Refused even by free-text fields.
INVISIBLE_OR_OVERLONG = {"NUL", "escape sequence", "newline", "bidi override", "zero-width space", "10 kB"}


@dataclass
class Field:
    """One field of one form or API body: ``send(client, world, value)`` answers the request."""

    name: str
    send: Callable
    free_text: bool = False

    def __str__(self) -> str:
        return self.name


def node_data(node: Node | None, **change) -> dict:
    data = {
        "name": "web2",
        "host": "192.0.2.20",
        "port": "22",
        "ssh_user": "root",
        "flake_attr": "devm",
        "tag_names": "web",
    }
    if node is not None:
        data.update(
            name=node.name,
            host=node.host,
            ssh_user=node.ssh_user,
            flake_attr=node.flake_attr,
            repository=node.repository_id,
            credential=node.credential_id,
        )
    return {**data, **change}


def node_form(url: str, field: str) -> Callable:
    def send(client, world, value):
        node = world["node"]
        data = node_data(node, **{field: value})
        if url.endswith("/new/"):
            data["name"] = value if field == "name" else "web2"
        return client.post(url, data)

    return send


def api_deploy(field: str) -> Callable:
    def send(client, world, value):
        body = json.dumps({"action": "switch", field: value})
        return client.post("/api/nodes/web1/deploy/", body, content_type="application/json")

    return send


def get(url: str, field: str) -> Callable:
    return lambda client, world, value: client.get(url, {field: value})


def post(url: Callable[[dict], str], field: str, **base) -> Callable:
    return lambda client, world, value: client.post(url(world), {**base, field: value})


FIELDS = [
    *[Field(f"node add: {f}", node_form("/nodes/new/", f)) for f in ("name", "host", "ssh_user", "flake_attr")],
    Field("node add: tags", node_form("/nodes/new/", "tag_names")),
    Field("node add: port", node_form("/nodes/new/", "port")),
    *[Field(f"node edit: {f}", node_form("/nodes/web1/edit/", f)) for f in ("name", "host", "ssh_user", "flake_attr")],
    Field("node edit: tags", node_form("/nodes/web1/edit/", "tag_names")),
    Field("deploy page: revision", post(lambda w: "/nodes/web1/deploy/", "revision", action="switch")),
    Field("deploy page: action", post(lambda w: "/nodes/web1/deploy/", "action")),
    Field("API deploy: revision", api_deploy("revision")),
    Field("API deploy: action", api_deploy("action")),
    Field("team: name", post(lambda w: "/teams/new/", "name")),
    Field("team: description", post(lambda w: "/teams/new/", "description", name="ops2"), free_text=True),
    Field("team member: user name", post(lambda w: f"/teams/{w['team'].pk}/members/", "username")),
    Field("grant: tag", post(lambda w: f"/teams/{w['team'].pk}/grants/", "tag", role="viewer", scope="tag")),
    Field("nodes: search", get("/", "q"), free_text=True),
    Field("nodes: tag filter", get("/", "tag")),
    Field("deployments: node filter", get("/deployments/", "node")),
    Field("deployments: status filter", get("/deployments/", "status")),
    Field("audit: search", get("/audit/", "q"), free_text=True),
    Field("audit: actor filter", get("/audit/", "actor"), free_text=True),
    Field("audit: node filter", get("/audit/", "node"), free_text=True),
    Field("audit: event filter", get("/audit/", "action"), free_text=True),
    Field("audit export: search", get("/audit/export.csv", "q"), free_text=True),
]

# The credential and repository pages' fields (names, repository URLs, branches): Field(...) entries,
# each sending one value to its form; they are run against every hostile value like the others.
CREDENTIAL_AND_REPOSITORY_FIELDS: list[Field] = []


@pytest.fixture
def world(inventory):
    return {**inventory, "team": Team.objects.create(name="ops")}


@pytest.fixture
def superuser(alice):
    client = Client()
    client.force_login(alice)
    return client


def stored() -> tuple:
    """What a request could have written: nodes, tags, teams, grants, deployments."""
    return (
        sorted(Node.objects.values_list("name", "host", "port", "ssh_user", "flake_attr")),
        sorted(Tag.objects.values_list("name", flat=True)),
        sorted(Team.objects.values_list("name", "description")),
        sorted(Grant.objects.values_list("team_id", "role", "scope", "tag")),
        Deployment.objects.count(),
    )


def has_message(response) -> bool:
    """The answer says what is wrong: a JSON ``error``, an error shown on the page, or a plain-text reason."""
    content_type = response.get("Content-Type", "")
    if content_type.startswith("application/json"):
        return bool(response.json().get("error"))
    text = response.content.decode(errors="replace")
    if content_type.startswith("text/plain"):
        return bool(text.strip())
    return any(mark in text for mark in ('class="field-error"', 'class="errorlist', 'role="alert"'))


@pytest.mark.parametrize("field", FIELDS + CREDENTIAL_AND_REPOSITORY_FIELDS, ids=str)
@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_value_is_a_clean_4xx_and_stores_nothing(superuser, world, field, kind, caplog):
    before = stored()
    with caplog.at_level(logging.WARNING, logger="django.request"):
        response = field.send(superuser, world, HOSTILE[kind])
    assert not [r for r in caplog.records if r.name == "django.request" and r.levelno >= logging.ERROR]
    assert response.status_code < 500
    if field.free_text and kind not in INVISIBLE_OR_OVERLONG:
        # Visible text in a free-text field is searched for (or kept) as typed.
        assert response.status_code in (200, 302), f"{field} {kind}: {response.status_code}"
        return
    assert 400 <= response.status_code < 500, f"{field} {kind}: {response.status_code}"
    assert has_message(response), f"{field} {kind}: no message in the answer"
    assert stored() == before, f"{field} {kind}: something was stored"


# Bytes that are not UTF-8, sent raw and percent-encoded, in place of a form's value.
NON_UTF8 = {"raw": b"web\xff\xfe1", "percent-encoded": b"web%FF%FE1"}


@pytest.mark.parametrize("encoding", NON_UTF8)
@pytest.mark.parametrize(
    "url,field",
    [
        ("/nodes/new/", "name"),
        ("/nodes/web1/edit/", "host"),
        ("/nodes/web1/deploy/", "revision"),
        ("/teams/new/", "name"),
    ],
)
def test_non_utf8_bytes_in_a_form_body_are_refused(superuser, world, url, field, encoding, caplog):
    from urllib.parse import urlencode

    data = node_data(world["node"]) if url.startswith("/nodes/") and "deploy" not in url else {"action": "switch"}
    data.pop(field, None)
    body = urlencode(data).encode() + b"&" + field.encode() + b"=" + NON_UTF8[encoding]
    before = stored()
    response = superuser.generic("POST", url, body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400, response.status_code
    assert stored() == before
    assert not [r for r in caplog.records if r.name == "django.request" and r.levelno >= logging.ERROR]


def test_non_utf8_bytes_in_a_search_are_refused(superuser, world):
    response = superuser.generic("GET", "/?q=web%FF1")
    assert response.status_code == 400 and "U+FFFD" in response.content.decode()


def test_non_utf8_bytes_in_a_json_body_are_refused(superuser, world):
    response = superuser.generic(
        "POST", "/api/nodes/web1/deploy/", b'{"revision": "web\xff"}', content_type="application/json"
    )
    assert response.status_code == 400 and "UTF-8" in response.json()["error"]
    assert not Deployment.objects.exists()
