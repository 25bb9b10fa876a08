"""SSH transport and nixos-rebuild runner for nodes.

This package has no Django imports on purpose: the qcluster worker (tasks.py)
drives it, and it can be tested against a plain sshd without a database.
"""

from .rebuild import (
    ACTIONS,
    RebuildResult,
    SystemState,
    build_command,
    read_system_state,
    remote_workdir,
    run_rebuild,
    validate_action,
    validate_attr,
    validate_rev,
)
from .ssh import (
    Cancelled,
    Connection,
    HostKey,
    RemoteError,
    Target,
    key_fingerprint,
    load_private_key,
    scan_host_key,
)

__all__ = [
    "ACTIONS",
    "Cancelled",
    "Connection",
    "HostKey",
    "RebuildResult",
    "RemoteError",
    "SystemState",
    "Target",
    "build_command",
    "key_fingerprint",
    "load_private_key",
    "read_system_state",
    "remote_workdir",
    "run_rebuild",
    "scan_host_key",
    "validate_action",
    "validate_attr",
    "validate_rev",
]
