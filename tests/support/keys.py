"""SSH keys for tests: fresh ones made in memory or by OpenSSH's own ssh-keygen, and a fixed host key."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

# A node's host key for rows that never connect; any syntactically valid key would do.
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"

# What a client may log in with: name -> (ssh-keygen -t, whether it has a passphrase).
CLIENT_KEY_KINDS = {
    "ed25519": ("ed25519", False),
    "rsa": ("rsa", False),
    "ecdsa": ("ecdsa", False),
    "ed25519-enc": ("ed25519", True),
}


def new_ed25519() -> tuple[str, str]:
    """A fresh Ed25519 key pair: (private key in OpenSSH format, 'ssh-ed25519 AAAA...' public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public


def ed25519_private_key() -> str:
    """A fresh Ed25519 private key in OpenSSH format."""
    return new_ed25519()[0]


def rsa_private_key_text() -> str:
    """A fresh 2048-bit RSA private key in PEM format (paramiko's)."""
    import paramiko

    key = paramiko.RSAKey.generate(2048)
    out = io.StringIO()
    key.write_private_key(out)
    return out.getvalue()


def keygen(path: Path, kind: str, passphrase: str = "") -> tuple[str, str]:
    """Write a key pair with ssh-keygen; return (private key text, public key line)."""
    args = ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "", "-f", str(path)]
    if kind == "rsa":
        args[4:4] = ["-b", "2048"]
    subprocess.run(args, check=True)
    return path.read_text(), Path(str(path) + ".pub").read_text().strip()


def client_keys(directory: Path, passphrase: str, prefix: str = "") -> dict[str, tuple[str, str, Path]]:
    """One key pair of each of CLIENT_KEY_KINDS, by ssh-keygen: name -> (private text, public line, .pub path)."""
    made = {}
    for name, (kind, encrypted) in CLIENT_KEY_KINDS.items():
        path = directory / f"{prefix}{name}"
        private, public = keygen(path, kind, passphrase if encrypted else "")
        made[name] = (private, public, Path(f"{path}.pub"))
    return made


def ssh_keygen_fingerprint(pub_path: Path) -> str:
    """The fingerprint `ssh-keygen -lf` prints for a public key file."""
    out = subprocess.run(["ssh-keygen", "-lf", str(pub_path)], check=True, capture_output=True, text=True).stdout
    return out.split()[1]
