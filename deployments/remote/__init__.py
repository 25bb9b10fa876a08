"""SSH transport and nixos-rebuild runner for nodes.

This package has no Django imports on purpose: the qcluster worker (tasks.py)
drives it, and it can be tested against a plain sshd without a database.

* ``keys``: host keys to pin, private keys to log in with, SHA256 fingerprints.
* ``connection``: TCP and the SSH handshake against the pinned key; Target, errors.
* ``stream``: running a command with stdout/stderr streamed apart, cancellable.
* ``rebuild``: one nixos-rebuild run from a shipped flake source.
"""

from .connection import REMOTE_ERROR_KINDS, Cancelled, RemoteError, Target, scan_host_key
from .keys import HostKey, key_fingerprint, load_private_key, openssh_fingerprint
from .rebuild import COMMIT_SHA_RE, FLAKE_ATTR_RE, REBUILD_ACTIONS, RebuildResult, SystemState, run_rebuild

__all__ = [
    "COMMIT_SHA_RE",
    "FLAKE_ATTR_RE",
    "REBUILD_ACTIONS",
    "REMOTE_ERROR_KINDS",
    "Cancelled",
    "HostKey",
    "RebuildResult",
    "RemoteError",
    "SystemState",
    "Target",
    "key_fingerprint",
    "load_private_key",
    "openssh_fingerprint",
    "run_rebuild",
    "scan_host_key",
]
