"""SSH transport and nixos-rebuild runner for nodes.

This package has no Django imports on purpose: the qcluster worker (tasks.py)
drives it, and it can be tested against a plain sshd without a database.

* ``keys``: host keys to pin, private keys to log in with, SHA256 fingerprints.
* ``connection``: TCP and the SSH handshake against the pinned key; Target, errors.
* ``jump``: bastions (ProxyJump), one pooled session per bastion per process.
* ``stream``: running a command with stdout/stderr streamed apart, cancellable.
* ``system``: what a node runs (generation, /run/current-system).
* ``detached``: a run that outlives the SSH session, followed by byte offset across drops.
* ``rebuild``: one nixos-rebuild run from a shipped flake source.
* ``confirm``: magic rollback: an armed run waits for a confirmation over a new connection, or goes back.
* ``build``: ``nix build`` of a system on a build host or the panel host; activating a copied system.
* ``closure``: copying a closure to a node (only the missing paths); comparing it with what the node runs.
"""

from .connection import MAX_JUMP_HOPS, REMOTE_ERROR_KINDS, Cancelled, RemoteError, Target, scan_host_key
from .detached import RunReport, inspect_run, reconcile_run
from .keys import HostKey, key_fingerprint, load_private_key, openssh_fingerprint
from .rebuild import COMMIT_SHA_RE, FLAKE_ATTR_RE, REBUILD_ACTIONS, RebuildResult, resolve_path, run_rebuild
from .system import SystemState

__all__ = [
    "COMMIT_SHA_RE",
    "FLAKE_ATTR_RE",
    "MAX_JUMP_HOPS",
    "REBUILD_ACTIONS",
    "REMOTE_ERROR_KINDS",
    "Cancelled",
    "HostKey",
    "RebuildResult",
    "RemoteError",
    "RunReport",
    "SystemState",
    "Target",
    "inspect_run",
    "key_fingerprint",
    "load_private_key",
    "openssh_fingerprint",
    "reconcile_run",
    "resolve_path",
    "run_rebuild",
    "scan_host_key",
]
