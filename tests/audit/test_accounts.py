"""Changes to user accounts are on the trail, whoever makes them: the Django admin, createsuperuser,
changepassword, the shell; command-line events name the OS user and the host.
"""

import io
import json
import os
import pwd
import socket

import pytest
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Group, Permission
from django.core.management import call_command
from django.db import transaction

from deployments.audit.models import AuditEvent
from deployments.audit.writer import record

pytestmark = pytest.mark.django_db
ME = pwd.getpwuid(os.geteuid()).pw_name


def events(action: str, **filters) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action, **filters).order_by("seq"))


def own(details: dict) -> dict:
    """An event's details without what every command-line event carries (the OS user and host)."""
    return {k: v for k, v in details.items() if k not in ("os_user", "host", "login_user", "sudo_user")}


def stored_text() -> str:
    """Everything the trail holds, as text: no password hash may appear in it."""
    return json.dumps(list(AuditEvent.objects.values()), default=str)


def admin_form(user, **changes) -> dict:
    """The admin's change form for ``user`` as a browser would post it back."""
    data = {
        "username": user.username,
        "email": user.email,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "date_joined_0": user.date_joined.strftime("%Y-%m-%d"),
        "date_joined_1": user.date_joined.strftime("%H:%M:%S"),
        "groups": [g.pk for g in user.groups.all()],
        "user_permissions": [],
    }
    for flag in ("is_active", "is_staff", "is_superuser"):
        if getattr(user, flag):
            data[flag] = "on"
    for name, value in changes.items():
        if value is False:
            data.pop(name, None)
        else:
            data[name] = "on" if value is True else value
    return data


def test_createsuperuser_is_recorded_with_the_os_user_and_host(monkeypatch):
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "a-long-pass-phrase-1")
    call_command(
        "createsuperuser", "--noinput", "--username", "eve", "--email", "eve@example.com", stdout=io.StringIO()
    )
    (event,) = events("user.created")
    assert (event.actor_kind, event.object_type, event.object_repr) == ("cli", "user", "eve")
    assert event.details["after"]["is_superuser"] is True and event.details["password"] == "set"
    assert event.details["os_user"] == ME and event.details["host"] == socket.gethostname()
    from django.contrib.auth import get_user_model

    assert get_user_model().objects.get(username="eve").password not in stored_text()


def test_changepassword_is_recorded_without_the_hash(bob, monkeypatch):
    import getpass

    monkeypatch.setattr(getpass, "getpass", lambda prompt="": "another-long-pass-1")
    call_command("changepassword", "bob", stdout=io.StringIO())
    (event,) = events("user.password_changed")
    assert (event.actor_kind, event.object_repr, event.details["usable"]) == ("cli", "bob", True)
    bob.refresh_from_db()
    assert bob.password not in stored_text() and "another-long-pass-1" not in stored_text()
    assert not events("user.changed")


def test_an_admin_making_someone_superuser_is_recorded_with_before_and_after(client, alice, bob):
    group = Group.objects.create(name="operators")
    client.force_login(alice)
    response = client.post(
        f"/admin/auth/user/{bob.pk}/change/",
        admin_form(bob, is_staff=True, is_superuser=True, email="bob@evil.example", groups=[group.pk]),
    )
    assert response.status_code == 302, response.content[:2000]
    (event,) = events("user.changed")
    assert (event.actor_kind, event.actor_name, event.object_repr) == ("user", "alice", "bob")
    assert event.details["before"] == {"email": "bob@example.com", "is_staff": False, "is_superuser": False}
    assert event.details["after"] == {"email": "bob@evil.example", "is_staff": True, "is_superuser": True}
    assert event.request_id and event.source_ip == "127.0.0.1"
    (joined,) = events("user.groups_changed")
    assert joined.details == {"added": ["operators"]} and joined.request_id == event.request_id


def test_deactivating_a_user_in_the_admin_is_recorded(client, alice, bob):
    client.force_login(alice)
    assert client.post(f"/admin/auth/user/{bob.pk}/change/", admin_form(bob, is_active=False)).status_code == 302
    (event,) = events("user.changed")
    assert event.details == {"before": {"is_active": True}, "after": {"is_active": False}}


def test_a_password_set_in_the_admin_is_recorded_without_the_hash(client, alice, bob):
    client.force_login(alice)
    response = client.post(
        f"/admin/auth/user/{bob.pk}/password/",
        {"password1": "brand-new-pass-99", "password2": "brand-new-pass-99", "usable_password": "true"},
    )
    assert response.status_code == 302, response.content[:2000]
    (event,) = events("user.password_changed")
    assert (event.actor_name, event.object_repr, event.details) == ("alice", "bob", {"usable": True})
    bob.refresh_from_db()
    assert bob.password not in stored_text()


def test_users_added_and_deleted_in_the_admin_are_recorded(client, alice):
    client.force_login(alice)
    response = client.post(
        "/admin/auth/user/add/",
        {
            "username": "mallory",
            "password1": "mallory-pass-123",
            "password2": "mallory-pass-123",
            "usable_password": "true",
        },
    )
    assert response.status_code == 302, response.content[:2000]
    (created,) = events("user.created", object_repr="mallory")
    assert created.actor_name == "alice"
    pk = created.object_id
    assert client.post(f"/admin/auth/user/{pk}/delete/", {"post": "yes"}).status_code == 302
    (deleted,) = events("user.deleted")
    assert (deleted.actor_name, deleted.object_id, deleted.details["before"]["username"]) == ("alice", pk, "mallory")


def sign_in(client, username: str, password: str) -> None:
    response = client.post("/login/", {"username": username, "password": password})
    assert response.status_code == 302, response.content[:2000]


def test_a_sign_in_is_not_an_account_change(client, bob):
    bob.password = make_password("bob-pass-phrase-12")
    bob.save(update_fields=["password"])
    recorded = AuditEvent.objects.filter(action__startswith="user.").count()
    sign_in(client, "bob", "bob-pass-phrase-12")  # saves last_login
    assert AuditEvent.objects.filter(action__startswith="user.").count() == recorded


def test_a_hash_upgraded_at_sign_in_is_not_a_password_change(client, bob):
    # Django re-hashes a password stored in an outdated form (here: a short salt) when its owner signs in.
    bob.password = make_password("bob-pass-phrase-12", salt="ab")
    bob.save(update_fields=["password"])
    before = len(events("user.password_changed"))
    old = bob.password
    sign_in(client, "bob", "bob-pass-phrase-12")
    bob.refresh_from_db()
    assert bob.password != old  # upgraded ...
    assert len(events("user.password_changed")) == before  # ... and not recorded as a change


def test_a_password_made_unusable_is_a_change(bob):
    bob.set_unusable_password()
    bob.save()
    (event,) = events("user.password_changed")
    assert event.details["usable"] is False


def test_changes_from_the_shell_are_recorded_as_the_command_line(bob, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "operator")
    bob.is_superuser = True
    bob.save()
    (event,) = events("user.changed")
    assert event.actor_kind == "cli"
    assert (event.details["os_user"], event.details["host"], event.details["sudo_user"]) == (
        ME,
        socket.gethostname(),
        "operator",
    )


def test_saving_only_other_fields_does_not_record_unsaved_flags(bob):
    bob.is_superuser = True  # not saved: update_fields names only the e-mail
    bob.email = "new@example.com"
    bob.save(update_fields=["email"])
    (event,) = events("user.changed")
    assert event.details["after"] == {"email": "new@example.com"}


def test_group_memberships_are_recorded_from_either_side(bob, alice):
    ops, web = Group.objects.create(name="ops"), Group.objects.create(name="web")
    bob.groups.add(ops, web)
    ops.user_set.add(alice)
    bob.groups.remove(web)
    bob.groups.clear()
    ops.user_set.clear()
    got = [(e.object_repr, own(e.details)) for e in events("user.groups_changed")]
    assert got == [
        ("bob", {"added": ["ops", "web"]}),
        ("alice", {"added": ["ops"]}),
        ("bob", {"removed": ["web"]}),
        ("bob", {"removed": ["ops"]}),
        ("alice", {"removed": ["ops"]}),
    ]


def test_permissions_and_groups_themselves_are_recorded(bob):
    perm = Permission.objects.get(codename="view_auditevent")
    bob.user_permissions.add(perm)
    group = Group.objects.create(name="viewers")
    group.permissions.add(perm)
    group.name = "readers"
    group.save()
    group.user_set.add(bob)
    group.delete()
    assert own(events("user.permissions_changed")[0].details) == {"added": ["audit.view_auditevent"]}
    assert own(events("group.permissions_changed")[0].details) == {"added": ["audit.view_auditevent"]}
    assert own(events("group.changed")[0].details) == {"before": {"name": "viewers"}, "after": {"name": "readers"}}
    assert own(events("group.deleted")[0].details) == {"name": "readers", "members": ["bob"]}
    assert [e.action for e in events("group.created")] == ["group.created"]


def test_a_user_deleted_from_the_shell_is_recorded(bob):
    bob.delete()
    (event,) = events("user.deleted")
    assert (event.actor_kind, event.details["before"]["username"]) == ("cli", "bob")


def test_an_account_change_is_undone_with_its_transaction(bob):
    with pytest.raises(RuntimeError), transaction.atomic():
        bob.is_staff = True
        bob.save()
        raise RuntimeError("the change fails later")
    assert not events("user.changed")


def test_every_command_line_event_carries_the_os_user_and_host():
    with transaction.atomic():
        event = record("test.event", actor_kind="cli")
    assert event.details["os_user"] == ME and event.details["host"] == socket.gethostname()
    with transaction.atomic():
        explicit = record("test.event", actor_kind="cli", details={"host": "given"})
    assert explicit.details["host"] == "given"  # a caller's own value is kept
    with transaction.atomic():
        system = record("test.event", actor_kind="system")
    assert "os_user" not in system.details
