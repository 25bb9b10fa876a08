"""Credentials are encrypted at rest, write-only, and never shown again."""

import pytest
from django.db import connection

from deployments import inventory
from deployments.models import Credential
from tests.support.keys import ed25519_private_key, rsa_private_key_text

pytestmark = pytest.mark.django_db


def _raw_rows():
    with connection.cursor() as cur:
        cur.execute(
            "SELECT secret_encrypted, passphrase_encrypted, fingerprint, public_key FROM deployments_credential"
        )
        return [" ".join(str(c) for c in row) for row in cur.fetchall()]


def test_a_private_key_is_stored_encrypted_and_fingerprinted():
    secret = ed25519_private_key()
    cred = inventory.save_credential(Credential(name="k", kind="ssh-key"), secret=secret, actor_kind="cli")
    body = secret.splitlines()[1]
    assert all(body not in row for row in _raw_rows())
    assert cred.fingerprint.startswith("SHA256:")
    assert Credential.objects.get(pk=cred.pk).secret() == secret


def test_a_password_is_stored_encrypted():
    inventory.save_credential(Credential(name="p", kind="password"), secret="hunter2-but-long", actor_kind="cli")
    assert all("hunter2" not in row for row in _raw_rows())
    assert Credential.objects.get(name="p").display_fingerprint == "password (set)"


def test_an_rsa_key_with_a_passphrase_round_trips():
    import io

    import paramiko

    key = paramiko.RSAKey.generate(2048)
    out = io.StringIO()
    key.write_private_key(out, password="s3cret-phrase")
    cred = inventory.save_credential(
        Credential(name="r", kind="ssh-key"), secret=out.getvalue(), passphrase="s3cret-phrase", actor_kind="cli"
    )
    assert "s3cret-phrase" not in " ".join(_raw_rows())
    assert Credential.objects.get(pk=cred.pk).passphrase() == "s3cret-phrase"


def test_a_wrong_passphrase_is_refused_with_a_clear_error():
    import io

    import paramiko

    key = paramiko.RSAKey.generate(2048)
    out = io.StringIO()
    key.write_private_key(out, password="right-one")
    with pytest.raises(ValueError):
        Credential(name="r", kind="ssh-key").set_secret(out.getvalue(), "wrong-one")


def test_the_audit_trail_never_holds_the_secret():
    from deployments.audit.models import AuditEvent

    secret = rsa_private_key_text()
    inventory.save_credential(Credential(name="k2", kind="ssh-key"), secret=secret, actor_kind="cli")
    event = AuditEvent.objects.get(action="credential.created")
    dumped = str(event.details)
    assert secret.splitlines()[1] not in dumped
    assert "secret_encrypted" not in dumped


def test_the_admin_form_never_renders_a_stored_secret(client, alice):
    secret = ed25519_private_key()
    cred = inventory.save_credential(Credential(name="k3", kind="ssh-key"), secret=secret, actor_kind="cli")
    client.force_login(alice)
    page = client.get(f"/admin/deployments/credential/{cred.pk}/change/").content.decode()
    assert cred.fingerprint in page
    assert secret.splitlines()[1] not in page
    assert cred.secret_encrypted not in page


def test_an_undecryptable_secret_says_the_key_is_wrong(settings):
    cred = inventory.save_credential(Credential(name="k4", kind="password"), secret="pw-1234567", actor_kind="cli")
    from cryptography.fernet import Fernet

    settings.CREDENTIAL_KEYS = [Fernet.generate_key().decode()]
    with pytest.raises(ValueError, match="PANEL_CREDENTIAL_KEY"):
        Credential.objects.get(pk=cred.pk).secret()


def test_the_key_file_is_created_with_mode_0600(settings):
    import stat

    mode = (settings.DATA_DIR / "credential.key").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
