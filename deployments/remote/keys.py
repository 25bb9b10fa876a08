"""SSH keys: pinned host keys, private keys for login, and their SHA256 fingerprints.

No Django and no network here. Errors are ``ValueError`` with a message that
never contains a private key or passphrase.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import struct
from dataclasses import dataclass

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

__all__ = ["HOST_KEY_TYPES", "HostKey", "key_fingerprint", "load_private_key", "openssh_fingerprint"]

# Host key types a node's key may be pinned as.
HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)


def openssh_fingerprint(openssh_line: str) -> str:
    """``SHA256:<unpadded base64>`` of an OpenSSH public key line, as ``ssh-keygen -l`` prints it.

    ``openssh_line`` is ``"<type> <base64> [comment]"`` (authorized_keys or .pub
    form). Raises ``ValueError`` when its second field is not base64.
    """
    fields = openssh_line.split() if isinstance(openssh_line, str) else []
    if len(fields) < 2:
        raise ValueError("not an OpenSSH public key line (expected '<type> <base64>')")
    try:
        blob = base64.b64decode(fields[1].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("the public key is not valid base64") from None
    # The hash is over the wire-format key blob, which is what the base64 field holds.
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class HostKey:
    """A node's public host key, as pinned in the panel.

    ``key_type`` is the OpenSSH key type (``ssh-ed25519``, ``ecdsa-sha2-nistp256``,
    ``ssh-rsa``, ...), ``base64`` the wire-format key blob. Construction validates
    both and raises ``ValueError`` on junk.
    """

    key_type: str
    base64: str

    def __post_init__(self) -> None:
        if self.key_type not in HOST_KEY_TYPES:
            raise ValueError(f"unsupported host key type {self.key_type!r}")
        try:
            blob = base64.b64decode(self.base64.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise ValueError("host key is not valid base64") from None
        # The blob starts with the key type as an SSH string; a mismatch means a
        # copy/paste mix-up of type and key.
        if len(blob) < 4:
            raise ValueError("host key blob is too short")
        (n,) = struct.unpack(">I", blob[:4])
        if blob[4 : 4 + n] != self.key_type.encode():
            raise ValueError(f"host key data does not hold a {self.key_type} key")
        try:
            paramiko.PKey.from_type_string(self.key_type, blob)
        except Exception:
            raise ValueError(f"host key is not a valid {self.key_type} key") from None

    @property
    def openssh(self) -> str:
        """``"<type> <base64>"`` as in authorized_keys/known_hosts."""
        return f"{self.key_type} {self.base64}"

    @property
    def fingerprint(self) -> str:
        """``SHA256:<unpadded base64>``, identical to ``ssh-keygen -lf``."""
        return openssh_fingerprint(self.openssh)

    def to_pkey(self) -> paramiko.PKey:
        return paramiko.PKey.from_type_string(self.key_type, base64.b64decode(self.base64))

    @classmethod
    def from_pkey(cls, key: paramiko.PKey) -> HostKey:
        return cls(key.get_name(), key.get_base64())

    @classmethod
    def parse(cls, text: str) -> HostKey:
        """Parse ``"ssh-ed25519 AAAA... [comment]"``, an ssh-keyscan/known_hosts line
        (``"host ssh-ed25519 AAAA..."``) or a .pub file. Raises ``ValueError`` on junk."""
        if not isinstance(text, str):
            raise ValueError("host key must be text")
        for line in text.splitlines():
            tokens = line.split()
            if not tokens or tokens[0].startswith("#"):
                continue
            for i, tok in enumerate(tokens[:-1]):
                if tok in HOST_KEY_TYPES:
                    return cls(tok, tokens[i + 1])
            raise ValueError(
                "not an SSH public host key (expected e.g. 'ssh-ed25519 AAAA...'; "
                f"supported types: {', '.join(HOST_KEY_TYPES)})"
            )
        raise ValueError("no host key given")


def load_private_key(text: str, passphrase: str | None = None) -> paramiko.PKey:
    """Load an Ed25519, RSA or ECDSA private key (OpenSSH or PEM/PKCS#8 text).

    The type is detected from the key itself. Raises ``ValueError`` with a clear
    message (never containing the key or passphrase) when the key is encrypted and
    no passphrase was given, the passphrase is wrong, or the key is unsupported.
    """
    if not text or not isinstance(text, str):
        raise ValueError("no private key given")
    data = text.strip().encode() + b"\n"
    pw = passphrase.encode() if passphrase else None
    is_openssh = b"-----BEGIN OPENSSH PRIVATE KEY-----" in data
    loader = serialization.load_ssh_private_key if is_openssh else serialization.load_pem_private_key
    try:
        try:
            key = loader(data, password=pw)
        except TypeError as e:
            if pw is not None and "not encrypted" in str(e):
                # A passphrase stored for an unencrypted key is harmless: ignore it.
                key = loader(data, password=None)
            else:
                raise ValueError("the private key is encrypted: a passphrase is required") from None
    except ValueError as e:
        if str(e).startswith("the private key is encrypted"):
            raise
        if pw is not None:
            raise ValueError("could not decrypt the private key: wrong passphrase (or corrupt key)") from None
        raise ValueError("not a valid private key (expected an OpenSSH or PEM Ed25519, RSA or ECDSA key)") from None
    except UnsupportedAlgorithm:
        raise ValueError("unsupported private key algorithm (use Ed25519, RSA or ECDSA)") from None

    if isinstance(key, ed25519.Ed25519PrivateKey):
        cls: type[paramiko.PKey] = paramiko.Ed25519Key
    elif isinstance(key, rsa.RSAPrivateKey):
        cls = paramiko.RSAKey
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise ValueError(f"unsupported ECDSA curve {key.curve.name} (use P-256, P-384 or P-521)")
        cls = paramiko.ECDSAKey
    else:
        raise ValueError("unsupported private key type (use Ed25519, RSA or ECDSA)")
    # Re-serialise the decrypted key in memory as unencrypted OpenSSH so paramiko
    # reads every format cryptography understands (paramiko alone rejects PKCS#8)
    # and never sees the passphrase.
    plain = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return cls.from_private_key(io.StringIO(plain.decode()))


def key_fingerprint(text: str, passphrase: str | None = None) -> str:
    """SHA256 fingerprint (``SHA256:...``) of the public half of a private key."""
    key = load_private_key(text, passphrase)
    return openssh_fingerprint(f"{key.get_name()} {key.get_base64()}")
