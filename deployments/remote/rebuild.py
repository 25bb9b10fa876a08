"""Run ``nixos-rebuild`` on a node from a shipped flake source archive.

No Django here. The worker gives a :class:`~.ssh.Target`, the ``git archive``
bytes of the pinned commit, the flake attribute and the action; this module
connects, records the system generation before and after, ships the source,
runs ``nixos-rebuild <action> --flake 'path:<dir>#<attr>'`` and always removes
the shipped folder again.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from .ssh import Cancelled, Connection, OutputCallback, RemoteError, Target, _check_remote_dir

__all__ = [
    "ACTIONS",
    "ATTR_RE",
    "REV_RE",
    "RebuildResult",
    "SystemState",
    "build_command",
    "read_system_state",
    "remote_workdir",
    "run_rebuild",
    "validate_action",
    "validate_attr",
    "validate_rev",
]

ACTIONS = ("switch", "boot", "test", "dry-activate", "build")
ATTR_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
REV_RE = re.compile(r"^[0-9a-f]{40}$")
SYSTEM_PROFILE = "/nix/var/nix/profiles/system"
CURRENT_SYSTEM = "/run/current-system"
WORKDIR_ROOT = "/tmp/nixos-panel"
_GENERATION_RE = re.compile(r"^system-(\d+)-link$")
_USER_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]")


def validate_attr(attr: str) -> str:
    """Return ``attr`` if it is a safe flake attribute name (``nixosConfigurations.<attr>``), else ValueError."""
    if not isinstance(attr, str) or not ATTR_RE.fullmatch(attr):
        raise ValueError(
            f"invalid flake attribute {attr!r}: use 1-100 characters from A-Z a-z 0-9 _ . -, not starting with . or -"
        )
    return attr


def validate_action(action: str) -> str:
    """Return ``action`` if it is one of :data:`ACTIONS`, else ValueError."""
    if not isinstance(action, str) or action not in ACTIONS:
        raise ValueError(f"invalid action {action!r}: must be one of {', '.join(ACTIONS)}")
    return action


def validate_rev(rev: str) -> str:
    """Return ``rev`` if it is a full, lower-case 40-hex git commit SHA, else ValueError.

    Branch names and short SHAs must be resolved to a full SHA first.
    """
    if not isinstance(rev, str) or not REV_RE.fullmatch(rev):
        raise ValueError(f"invalid revision {rev!r}: expected a full 40-character lower-case hex commit SHA")
    return rev


@dataclass
class SystemState:
    """What the node runs. ``generation`` None / paths '' when not present (e.g. not NixOS yet)."""

    generation: int | None
    profile_path: str  # store path the system profile points to (readlink -f)
    current_system: str  # store path of /run/current-system (readlink -f)


@dataclass
class RebuildResult:
    """Outcome of a nixos-rebuild run that started. Non-zero ``exit_code`` is a failed deploy."""

    exit_code: int
    before: SystemState
    after: SystemState
    toplevel: str | None


def remote_workdir(deployment_id: int, user: str = "root", nonce: str | None = None) -> str:
    """Per-deployment folder on the node: ``/tmp/nixos-panel-<user>/deploy-<id>[-<nonce>]``.

    Per login user, so a non-root sudo user can create and own it. run_rebuild
    adds a random nonce so two panels (or test databases) that reuse an id can
    never clean up each other's folder on a shared node.
    """
    if isinstance(deployment_id, bool) or not isinstance(deployment_id, int) or deployment_id < 0:
        raise ValueError(f"invalid deployment id {deployment_id!r}")
    safe_user = _USER_SAFE_RE.sub("_", user or "unknown")
    suffix = ""
    if nonce is not None:
        if not re.fullmatch(r"[A-Za-z0-9]{1,32}", nonce):
            raise ValueError("nonce must be 1-32 letters/digits")
        suffix = f"-{nonce}"
    return f"{WORKDIR_ROOT}-{safe_user}/deploy-{deployment_id}{suffix}"


def read_system_state(conn: Connection) -> SystemState:
    """Read the system profile generation and current system of the node.

    Missing links (not NixOS, first install) give ``generation=None`` and ''.
    """
    p, c = shlex.quote(SYSTEM_PROFILE), shlex.quote(CURRENT_SYSTEM)
    # Three lines, each possibly empty: profile link target, its store path, current system.
    out = conn.read_output(
        f"l=$(readlink {p} 2>/dev/null); "
        f"r=; [ -e {p} ] && r=$(readlink -f {p} 2>/dev/null); "
        f"s=; [ -e {c} ] && s=$(readlink -f {c} 2>/dev/null); "
        'printf "%s\\n%s\\n%s\\n" "$l" "$r" "$s"'
    )
    lines = (out.split("\n") + ["", "", ""])[:3]
    link, profile_path, current = (x.strip() for x in lines)
    m = _GENERATION_RE.match(os.path.basename(link))
    return SystemState(
        generation=int(m.group(1)) if m else None,
        profile_path=profile_path,
        current_system=current,
    )


def build_command(target: Target, action: str, workdir: str, attr: str) -> str:
    """The shell command that runs nixos-rebuild from ``workdir`` (where ``./result`` lands for ``build``).

    The flake ref is ``path:<workdir>#<attr>`` so Nix treats the shipped plain
    folder (no .git) as is; every value is validated and shell-quoted.
    """
    validate_action(action)
    validate_attr(attr)
    workdir = _check_remote_dir(workdir)
    if "#" in workdir or "?" in workdir:
        raise ValueError(f"workdir {workdir!r} cannot be used in a flake reference")
    ref = f"path:{workdir}#{attr}"
    return (
        f"cd {shlex.quote(workdir)} && "
        f"{target.privileged_prefix()}nixos-rebuild {shlex.quote(action)} --flake {shlex.quote(ref)}"
    )


def _resolve(conn: Connection, path: str) -> str | None:
    q = shlex.quote(path)
    try:
        out = conn.read_output(f"[ -e {q} ] && readlink -f {q} || true").strip()
    except RemoteError:
        return None
    return out or None


def run_rebuild(
    target: Target,
    *,
    deployment_id: int,
    archive: bytes | str | os.PathLike,
    attr: str,
    action: str,
    on_output: OutputCallback,
    should_cancel: Callable[[], bool] | None = None,
) -> RebuildResult:
    """Deploy a flake source archive to one node with nixos-rebuild.

    Contract:
    * ValueError for an invalid attr/action/id (before any connection).
    * RemoteError for anything that stops us running or finishing the command
      (connect, host key, auth, sudo, shipping, dropped connection).
    * A non-zero nixos-rebuild exit is *returned* in ``RebuildResult.exit_code``.
    * :class:`Cancelled` propagates after the remote process group was killed.
    * Once connected, the shipped folder is always removed (best effort).
    * Panel progress lines go to ``on_output("sys", b"...")``.
    """
    validate_action(action)
    validate_attr(attr)
    workdir = remote_workdir(deployment_id, target.user, secrets.token_hex(4))

    def note(msg: str) -> None:
        on_output("sys", msg.encode())

    if isinstance(archive, (bytes, bytearray, memoryview)):
        size = len(archive)
        digest = hashlib.sha256(archive).hexdigest()
    else:
        size = os.path.getsize(archive)
        h = hashlib.sha256()
        with open(archive, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()

    note(f"connecting to {target.user}@{target.address}")
    conn = Connection(target)
    conn.open()
    try:
        note(f"host key verified ({target.host_key.fingerprint})")
        if target.sudo:
            _check_sudo(conn, target)
        before = read_system_state(conn)
        note(
            f"system generation before: {before.generation if before.generation is not None else 'none'}"
            + (f" ({before.current_system})" if before.current_system else "")
        )
        note(f"shipping source ({size} bytes, sha256 {digest}) to {workdir}")
        conn.put_archive(archive, workdir)
        command = build_command(target, action, workdir, attr)
        note(f"running: {command}")
        exit_code = conn.run(
            command,
            on_output,
            stdin=target.privileged_stdin(),
            should_cancel=should_cancel,
        )
        note(f"exit code {exit_code}")
        toplevel = None
        if exit_code == 0:
            if action == "build":
                toplevel = _resolve(conn, f"{workdir}/result")
            elif action in ("switch", "test"):
                toplevel = _resolve(conn, CURRENT_SYSTEM)
            elif action == "boot":
                toplevel = _resolve(conn, SYSTEM_PROFILE)
            # dry-activate: nothing is recorded by nixos-rebuild we could read back.
        after = read_system_state(conn)
        note(
            f"system generation after: {after.generation if after.generation is not None else 'none'}"
            + (f" ({after.current_system})" if after.current_system else "")
        )
        if toplevel:
            note(f"toplevel: {toplevel}")
        return RebuildResult(exit_code=exit_code, before=before, after=after, toplevel=toplevel)
    finally:
        # Never let cleanup mask the real outcome (an exception or the result).
        try:
            note("cleaning up")
            conn.remove_dir(workdir)
        except (RemoteError, RuntimeError, OSError) as e:
            try:
                note(f"warning: could not remove {workdir}: {e}")
            except Exception:
                pass
        conn.close()


def _check_sudo(conn: Connection, target: Target) -> None:
    """Fail early with kind "sudo" instead of a confusing nixos-rebuild failure."""
    err: list[bytes] = []
    code = conn.run(
        f"{target.privileged_prefix()}true",
        lambda stream, line: err.append(line) if stream == "err" else None,
        stdin=target.privileged_stdin(),
    )
    if code != 0:
        detail = " | ".join(x.decode("utf-8", "replace") for x in err[-3:] if x.strip())
        how = "with the stored password" if target.sudo_secret() else "without a password (sudo -n)"
        raise RemoteError(
            "sudo", f"sudo as {target.user!r} on {target.address} failed {how}" + (f": {detail}" if detail else "")
        )


# Re-exported for callers catching everything from one place.
__all__ += ["Cancelled", "RemoteError"]
