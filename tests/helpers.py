"""Moved to tests/support/keys.py and tests/support/wait.py; this stays only until no test imports it."""

from tests.support.keys import ed25519_private_key, rsa_private_key_text
from tests.support.wait import wait_for

__all__ = ["ed25519_private_key", "rsa_private_key_text", "wait_for"]
