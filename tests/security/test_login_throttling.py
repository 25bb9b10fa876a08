"""Repeated failed sign-ins lock the user name, and the address, for a while (django-axes); each lockout is
on the audit trail next to the failed logins it follows."""

import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.test import Client

from deployments.audit.models import AuditEvent
from tests.support.personas import password

pytestmark = pytest.mark.django_db

LIMIT = 3


@pytest.fixture(autouse=True)
def small_limit(settings):
    settings.AXES_FAILURE_LIMIT = LIMIT


def sign_in(username: str, password: str, address: str = "198.51.100.1"):
    return Client().post("/login/", {"username": username, "password": password}, REMOTE_ADDR=address)


def fail(n: int, username: str = "bob", address: str = "198.51.100.1"):
    for _ in range(n):
        sign_in(username, "not-the-password", address)


def test_the_defaults_are_sane():
    # The project's own settings, not this module's override.
    from controlpanel import settings as project

    assert 3 <= project.AXES_FAILURE_LIMIT <= 20
    assert project.AXES_COOLOFF_TIME.total_seconds() >= 60
    assert project.AXES_LOCKOUT_PARAMETERS == ["username", "ip_address"]
    assert "axes.backends.AxesStandaloneBackend" == project.AUTHENTICATION_BACKENDS[0]


def test_below_the_limit_the_right_password_still_works(bob):
    fail(LIMIT - 1)
    assert sign_in("bob", password("bob")).status_code == 302


def test_after_the_limit_even_the_right_password_is_refused_with_429(bob):
    fail(LIMIT)
    response = sign_in("bob", password("bob"))
    assert response.status_code == 429
    assert "Too many failed sign-ins" in response.content.decode()
    assert "_auth_user_id" not in Client().session.keys()


def test_the_lock_is_per_user_name_from_any_address(bob):
    for i in range(LIMIT):
        fail(1, "bob", f"198.51.100.{10 + i}")
    assert sign_in("bob", password("bob"), "203.0.113.50").status_code == 429


def test_the_lock_is_per_address_for_any_user_name(bob, charlie):
    for name in ("mallory", "trudy", "eve")[:LIMIT]:
        fail(1, name, "192.0.2.66")
    assert sign_in("charlie", password("charlie"), "192.0.2.66").status_code == 429
    assert sign_in("charlie", password("charlie"), "192.0.2.67").status_code == 302, "other addresses are not locked"


def test_each_failure_and_the_lockout_are_audited(bob):
    fail(LIMIT, address="203.0.113.9")
    failed = AuditEvent.objects.filter(action="auth.login_failed")
    assert failed.count() == LIMIT, "the failed logins stay on the trail"
    locked = AuditEvent.objects.get(action="auth.locked_out")
    assert (locked.actor_kind, locked.actor_name, locked.outcome) == ("anonymous", "bob", "denied")
    assert locked.source_ip == "203.0.113.9"
    assert locked.details["failure_limit"] == LIMIT
    sign_in("bob", password("bob"), "203.0.113.9")
    assert AuditEvent.objects.filter(action="auth.locked_out").count() == 2, "a refused attempt is recorded too"
    assert not AuditEvent.objects.filter(action="auth.login").exists()


def test_the_lock_lifts_after_the_cool_off(bob):
    fail(LIMIT)
    assert sign_in("bob", password("bob")).status_code == 429
    # As if the cool-off had passed since the last failure.
    AccessAttempt.objects.update(attempt_time=AccessAttempt.objects.first().attempt_time - settings.AXES_COOLOFF_TIME)
    assert sign_in("bob", password("bob")).status_code == 302


def test_no_password_is_kept_by_the_throttle(bob):
    fail(1)
    attempt = AccessAttempt.objects.get()
    assert "not-the-password" not in attempt.post_data


def test_each_test_starts_unlocked(bob):
    # The attempts of the tests above lived in their own rolled-back transactions.
    assert not AccessAttempt.objects.exists()
    assert sign_in("bob", password("bob")).status_code == 302
