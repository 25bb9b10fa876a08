"""deployments.remote.keys: host keys, private keys and fingerprints agree with OpenSSH's own tools."""

from __future__ import annotations

import shutil

import paramiko
import pytest

from deployments.remote import HostKey, key_fingerprint, load_private_key, openssh_fingerprint
from tests.support.keys import client_keys, ssh_keygen_fingerprint

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")


PASSPHRASE = "correct horse battery"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """name -> (private key text, public key line, .pub path), made by ssh-keygen."""
    return client_keys(tmp_path_factory.mktemp("keys"), PASSPHRASE)


def test_openssh_fingerprint_is_what_ssh_keygen_prints(keys):
    for _, public, pub_path in keys.values():
        assert openssh_fingerprint(public) == ssh_keygen_fingerprint(pub_path)
        assert openssh_fingerprint(public + " a comment") == ssh_keygen_fingerprint(pub_path)


def test_openssh_fingerprint_rejects_what_is_not_a_key_line():
    for junk in ("", "ssh-ed25519", "ssh-ed25519 not-base64!!", None):
        with pytest.raises(ValueError):
            openssh_fingerprint(junk)


def test_a_host_key_parses_from_every_form_openssh_writes(keys):
    _, public, pub_path = keys["ed25519"]
    key = HostKey.parse(public)
    assert key.openssh == public
    assert key.fingerprint == ssh_keygen_fingerprint(pub_path)
    assert HostKey.parse(f"[127.0.0.1]:2222 {public}") == key  # ssh-keyscan / known_hosts
    assert HostKey.parse(f"# comment\n{public} some comment") == key
    assert HostKey.from_pkey(key.to_pkey()) == key


def test_a_host_key_refuses_junk_and_mixed_up_types(keys):
    _, public, _ = keys["ed25519"]
    blob = public.split()[1]
    for junk in ("", "hello", "ssh-ed25519 not-base64!!", f"ssh-rsa {blob}", "ssh-dss AAAAB3Nza"):
        with pytest.raises(ValueError):
            HostKey.parse(junk)


def test_private_keys_load_and_their_fingerprints_match_ssh_keygen(keys):
    for name, (private, _, pub_path) in keys.items():
        passphrase = PASSPHRASE if name == "ed25519-enc" else None
        assert key_fingerprint(private, passphrase) == ssh_keygen_fingerprint(pub_path)
    assert isinstance(load_private_key(keys["ed25519"][0], "unused"), paramiko.Ed25519Key)  # passphrase ignored
    assert isinstance(load_private_key(keys["rsa"][0]), paramiko.RSAKey)
    assert isinstance(load_private_key(keys["ecdsa"][0]), paramiko.ECDSAKey)


def test_an_encrypted_key_says_what_is_wrong_without_echoing_the_passphrase(keys):
    encrypted = keys["ed25519-enc"][0]
    with pytest.raises(ValueError, match="passphrase is required"):
        load_private_key(encrypted)
    with pytest.raises(ValueError, match="wrong passphrase") as e:
        load_private_key(encrypted, "nope-not-it")
    assert "nope-not-it" not in str(e.value)
    with pytest.raises(ValueError, match="not a valid private key"):
        load_private_key("-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n-----END OPENSSH PRIVATE KEY-----\n")
