"""Management commands: clear errors for bad input, and --as obeys the permission gate."""

import io

import pytest
from django.core.management import CommandError, call_command

from deployments.audit.models import AuditEvent
from deployments.models import Credential, Node, Repository

from .helpers import ed25519_private_key

pytestmark = pytest.mark.django_db


def run(*args, stdin: str = "") -> str:
    import sys

    out, old = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        call_command(*args, stdout=out, stderr=out)
    finally:
        sys.stdin = old
    return out.getvalue()


def test_addcredential_reads_a_key_file_and_shows_only_the_fingerprint(tmp_path):
    key = tmp_path / "id"
    key.write_text(ed25519_private_key())
    out = run("addcredential", "k1", "--key-file", str(key))
    assert "SHA256:" in out and "PRIVATE KEY" not in out
    assert Credential.objects.get(name="k1").kind == "ssh-key"


def test_addcredential_reads_a_password_from_stdin():
    out = run("addcredential", "pw", "--password-stdin", stdin="s3cret-password\n")
    assert "password (set)" in out and "s3cret" not in out


def test_addcredential_explains_an_unreadable_key(tmp_path):
    key = tmp_path / "id"
    key.write_text("not a key")
    with pytest.raises(CommandError):
        run("addcredential", "bad", "--key-file", str(key))
    with pytest.raises(CommandError, match="No such file"):
        run("addcredential", "bad", "--key-file", str(tmp_path / "missing"))


def test_addnode_names_what_is_missing_or_malformed(inventory):
    with pytest.raises(CommandError, match="no repository"):
        run("addnode", "web2", "10.0.0.2", "--attr", "devm", "--repo", "nope", "--credential", "deploy-key")
    with pytest.raises(CommandError, match="flake_attr"):
        run("addnode", "web2", "10.0.0.2", "--attr", "devm;reboot", "--repo", "fleet", "--credential", "deploy-key")
    with pytest.raises(CommandError, match="host"):
        run("addnode", "web2", "$(reboot)", "--attr", "devm", "--repo", "fleet", "--credential", "deploy-key")
    assert not Node.objects.filter(name="web2").exists()


def test_addnode_registers_a_node_with_tags_and_says_its_key_is_not_pinned(inventory):
    out = run(
        "addnode",
        "web2",
        "10.0.0.2",
        "--attr",
        "devm",
        "--repo",
        "fleet",
        "--credential",
        "deploy-key",
        "--tag",
        "web",
        "--tag",
        "prod",
    )
    assert "host key not pinned" in out
    assert sorted(Node.objects.get(name="web2").tags.values_list("name", flat=True)) == ["prod", "web"]


def test_inventory_commands_acting_for_a_plain_user_are_refused(inventory, bob, tmp_path):
    key = tmp_path / "id"
    key.write_text(ed25519_private_key())
    with pytest.raises(CommandError, match="Only superusers") as exc:
        run("addcredential", "k9", "--key-file", str(key), "--as", "bob")
    assert exc.value.returncode == 2
    with pytest.raises(CommandError, match="Only superusers"):
        run("addrepo", "other", "/tmp/x", "--as", "bob")
    with pytest.raises(CommandError, match="Only superusers"):
        run(
            "addnode",
            "web3",
            "10.0.0.3",
            "--attr",
            "devm",
            "--repo",
            "fleet",
            "--credential",
            "deploy-key",
            "--as",
            "bob",
        )
    assert not Repository.objects.filter(name="other").exists()
    # Each refusal is one audit event, in bob's name.
    refused = AuditEvent.objects.filter(outcome="denied", actor_name="bob").order_by("seq")
    assert list(refused.values_list("action", flat=True)) == [
        "credential.created",
        "repository.created",
        "node.created",
    ]


def test_hostkey_for_a_user_who_cannot_see_the_node_does_not_reveal_it(inventory, bob):
    with pytest.raises(CommandError, match="no node 'web1'"):
        run("hostkey", "web1", "--as", "bob")


def test_an_unknown_acting_user_is_an_error(inventory):
    with pytest.raises(CommandError, match="no active user"):
        run("hostkey", "web1", "--as", "nobody")


def test_hostkey_pins_a_given_key_and_refuses_junk(inventory):
    out = run(
        "hostkey", "web1", "--key", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    )
    assert "pinned SHA256:" in out
    with pytest.raises(CommandError, match="Not an SSH public key"):
        run("hostkey", "web1", "--key", "ssh-ed25519 $(reboot)")
