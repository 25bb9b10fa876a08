"""Small helpers for tests: keys, waiting on a condition with a deadline."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import paramiko


def ed25519_private_key() -> str:
    """A fresh Ed25519 private key in OpenSSH format."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()


def rsa_private_key_text() -> str:
    key = paramiko.RSAKey.generate(2048)
    out = io.StringIO()
    key.write_private_key(out)
    return out.getvalue()


def wait_for(condition: Callable[[], object], timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    """Return condition()'s first truthy value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
