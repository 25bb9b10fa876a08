"""Moved to tests/remote/server.py and tests/support/keys.py; this stays only until no test imports it."""

from tests.support.keys import keygen, ssh_keygen_fingerprint

from .server import IS_ROOT, collect

__all__ = ["IS_ROOT", "collect", "keygen", "ssh_keygen_fingerprint"]
