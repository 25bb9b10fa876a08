"""Logins, logouts and failed logins are on the chain, with where they came from."""

import pytest

from deployments.audit.models import AuditEvent
from tests.support.personas import password

pytestmark = pytest.mark.django_db


def test_a_login_is_recorded_with_source_and_request_id(client, bob):
    response = client.post(
        "/login/",
        {"username": "bob", "password": password("bob")},
        REMOTE_ADDR="198.51.100.7",
        HTTP_USER_AGENT="pytest-browser",
    )
    event = AuditEvent.objects.get(action="auth.login")
    assert (event.actor_name, event.actor_id, event.outcome) == ("bob", bob.pk, "success")
    assert (event.source_ip, event.user_agent) == ("198.51.100.7", "pytest-browser")
    assert event.request_id == response["X-Request-ID"]


def test_a_failed_login_records_the_name_tried_but_no_password(client, bob):
    client.post("/login/", {"username": "bob", "password": "wrong-password-1"}, REMOTE_ADDR="203.0.113.9")
    event = AuditEvent.objects.get(action="auth.login_failed")
    assert (event.actor_kind, event.actor_name, event.outcome) == ("anonymous", "bob", "failure")
    assert event.source_ip == "203.0.113.9"
    assert "wrong-password" not in str(event.details) + event.object_repr


def test_a_logout_is_recorded(client, bob):
    client.force_login(bob)
    client.post("/logout/")
    assert AuditEvent.objects.filter(action="auth.logout", actor_name="bob").exists()


def test_everything_one_request_caused_shares_its_id(client, bob):
    client.post("/login/", {"username": "bob", "password": password("bob")}, REMOTE_ADDR="::ffff:192.0.2.1")
    event = AuditEvent.objects.get(action="auth.login")
    assert len(event.request_id) == 32
    assert event.source_ip == "::ffff:192.0.2.1"
    from deployments.audit.verify import verify_chain

    assert verify_chain().ok
