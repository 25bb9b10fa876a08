"""API tokens: created and revoked on the page and through the API, stored as a hash, refused with 401
when malformed, unknown, revoked, expired or their user deactivated; audited without the secret."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from deployments.audit.models import AuditEvent
from deployments.models import Deployment
from deployments.restapi import tokens
from deployments.restapi.models import ApiToken

from .conftest import ApiClient, token_for

NODES = reverse("api-v1:node-list")


def _events(name):
    return AuditEvent.objects.filter(action=name).order_by("seq")


def _everything_audited() -> str:
    """Every stored audit event as text (fields and details), to search for what must never be there."""
    return "\n".join(repr(e.__dict__) for e in AuditEvent.objects.all())


def test_a_token_is_stored_as_the_hash_of_its_secret_only(bob):
    token, text = tokens.create_token(bob, name="ci")
    prefix, secret = tokens.TOKEN_RE.match(text).group("prefix", "secret")
    assert token.prefix == prefix and text.startswith("npt_")
    assert token.secret_hash == tokens.hash_secret(secret) and len(token.secret_hash) == 64
    row = ApiToken.objects.filter(pk=token.pk).values().get()
    assert not any(secret in str(v) for v in row.values())


def test_a_token_signs_its_user_in_and_its_use_is_audited_once_a_minute(bob):
    text = token_for(bob)
    client = ApiClient(text)
    for _ in range(3):
        assert client.get(NODES).status_code == 200
    used = _events("api_token.used")
    assert used.count() == 1
    assert used[0].actor_name == "bob" and used[0].details["prefix"] == text[4:12]
    token = ApiToken.objects.get()
    assert token.last_used_at is not None
    # A minute later the next use is recorded again.
    ApiToken.objects.update(last_used_at=token.last_used_at - timedelta(seconds=61))
    assert client.get(NODES).status_code == 200
    assert _events("api_token.used").count() == 2


def test_a_token_within_the_minute_costs_one_query(bob, django_assert_num_queries):
    text = token_for(bob)
    user, _ = tokens.authenticate(text)  # the first use writes last_used_at
    with django_assert_num_queries(1):
        user, token = tokens.authenticate(text)
    assert user == bob and token.user_id == bob.pk


@pytest.mark.parametrize(
    "header, reason",
    [
        ("Bearer npt_nothing", "malformed"),
        ("Bearer npt_0123abcd_" + "x" * 43, "unknown"),
        ("Bearer", "malformed"),
        ("Bearer a b", "malformed"),
        ("bearer npt_0123abcd_" + "y" * 43, "unknown"),
    ],
)
def test_a_bad_token_is_refused_with_401_and_audited(db, header, reason, caplog):
    with caplog.at_level(logging.DEBUG):
        response = Client().get(NODES, HTTP_AUTHORIZATION=header)
    assert "x" * 43 not in caplog.text and "y" * 43 not in caplog.text
    assert response.status_code == 401
    assert response.json()["error"] in ("malformed token", "invalid token")
    assert response["WWW-Authenticate"].startswith("Bearer")
    refused = _events("api_token.refused").get()
    assert refused.outcome == "denied" and refused.details["reason"] == reason
    assert "x" * 43 not in _everything_audited() and "y" * 43 not in _everything_audited()


def test_a_token_with_the_right_prefix_and_a_wrong_secret_is_refused(bob):
    text = token_for(bob)
    forged = text[:13] + ("A" if text[13] != "A" else "B") + text[14:]
    response = ApiClient(forged).get(NODES)
    assert response.status_code == 401 and response.json() == {"error": "invalid token"}
    assert _events("api_token.refused").get().details == {"reason": "unknown", "prefix": text[4:12]}
    assert not _events("api_token.used").exists()


def test_a_revoked_token_is_refused_at_once(bob):
    text = token_for(bob)
    client = ApiClient(text)
    assert client.get(NODES).status_code == 200
    tokens.revoke_token(ApiToken.objects.get(), user=bob)
    response = client.get(NODES)
    assert response.status_code == 401 and response.json() == {"error": "this token was revoked"}
    assert _events("api_token.refused").get().details["reason"] == "revoked"
    assert _events("api_token.revoked").get().actor_name == "bob"


def test_an_expired_token_is_refused(bob):
    text = token_for(bob, expires_in_days=1)
    token = ApiToken.objects.get()
    assert token.expires_at - token.created_at == timedelta(days=1)
    assert ApiClient(text).get(NODES).status_code == 200
    ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = ApiClient(text).get(NODES)
    assert response.status_code == 401 and response.json() == {"error": "this token has expired"}
    assert _events("api_token.refused").get().details["reason"] == "expired"


def test_a_deactivated_users_tokens_stop_working(bob):
    text = token_for(bob)
    bob.is_active = False
    bob.save()
    response = ApiClient(text).get(NODES)
    assert response.status_code == 401 and response.json() == {"error": "the token's user is deactivated"}


def test_a_token_with_a_session_cookie_of_another_user_acts_only_as_its_own_user(world):
    """The token decides alone: user A's token with B's session cookie is A (and a refused token is 401,
    never a fall-back to the session)."""
    viewer = world.persona("viewer-node")
    client = Client()
    client.force_login(world.persona("superuser"))
    text = token_for(viewer)
    seen = client.get(NODES, HTTP_AUTHORIZATION=f"Bearer {text}").json()["results"]
    assert [n["name"] for n in seen] == ["web-1"]
    assert client.get(NODES).json()["results"][1]["name"] == "web-1"  # the session alone: alice sees both
    assert client.get(NODES, HTTP_AUTHORIZATION="Bearer npt_0123abcd_" + "z" * 43).status_code == 401


def test_a_token_of_user_a_cannot_revoke_or_see_the_tokens_of_b(alice, bob):
    a = ApiClient(token_for(alice, name="a-script"))
    b_token, _ = tokens.create_token(bob, name="b-script")
    assert [t["name"] for t in a.get(reverse("api-v1:token-list")).json()] == ["a-script"]
    response = a.post(reverse("api-v1:token-revoke", kwargs={"pk": b_token.pk}))
    assert response.status_code == 404
    b_token.refresh_from_db()
    assert b_token.revoked_at is None


def test_a_token_cannot_make_tokens_but_the_session_can(bob, session_client):
    response = ApiClient(token_for(bob)).post(reverse("api-v1:token-list"), {"name": "child"})
    assert response.status_code == 403 and "session" in response.json()["error"]
    response = session_client(bob).post(reverse("api-v1:token-list"), {"name": "deploy bot", "expires_in_days": 30})
    assert response.status_code == 201
    body = response.json()
    assert body["token"].startswith(f"npt_{body['prefix']}_") and body["state"] == "active"
    assert ApiClient(body["token"]).get(NODES).status_code == 200
    # Listed afterwards without the secret.
    listed = session_client(bob).get(reverse("api-v1:token-list")).json()
    assert body["token"] not in str(listed) and listed[0]["display"] == f"npt_{body['prefix']}_…"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"name": "ci; rm -rf /"}, "name"),
        ({"name": "$(reboot)"}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "ci", "expires_in_days": 0}, "expires_in_days"),
        ({"name": "ci", "expires_in_days": "soon"}, "expires_in_days"),
        ({"name": "ci", "expires_in_days": 99999}, "expires_in_days"),
        ({"name": "ci", "scopes": ["all"]}, "scopes"),
    ],
)
def test_a_malformed_token_request_is_refused_with_field_errors(bob, session_client, data, field):
    response = session_client(bob).post(reverse("api-v1:token-list"), data)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid input" and field in response.json()["fields"]
    assert not ApiToken.objects.exists()


def test_revoking_twice_is_a_conflict(bob, session_client):
    token, _ = tokens.create_token(bob, name="ci")
    url = reverse("api-v1:token-revoke", kwargs={"pk": token.pk})
    assert session_client(bob).post(url).status_code == 200
    response = session_client(bob).post(url)
    assert response.status_code == 409 and "already revoked" in response.json()["error"]
    assert _events("api_token.revoked").count() == 1


# --- the page ------------------------------------------------------------------------------------


def test_the_page_shows_a_new_secret_once_and_never_again(bob, caplog):
    client = Client()
    client.force_login(bob)
    page = reverse("restapi:token-list")
    assert "API tokens" in client.get(reverse("deployments:dashboard")).content.decode()  # the nav link
    with caplog.at_level(logging.DEBUG):
        response = client.post(page, {"name": "laptop", "expires_in_days": "7"})
    assert response.status_code == 200
    token = ApiToken.objects.get()
    html = response.content.decode()
    secret_text = next(
        w for w in html.replace("<", " ").replace(">", " ").split() if w.startswith("npt_") and "…" not in w
    )
    assert tokens.TOKEN_RE.match(secret_text)
    assert ApiClient(secret_text).get(NODES).status_code == 200
    # Never again: the list page, the audit trail, the logs.
    again = client.get(page).content.decode()
    assert secret_text not in again and token.display in again
    secret = secret_text.split("_", 2)[2]
    assert secret not in _everything_audited()
    assert secret not in caplog.text
    created = _events("api_token.created").get()
    assert created.details["prefix"] == token.prefix and created.details["name"] == "laptop"


def test_the_page_revokes_only_ones_own_tokens(bob, charlie):
    mine, _ = tokens.create_token(bob, name="mine")
    theirs, _ = tokens.create_token(charlie, name="theirs")
    client = Client()
    client.force_login(bob)
    assert client.post(reverse("restapi:token-revoke", args=[theirs.pk])).status_code == 404
    response = client.post(reverse("restapi:token-revoke", args=[mine.pk]))
    assert response.status_code == 302
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert mine.revoked_at is not None and theirs.revoked_at is None
    assert "revoked" in client.get(reverse("restapi:token-list")).content.decode()


def test_the_page_refuses_a_bad_name_with_400(bob):
    client = Client()
    client.force_login(bob)
    response = client.post(reverse("restapi:token-list"), {"name": "a`id`"})
    assert response.status_code == 400 and not ApiToken.objects.exists()


def test_the_page_needs_csrf(bob):
    client = Client(enforce_csrf_checks=True)
    client.force_login(bob)
    assert client.post(reverse("restapi:token-list"), {"name": "ci"}).status_code == 403
    assert not ApiToken.objects.exists()


def test_a_token_loses_access_as_soon_as_its_users_teams_lose_the_grant(world):
    from deployments.access.models import Grant

    deployer = world.persona("deployer-node")
    client = ApiClient(token_for(deployer))
    url = reverse("api-v1:node-detail", kwargs={"name": "web-1"})
    assert client.get(url).status_code == 200
    Grant.objects.filter(team__members=deployer).delete()
    assert client.get(url).status_code == 404
    response = client.post(reverse("api-v1:deployment-list"), {"node": "web-1"})
    assert response.status_code == 404
    assert not Deployment.objects.filter(requested_by=deployer).exists()
